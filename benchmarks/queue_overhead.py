"""Queue overhead: what the queue adds to a request as a fal client sees it.

Definition (printed with the results): one job at a time, on an otherwise idle server with one worker,
    overhead = (t_seen - t_submit) - timings.inference
where t_submit is when the client starts ``POST /queue/{endpoint}``, t_seen is when the client has read the
first status answer saying COMPLETED, and ``timings.inference`` is the engine's own time for the job (from text
encoding to encoded images, as returned in the output). How the client waits for COMPLETED:
  * stream (default): ``GET .../status/stream`` right after the submit answer, as fal_client's subscribe does;
  * poll:  ``GET .../status`` every --poll-ms milliseconds.
The overhead is split with the job's own timestamps (created_at, started_at, completed_at; same clock):
  submit  = created_at - t_submit             (HTTP, validation, the INSERT)
  start   = started_at - created_at            (worker wake-up and claim)
  finish  = completed_at - started_at - inference   (request parsing, outputs to storage, the completing UPDATE)
  notify  = t_seen - completed_at              (until the client has the COMPLETED status)
fluxserve runs as ``fluxserve serve`` in its own process (uvicorn on a free port, uvloop + httptools, access
log off, one worker thread, the demo models unless --real), so the client's own Python does not compete with the
server for the GIL; the timestamps are read from the job store after each job. The first two jobs warm the
model up and are not counted. Target: p50 <= 15 ms.

    .venv/bin/python benchmarks/queue_overhead.py [--jobs 40] [--wait stream|poll] [--poll-ms 2] [--db URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from serving import cpu_model, percentile, start_server

from fluxserve.config import Settings
from fluxserve.jobs.store import JobStore

DEFINITION = ("overhead = (client sees COMPLETED - client starts the submit) - the engine's timings.inference; "
              "one job at a time, one worker")


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


def wait_stream(client: httpx.Client, status_url: str) -> dict:
    with client.stream("GET", f"{status_url}/stream") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("status") == "COMPLETED":
                    return event
    raise RuntimeError("the status stream closed before COMPLETED")


def wait_poll(client: httpx.Client, status_url: str, interval: float) -> dict:
    while True:
        status = client.get(status_url).json()
        if status["status"] == "COMPLETED":
            return status
        time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--endpoint", default="fal-ai/flux-2/flash")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--wait", choices=["stream", "poll"], default="stream")
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument("--db", default="", help="job store URL (default: SQLite in a temporary directory)")
    parser.add_argument("--data-dir", default="", help="reuse a data directory (keeps built demo weights)")
    parser.add_argument("--real", action="store_true", help="real weights instead of the demo models")
    args = parser.parse_args()

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fluxserve-bench-"))
    settings = Settings(data_dir=data_dir, demo=not args.real, db=args.db)
    flags = (["--demo"] if not args.real else []) + (["--db", args.db] if args.db else [])
    server, base, _port = start_server(str(data_dir), *flags)
    store = JobStore(settings.db_url)
    body = {"prompt": "a lighthouse at dusk", "image_size": {"width": args.size, "height": args.size}}

    try:
        rows = []  # (overhead, wall, engine, submit, start, finish, notify, submit answer)
        with httpx.Client(timeout=600) as client:
            for i in range(args.jobs + 2):  # the first two warm the model up and are not counted
                t_submit = time.time()
                t0 = time.perf_counter()
                submitted = client.post(f"{base}/queue/{args.endpoint}", json={**body, "seed": i}).json()
                answered = time.perf_counter() - t0
                if args.wait == "stream":
                    status = wait_stream(client, submitted["status_url"])
                else:
                    status = wait_poll(client, submitted["status_url"], args.poll_ms / 1000)
                wall = time.perf_counter() - t0
                t_seen = t_submit + wall
                result = client.get(submitted["response_url"]).json()
                engine = (result.get("timings") or {}).get("inference") or status["metrics"]["inference_time"]
                job = store.get(submitted["request_id"])
                created, started, completed = (t.timestamp() for t in (job.created_at, job.started_at,
                                                                        job.completed_at))
                if i >= 2:
                    rows.append((wall - engine, wall, engine, created - t_submit, started - created,
                                 completed - started - engine, t_seen - completed, answered))
    finally:
        server.terminate()
        server.wait(60)

    def stat(index: int) -> str:
        values = [row[index] for row in rows]
        return f"p50 {statistics.median(values) * 1e3:6.1f} ms  p99 {percentile(values, 99) * 1e3:6.1f} ms"

    overhead = statistics.median(row[0] for row in rows)
    wait = "status stream" if args.wait == "stream" else f"status poll every {args.poll_ms:g} ms"
    print(f"definition: {DEFINITION}; the client waits with the {wait}")
    print(f"device: {describe_device()}; load average {os.getloadavg()[0]:.2f}")
    print(f"store: {store!r}   endpoint: {args.endpoint} {args.size}x{args.size}   jobs: {len(rows)}")
    print(f"submit->COMPLETED wall: {stat(1)}")
    print(f"engine inference:       {stat(2)}")
    print(f"  submit (HTTP+INSERT): {stat(3)}   (submit answer received: {stat(7)})")
    print(f"  start (wake, claim):  {stat(4)}")
    print(f"  finish (save, UPDATE):{stat(5)}")
    print(f"  notify (client sees): {stat(6)}")
    print(f"queue overhead:         {stat(0)}   (target p50 <= 15 ms: {'met' if overhead <= 0.015 else 'NOT met'})")


if __name__ == "__main__":
    main()
