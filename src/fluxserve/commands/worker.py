"""``fluxserve worker``: GPU workers without the API, sharing a job store with ``fluxserve serve --no-workers``
replicas (a worker fleet on PostgreSQL and S3). Stops cleanly on SIGTERM or Ctrl-C: the running job finishes
(or, after ``--grace`` seconds, goes back to the queue for another worker).

Webhooks are sent by the API processes, not by workers. With ``--health-port`` a worker answers
``GET /health/live`` and ``/health/ready`` there, for Kubernetes probes and container health checks, and its
Prometheus metrics at ``/metrics``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from fluxserve.commands.common import (
    add_model_flags,
    add_random_weights_flag,
    random_weights_note,
    random_weights_refusal,
    settings_from_args,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("worker", help="run GPU workers against a shared job store", description=__doc__)
    parser.add_argument("--db", help="job store URL: sqlite:///path.db or postgresql://... (default: SQLite in "
                        "the data directory)")
    parser.add_argument("--storage", help="file storage: a directory or s3://bucket/prefix")
    parser.add_argument("--workers", type=int, dest="workers_per_device",
                        help="worker threads sharing this process's engine (default 1)")
    parser.add_argument("--worker-id", help="a name for this worker in job records, unique in the fleet (default: "
                        "<host>-worker<n>-<random>/<thread>; a restarted worker takes back its predecessor's jobs "
                        "either way)")
    parser.add_argument("--models", help="only take jobs for these catalogue model keys, comma-separated "
                        "(default: any)")
    parser.add_argument("--jobs", default="generate,train",
                        help="the job kinds to take, comma-separated: generate, train, upstream (default generate,"
                        "train); a fleet with GPUs kept for generation never has them taken by a long training job; "
                        "upstream workers send the closed models' requests to the --upstream providers and need no GPU")
    parser.add_argument("--lease", type=float, default=30.0,
                        help="seconds without a heartbeat after which another worker may take a job (default 30)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="on shutdown, seconds to let the running job finish (default 30)")
    parser.add_argument("--once", action="store_true", help="run until the queue is empty, then exit")
    parser.add_argument("--health-port", type=int,
                        help="answer GET /health/live and /health/ready on this port, for Kubernetes probes and "
                        "container health checks, and GET /metrics (default: no port)")
    parser.add_argument("--health-host", default="127.0.0.1",
                        help="address the health port listens on (default 127.0.0.1; 0.0.0.0 in a container)")
    add_model_flags(parser)
    add_random_weights_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from fluxserve.api.app import open_gateway
    from fluxserve.api.metrics import Metrics
    from fluxserve.catalog import Catalog
    from fluxserve.engine import engines_for
    from fluxserve.health import ProbeServer
    from fluxserve.jobs.identity import ProcessSlot, SlotBusy
    from fluxserve.jobs.store import JOB_KINDS, JobStore
    from fluxserve.jobs.worker import Worker
    from fluxserve.storage import open_storage
    from fluxserve.upstream.gateway import local_note

    settings = settings_from_args(args, db=args.db, storage=args.storage, workers_per_device=args.workers_per_device)
    catalog = Catalog.load(settings.catalog or None)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if models:
        unknown = [m for m in models if m not in catalog.models]
        if unknown:
            print(f"error: --models: unknown model(s) {', '.join(unknown)}; known: {', '.join(catalog.models)}",
                  file=sys.stderr)
            return 2
    kinds = [k.strip() for k in args.jobs.split(",") if k.strip()]
    if not kinds or any(k not in JOB_KINDS for k in kinds):
        print(f"error: --jobs: {args.jobs!r} is not a comma-separated list of {', '.join(JOB_KINDS)}", file=sys.stderr)
        return 2
    gateway = open_gateway(settings, catalog) if "upstream" in kinds else None
    if "upstream" in kinds and gateway is None:
        print("error: --jobs upstream: no provider is configured (--upstream fal=URL)", file=sys.stderr)
        return 2
    if any(kind != "upstream" for kind in kinds) and (refusal := random_weights_refusal(settings)):
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        slot = ProcessSlot.acquire(settings.data_dir, "worker", args.worker_id)
    except SlotBusy as e:
        print(f"error: --worker-id: {e}", file=sys.stderr)
        return 2
    store = JobStore(settings.db_url)
    if gateway is not None:
        gateway.store = store
    storage = open_storage(settings.storage_location)
    local_kinds = [kind for kind in kinds if kind != "upstream"]
    engines = engines_for(settings, catalog) if local_kinds else []
    per_device = max(1, settings.workers_per_device)
    engine_list = [engine for engine in engines for _ in range(per_device)]
    engine_list += [gateway] * (max(1, settings.gateway_workers) if gateway is not None else 0)
    count = len(engine_list)
    if args.worker_id:
        base_id = args.worker_id
        names = [f"{d}-{i}" for d in range(len(engines)) for i in range(per_device)]
        names += [f"upstream-{n}" for n in range(count - len(names))]
        ids = [base_id] if count == 1 else [f"{base_id}-{name}" for name in names]
    else:
        base_id = slot.process_id
        ids = slot.auto_worker_ids(count)
    metrics = Metrics(None, catalog.endpoints)  # served with the probes (--health-port)
    workers = [
        Worker(store, engine, storage, worker_id=worker_id, on_finished=metrics.finished, lease_s=args.lease,
               models=models, kinds=["upstream"] if engine is gateway else local_kinds,
               note=None if engine is gateway else partial(local_note, catalog))
        for worker_id, engine in zip(ids, engine_list, strict=True)
    ]
    recovered = slot.start(store, ids)
    print(f"fluxserve worker: {count} worker(s) {base_id} on {store!r}, storage {storage!r}"
          + (" (demo models)" if settings.demo else ""), file=sys.stderr, flush=True)
    if local_kinds and (note := random_weights_note(settings)):
        print(f"  {note}", file=sys.stderr, flush=True)
    if any(recovered.values()):
        print(f"the previous worker in this slot stopped without giving its jobs back: {recovered['requeued']} "
              f"back in the queue, {recovered['failed']} failed, {recovered['cancelled']} cancelled",
              file=sys.stderr, flush=True)

    if args.once:
        done = 0
        while workers[0].run_once() is not None:
            done += 1
        print(f"queue empty after {done} job(s)", file=sys.stderr)
        store.close()
        slot.close()
        return 0

    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        print(f"received {signal.Signals(signum).name}; stopping", file=sys.stderr, flush=True)
        stopping.set()

    probes = None
    if args.health_port is not None:
        try:
            probes = ProbeServer(args.health_host, args.health_port, store, workers, metrics)
        except OSError as e:
            print(f"error: --health-port: cannot listen on {args.health_host}:{args.health_port}: {e.strerror}",
                  file=sys.stderr)
            store.close()
            slot.close()
            return 2
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        if probes is not None:
            probes.start()
            print(f"health probes on http://{args.health_host}:{probes.port}/health/ready", file=sys.stderr,
                  flush=True)
        while not stopping.wait(1.0):
            if not all(worker.running for worker in workers):
                print("error: a worker thread ended unexpectedly", file=sys.stderr)
                return 1
    finally:
        if probes is not None:
            probes.stop()
        for worker in workers:
            worker.request_stop()
        for worker in workers:
            worker.stop(timeout=args.grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
        slot.close()
    print(f"stopped after {sum(w.jobs_done for w in workers)} job(s)", file=sys.stderr)
    return 0
