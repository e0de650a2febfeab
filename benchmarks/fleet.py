"""Fleet: API replicas and workers sharing PostgreSQL and S3 storage, through a crash.

Starts --apis API processes (``fluxserve serve --no-workers``) and --workers worker processes (``fluxserve
worker``) on one PostgreSQL database (in a schema of its own, dropped afterwards) and one S3-compatible server
(moto_server on a free port, or --s3-endpoint), and drives --clients clients for --seconds through all three APIs,
each client sending its requests to the replicas in turn and going to the next replica when one does not answer
(what a load balancer does):
  * fal: ``POST /queue/fal-ai/flux-2/flash`` with an Idempotency-Key, status polls, the result;
  * OpenAI: the ``openai`` SDK's ``images.generate`` with an Idempotency-Key (a retry reattaches to its jobs);
  * Replicate: the ``replicate`` client's ``predictions.create`` and ``predictions.get``.
A third of the way in, it kills (SIGKILL) one worker while it runs a job, and one API process, and starts both
again. When the clients are done it checks, from the job store and over HTTP:
  * every accepted job (a request id, prediction id or OpenAI response the client received) completed, once;
  * each of their outputs is readable, byte for byte the same, through every API replica;
  * the killed worker's job completed on its second attempt.
It prints the jobs, throughput, latency per API and the recovery times (the restarted API answering; the killed
worker's job completing), and the problems found (none, when the fleet held).

    .venv/bin/python benchmarks/fleet.py [--db postgresql://...] [--apis 2] [--workers 2] [--clients 3]
                                         [--seconds 40] [--step-delay 0.1] [--json OUT]

The models are the demo ones on the CPU unless --real (then the configured weights on each worker's device).
--step-delay makes every denoising step last at least that long (the demo models finish a job in milliseconds,
too fast for a kill to land in the middle of one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_DB = os.environ.get("FLUXSERVE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FAL_ENDPOINT = "fal-ai/flux-2/flash"
REPLICATE_MODEL = "black-forest-labs/flux-2-dev"
START_TIMEOUT_S = 180.0
LAUNCHER = Path(__file__).resolve().with_name("slow_steps.py")  # fluxserve with --step-delay applied


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- the fleet's processes -----------------------------------------------------------------------------------
@dataclass
class Fleet:
    db_url: str
    storage: str
    data_dir: Path
    env: dict[str, str]
    flags: list[str]
    launcher: Path
    apis: list[tuple[subprocess.Popen, int]] = field(default_factory=list)
    workers: list[tuple[subprocess.Popen, str]] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)

    def _launch(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(self.launcher), *args, *self.flags, "--db", self.db_url,
                                 "--storage", self.storage, "--data-dir", str(self.data_dir)],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.logs[name] = lines = []
        proc.lines = lines
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
        return proc

    def start_api(self, index: int, port: int | None = None) -> float:
        """Start API replica ``index`` (again, on its port); seconds until it answered /health."""
        port = port or free_port()
        started = time.monotonic()
        proc = self._launch(f"api{index}", ["serve", "--no-workers", "--port", str(port)])

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"API {index} exited: {''.join(proc.lines)[-2000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, START_TIMEOUT_S, f"API {index} to answer")
        entry = (proc, port)
        if index < len(self.apis):
            self.apis[index] = entry
        else:
            self.apis.append(entry)
        return time.monotonic() - started

    def start_worker(self, index: int) -> str:
        """Start worker ``index`` (again); its worker id once it said it runs."""
        proc = self._launch(f"worker{index}", ["worker"])

        def announced() -> str | None:
            for line in list(proc.lines):
                if line.startswith("fluxserve worker:"):
                    return line.split(" worker(s) ")[1].split(" on ")[0] + "/0"
            if proc.poll() is not None:
                raise RuntimeError(f"worker {index} exited: {''.join(proc.lines)[-2000:]}")
            return None

        worker_id = wait_for(announced, START_TIMEOUT_S, f"worker {index} to start")
        entry = (proc, worker_id)
        if index < len(self.workers):
            self.workers[index] = entry
        else:
            self.workers.append(entry)
        return worker_id

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for _, port in self.apis]

    def stop(self) -> None:
        for proc, _ in [*self.apis, *self.workers]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in [*self.apis, *self.workers]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ---- clients ---------------------------------------------------------------------------------------------------
@dataclass
class Accepted:
    dialect: str
    job_ids: list[str]
    latency_s: float | None = None  # submit -> completed, as the client saw it


class Client:
    """One closed-loop client: a request, then its result, then the next; replicas in turn, failing over."""

    def __init__(self, index: int, fleet: Fleet, deadline: float, seconds_per_call: float = 2 * START_TIMEOUT_S):
        self.index, self.fleet, self.deadline = index, fleet, deadline
        self.turn = itertools.count(index)
        self.accepted: list[Accepted] = []
        self.failovers = 0
        self.errors: list[str] = []
        self.call_timeout = seconds_per_call

    def replica(self) -> str:
        urls = self.fleet.urls
        return urls[next(self.turn) % len(urls)]

    def failing_over(self, call):
        """``call(base_url)`` on the replicas in turn until one answers (connection errors only)."""
        import openai

        give_up = time.monotonic() + self.call_timeout
        while True:
            base = self.replica()
            try:
                return call(base)
            except (httpx.TransportError, openai.APIConnectionError):
                self.failovers += 1
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.2)

    def run(self) -> None:
        dialects = itertools.cycle(["fal", "openai", "replicate"][self.index % 3:] + ["fal", "openai", "replicate"]
                                   [:self.index % 3])
        for n in itertools.count():
            if time.monotonic() >= self.deadline:
                return
            dialect = next(dialects)
            prompt = f"client {self.index} request {n}: a lighthouse at dusk"
            try:
                started = time.monotonic()
                accepted = getattr(self, dialect)(prompt)
                accepted.latency_s = time.monotonic() - started
                self.accepted.append(accepted)
            except Exception as exc:  # noqa: BLE001 - recorded and reported; the run goes on
                self.errors.append(f"{dialect}: {type(exc).__name__}: {exc}")

    def fal(self, prompt: str) -> Accepted:
        key = str(uuid.uuid4())
        body = {"prompt": prompt, "image_size": {"width": 512, "height": 512}}
        submitted = self.failing_over(lambda base: httpx.post(f"{base}/queue/{FAL_ENDPOINT}", json=body, timeout=30,
                                                              headers={"Idempotency-Key": key}))
        submitted.raise_for_status()
        request_id = submitted.json()["request_id"]
        accepted = Accepted("fal", [request_id])
        path = f"/queue/fal-ai/flux-2/requests/{request_id}"
        while True:
            status = self.failing_over(lambda base: httpx.get(f"{base}{path}/status", timeout=30)).json()
            if status["status"] == "COMPLETED":
                break
            time.sleep(0.2)
        result = self.failing_over(lambda base: httpx.get(f"{base}{path}", timeout=30))
        result.raise_for_status()
        return accepted

    def openai(self, prompt: str) -> Accepted:
        from fluxserve.compat.openai import client

        key = str(uuid.uuid4())

        def call(base: str):
            return client(base, max_retries=0, timeout=300).images.with_raw_response.generate(
                model="flux-2-flash", prompt=prompt, size="256x256", extra_headers={"Idempotency-Key": key})

        raw = self.failing_over(call)
        raw.parse()
        return Accepted("openai", raw.headers["x-fluxserve-job-ids"].split(","))

    def replicate(self, prompt: str) -> Accepted:
        from fluxserve.compat.replicate import client

        body = {"prompt": prompt, "aspect_ratio": "custom", "width": 256, "height": 256, "steps": 4}
        prediction = self.failing_over(lambda base: client(base).predictions.create(model=REPLICATE_MODEL,
                                                                                        input=body))
        accepted = Accepted("replicate", [prediction.id])
        while prediction.status not in ("succeeded", "failed", "canceled"):
            time.sleep(0.2)
            prediction = self.failing_over(lambda base: client(base).predictions.get(accepted.job_ids[0]))
        return accepted


# ---- the run ---------------------------------------------------------------------------------------------------
def kill_mid_run(fleet: Fleet, store, report: dict) -> None:
    """Kill worker 0 while it runs a job and API 0, start both again, and time their recovery."""
    proc, worker_id = fleet.workers[0]
    running = wait_for(lambda: next((job for job in store.list(limit=50) if job.status == "running"
                                     and job.worker_id == worker_id), None), 120, "worker 0 to run a job", 0.02)
    killed_at = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    api_proc, api_port = fleet.apis[0]
    api_proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    api_proc.wait(30)
    report["killed"] = {"worker": worker_id, "job": running.id, "api_port": api_port}
    time.sleep(1.0)
    fleet.start_worker(0)
    fleet.start_api(0, api_port)
    report["api_recovery_s"] = round(time.monotonic() - killed_at, 2)
    done = wait_for(lambda: (job := store.get(running.id)).status in ("completed", "failed", "cancelled") and job,
                    START_TIMEOUT_S, "the killed worker's job to end", 0.05)
    report["worker_job_recovery_s"] = round(time.monotonic() - killed_at, 2)
    report["killed"]["job_status"], report["killed"]["job_attempts"] = done.status, done.attempts


def check(fleet: Fleet, store, clients: list[Client], report: dict) -> list[str]:
    problems: list[str] = []
    accepted = [a for c in clients for a in c.accepted]
    ids = [job_id for a in accepted for job_id in a.job_ids]
    if len(ids) != len(set(ids)):
        problems.append(f"{len(ids) - len(set(ids))} job ids were accepted twice")
    readable = 0
    with httpx.Client(timeout=60) as http:
        for job_id in ids:
            job = store.get(job_id)
            if job is None or job.status != "completed":
                problems.append(f"accepted job {job_id} is {job.status if job else 'missing'}")
                continue
            for image in (job.result or {}).get("images", []):
                bodies = {http.get(f"{base}/files/{image['key']}").content for base in fleet.urls}
                if len(bodies) != 1 or not next(iter(bodies)):
                    problems.append(f"job {job_id}: output {image['key']} is not the same through every API")
                else:
                    readable += 1
    every = {job.id: job for job in store.list(limit=100_000)}
    orphans = [job for job_id, job in every.items() if job_id not in set(ids)]
    unfinished = [job.id for job in orphans if job.status not in ("completed", "failed", "cancelled")]
    if unfinished:
        problems.append(f"{len(unfinished)} jobs no client accepted are still {sorted({every[j].status for j in unfinished})}")
    killed = report.get("killed", {})
    if killed and (killed.get("job_status") != "completed" or killed.get("job_attempts") != 2):
        problems.append(f"the killed worker's job ended {killed.get('job_status')} after "
                        f"{killed.get('job_attempts')} attempts (expected completed on attempt 2)")
    report["outputs_checked"] = readable
    report["jobs_without_a_client"] = len(orphans)
    for c in clients:
        problems.extend(f"client {c.index}: {error}" for error in c.errors)
    return problems


def summarize(clients: list[Client], seconds: float) -> dict:
    from serving import percentile

    by_dialect: dict[str, list[float]] = {}
    for a in (a for c in clients for a in c.accepted):
        by_dialect.setdefault(a.dialect, []).append(a.latency_s or 0.0)
    total = sum(len(v) for v in by_dialect.values())
    return {
        "requests": total,
        "requests_per_s": round(total / seconds, 2) if seconds else None,
        "failovers": sum(c.failovers for c in clients),
        "latency_s": {d: {"n": len(v), "p50": round(percentile(v, 50), 3), "p95": round(percentile(v, 95), 3)}
                      for d, v in sorted(by_dialect.items())},
    }


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited") from None
            return False

    wait_for(listening, 60, "moto_server")
    return proc, f"http://127.0.0.1:{port}"


def fresh_schema(db_url: str):
    """A URL whose search_path is a new schema, and a function that drops it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from fluxserve.jobs.store import normalize_db_url

    base = make_url(normalize_db_url(db_url))
    schema = f"fluxserve_fleet_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False), drop


def run(db: str = DEFAULT_DB, apis: int = 2, workers: int = 2, clients: int = 3, seconds: float = 40.0,
        step_delay: float = 0.1, data_dir: str | None = None, s3_endpoint: str | None = None, real: bool = False,
        chaos: bool = True) -> dict:
    import boto3

    from fluxserve.jobs.store import JobStore

    report: dict = {"apis": apis, "workers": workers, "clients": clients, "seconds": seconds,
                    "step_delay_s": step_delay, "models": "configured" if real else "demo"}
    cleanups = []
    try:
        if s3_endpoint is None:
            moto, s3_endpoint = start_moto()
            cleanups.append(lambda: (moto.terminate(), moto.wait(10)))
        env = {**os.environ, "FLUXSERVE_S3_ENDPOINT": s3_endpoint, "FLUXSERVE_REQUIRE_AUTH": "0",
               "FLUXSERVE_STEP_DELAY_S": str(step_delay), "PYTHONUNBUFFERED": "1"}
        for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setdefault(name, value)
        if not real:
            env["FLUXSERVE_DEVICE"] = "cpu"
        bucket = f"fluxserve-fleet-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
        db_url, drop = fresh_schema(db)
        cleanups.append(drop)
        if data_dir is None:
            scratch = tempfile.TemporaryDirectory(prefix="fluxserve-fleet-")
            cleanups.append(scratch.cleanup)
            data_dir = scratch.name
        flags = [] if real else ["--demo"]
        if not real:  # built once here, not by every process at once
            subprocess.run([sys.executable, "-m", "fluxserve", "demo-weights", "--data-dir", data_dir], env=env,
                           check=True, stdout=subprocess.DEVNULL)
        fleet = Fleet(db_url, f"s3://{bucket}/fleet", Path(data_dir), env, flags, LAUNCHER)
        cleanups.append(fleet.stop)
        store = JobStore(db_url)
        cleanups.append(store.close)
        for i in range(apis):
            fleet.start_api(i)
        for i in range(workers):
            fleet.start_worker(i)

        started = time.monotonic()
        deadline = started + seconds
        load = [Client(i, fleet, deadline) for i in range(clients)]
        threads = [threading.Thread(target=c.run, daemon=True) for c in load]
        for t in threads:
            t.start()
        if chaos:
            time.sleep(seconds / 3)
            kill_mid_run(fleet, store, report)
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()) + 2 * START_TIMEOUT_S)
        elapsed = time.monotonic() - started
        report.update(summarize(load, elapsed))
        report["problems"] = check(fleet, store, load, report)
        if any(t.is_alive() for t in threads):
            report["problems"].append(f"a client was still waiting {2 * START_TIMEOUT_S:.0f} s after the run ended")
        return report
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                print(f"cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)


def describe_device(real: bool) -> str:
    from serving import cpu_model

    if real:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{cpu_model()}, {os.cpu_count()} cores (demo models on the CPU)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=DEFAULT_DB, help="PostgreSQL URL (a schema of its own is made and dropped)")
    parser.add_argument("--apis", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--step-delay", type=float, default=0.1)
    parser.add_argument("--data-dir", help="data directory shared by the processes (default: a temporary one)")
    parser.add_argument("--s3-endpoint", help="an S3-compatible server (default: moto_server on a free port)")
    parser.add_argument("--real", action="store_true", help="the configured weights instead of the demo models")
    parser.add_argument("--no-chaos", dest="chaos", action="store_false", help="kill nothing")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)
    if args.apis < 1 or args.workers < 1 or args.clients < 1:
        parser.error("--apis, --workers and --clients must be at least 1")
    report = run(args.db, args.apis, args.workers, args.clients, args.seconds, args.step_delay, args.data_dir,
                 args.s3_endpoint, args.real, args.chaos)
    report["device"] = describe_device(args.real)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
