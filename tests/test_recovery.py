"""Crash recovery: a killed server or worker that starts again takes its jobs back at once (not a lease later),
never a live sibling's; synchronous requests whose caller is gone are not run for nobody; a worker that lost
its lease stops at its next step and its outcome is not recorded. Real processes (``kill -9``), real HTTP, the
real engine on the demo models, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fal_helpers import Server, free_port, settings_for

from fluxserve.catalog import Catalog
from fluxserve.config import Settings
from fluxserve.engine import Engine
from fluxserve.jobs.identity import ProcessSlot, SlotBusy
from fluxserve.jobs.store import CALLER_GONE_ERROR, JobStore
from fluxserve.jobs.worker import Worker
from fluxserve.storage import LocalStorage

pytest_plugins = ["db_fixtures"]

# the lease the killed processes hold: a test that waited for it to expire would time out long before
LONG_LEASE_S = 600.0
# how long a restarted process may take to start (import torch, load the demo models) and finish the job
RECOVERY_BOUND_S = 300.0

# the fluxserve command line with every denoising step at least FLUXSERVE_STEP_DELAY_S seconds long, so a job
# is still running when the test kills the process
LAUNCHER = Path(__file__).resolve().parent.parent / "benchmarks" / "slow_steps.py"


def request(**overrides) -> dict:
    return {"model": "dev", "prompt": "a red lighthouse", "width": 256, "height": 256, "steps": 20,
            "seed": 7, **overrides}


def submit(store: JobStore, **kwargs):
    kwargs.setdefault("request", request())
    return store.submit(endpoint="fal-ai/flux-2", dialect="fal", **kwargs)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:.0f} s"
        time.sleep(0.05)
    return value


# ---- the store -------------------------------------------------------------------------------------------
def test_recover_requeues_only_the_dead_workers_jobs_counting_the_attempt(store):
    dead, live = submit(store), submit(store)
    assert store.claim("host-worker0-aaaa/0", lease_s=LONG_LEASE_S).id == dead.id
    assert store.claim("host-worker1-bbbb/0", lease_s=LONG_LEASE_S).id == live.id
    assert store.recover(["host-worker0-aaaa/0"], "host-worker0-aaaa") == {"requeued": 1, "failed": 0, "cancelled": 0}
    back = store.get(dead.id)
    assert back.status == "queued" and back.worker_id is None and back.attempts == 1
    assert "put the request back in the queue" in store.logs(dead.id)[-1].message
    sibling = store.get(live.id)
    assert sibling.status == "running" and sibling.worker_id == "host-worker1-bbbb/0"
    again = store.claim("host-worker0-cccc/0")
    assert again.id == dead.id and again.attempts == 2
    assert store.recover(["host-worker0-aaaa/0"]) == {"requeued": 0, "failed": 0, "cancelled": 0}


def test_recover_gives_up_on_a_job_that_brought_its_worker_down_max_attempts_times(store):
    job = submit(store)
    for n in range(store.max_attempts):
        assert store.claim(f"w{n}/0", lease_s=LONG_LEASE_S).id == job.id
        store.recover([f"w{n}/0"])
    done = store.get(job.id)
    assert done.status == "failed" and done.error_type == "internal_error" and done.attempts == store.max_attempts
    assert "stopped 3 times" in done.error


def test_recover_cancels_the_jobs_of_a_dead_servers_sync_callers(store):
    running = submit(store, caller="api-serve0-dead")
    assert store.claim("gpu-worker0-x/0", lease_s=LONG_LEASE_S).id == running.id  # a worker elsewhere runs it
    queued = submit(store, caller="api-serve0-dead")
    unrelated = submit(store, caller="api-serve1-live")
    assert store.recover([], "api-serve0-dead") == {"requeued": 0, "failed": 0, "cancelled": 2}
    flagged = store.get(running.id)  # the live worker stops it at its next heartbeat
    assert flagged.status == "running" and flagged.cancel_requested
    gone = store.get(queued.id)
    assert gone.status == "cancelled" and gone.error == CALLER_GONE_ERROR and gone.started_at is None
    assert store.get(unrelated.id).status == "queued"


def test_a_sync_job_whose_server_died_is_not_run_again(store):
    """The server that held the caller's connection also ran the job: when its lease expires, both are gone."""
    sync = submit(store, caller="api-serve0-dead")
    polled = submit(store, caller="api-serve1-alive")  # its caller waits on another server: run it again
    assert store.claim("api-serve0-dead/0", lease_s=0.05).id == sync.id
    assert store.claim("gpu-worker0-x/0", lease_s=0.05).id == polled.id
    time.sleep(0.1)  # both leases expire (no heartbeat)
    again = store.claim("gpu-worker1-y/0")
    assert again.id == polled.id and again.attempts == 2
    assert store.claim("gpu-worker1-y/1") is None
    done = store.get(sync.id)
    assert done.status == "cancelled" and done.error == CALLER_GONE_ERROR and done.attempts == 1


def test_cancel_queued_leaves_running_jobs_alone(store):
    running, queued = submit(store), submit(store)
    store.claim("w/0", lease_s=LONG_LEASE_S)
    assert not store.cancel_queued(running.id)
    assert store.cancel_queued(queued.id)
    assert store.get(running.id).status == "running" and store.get(queued.id).status == "cancelled"
    assert not store.cancel_queued(queued.id) and not store.cancel_queued("unknown")


# ---- slots -----------------------------------------------------------------------------------------------
def test_slots_are_per_process_and_remember_the_previous_incarnation(tmp_path, store):
    first = ProcessSlot.acquire(tmp_path, "worker")
    sibling = ProcessSlot.acquire(tmp_path, "worker")
    assert first.slot.endswith("-worker0") and sibling.slot.endswith("-worker1")
    job = submit(store)
    first.start(store, first.auto_worker_ids(1))
    sibling.start(store, sibling.auto_worker_ids(1))
    assert store.claim(first.worker_ids[0], lease_s=LONG_LEASE_S).id == job.id
    first.close()  # (a killed process's lock goes the same way)
    again = ProcessSlot.acquire(tmp_path, "worker")
    assert again.slot == first.slot and again.process_id != first.process_id
    assert again.start(store, again.auto_worker_ids(1))["requeued"] == 1
    assert store.get(job.id).status == "queued"
    named = ProcessSlot.acquire(tmp_path, "worker", "gpu-7")
    with pytest.raises(SlotBusy, match="gpu-7"):
        ProcessSlot.acquire(tmp_path, "worker", "gpu-7")
    for slot in (sibling, again, named):
        slot.close()


def test_a_named_worker_takes_back_the_jobs_of_its_previous_incarnation(tmp_path, store):
    job = submit(store)
    named = ProcessSlot.acquire(tmp_path, "worker", "gpu-7")
    assert named.process_id == "gpu-7"
    named.start(store, ["gpu-7"])
    assert store.claim("gpu-7", lease_s=LONG_LEASE_S).id == job.id
    named.close()
    again = ProcessSlot.acquire(tmp_path, "worker", "gpu-7")
    assert again.start(store, ["gpu-7"])["requeued"] == 1
    assert store.claim("gpu-7").attempts == 2
    again.close()


# ---- a lost lease ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(request, tmp_path_factory) -> Engine:
    try:
        settings = request.getfixturevalue("demo_settings")
    except pytest.FixtureLookupError:
        settings = Settings(data_dir=tmp_path_factory.mktemp("demo-data"), demo=True)
    return Engine(replace(settings, demo=True, device="cpu"), Catalog.load())


class FrozenAfterFirstStep:
    """The engine, frozen after its first step until ``thaw`` is set (a stalled process: no progress, so no
    heartbeat); counts the steps it runs after thawing."""

    def __init__(self, engine):
        self.engine = engine
        self.frozen, self.thaw = threading.Event(), threading.Event()
        self.steps_after_thaw = 0
        self.told = lambda: True  # whether the worker has learnt of the loss (its reporter runs on its own thread)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def render(self, request, on_progress=None, should_cancel=None):
        def stall(progress):
            if not self.frozen.is_set():
                self.frozen.set()
                self.thaw.wait(120)
            else:
                self.steps_after_thaw += 1
                # however slow the machine, the report of the step before has been answered by now (one
                # bounded wait in all: a worker that never learns of the loss fails the test, not hangs it)
                self.deadline = getattr(self, "deadline", time.monotonic() + 120)
                while not self.told() and time.monotonic() < self.deadline:
                    time.sleep(0.01)
            on_progress(progress)

        return self.engine.render(request, stall, should_cancel)


def test_a_worker_that_lost_its_lease_stops_at_its_next_step_and_records_nothing(store, engine, tmp_path):
    engine.load("dev")
    job = submit(store, request=request(steps=100))
    frozen = FrozenAfterFirstStep(engine)
    old = Worker(store, frozen, LocalStorage(tmp_path / "files"), worker_id="old/0", lease_s=0.5,
                 heartbeat_s=3600)
    frozen.told = lambda: old._run_state is not None and old._run_state.stop_reason is not None
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(old.run_once()))
    runner.start()
    try:
        assert frozen.frozen.wait(120)
        taken = wait_until(lambda: store.claim("new/0", lease_s=LONG_LEASE_S), what="the lease expiring")
        assert taken.id == job.id and taken.attempts == 2
    finally:
        frozen.thaw.set()
        runner.join(120)
    assert not runner.is_alive()
    assert frozen.steps_after_thaw <= 2  # its next report learnt of the loss; it stopped at the step after
    current = store.get(job.id)
    assert current.status == "running" and current.worker_id == "new/0" and current.result is None
    assert outcome[0].worker_id == "new/0" and old.jobs_done == 1
    assert store.complete(job.id, "new/0", {"images": [], "seed": 1}).status == "completed"
    assert store.get(job.id).result == {"images": [], "seed": 1}


# ---- killed processes ------------------------------------------------------------------------------------
@pytest.fixture
def data_dir(engine, tmp_path) -> Path:
    """A data directory of its own (its own slots), sharing the demo weights."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "cache").symlink_to(Path(engine.settings.data_dir) / "cache", target_is_directory=True)
    return root


def _launch(tmp_path: Path, args: list[str], step_s: float) -> subprocess.Popen:
    env = dict(os.environ, FLUXSERVE_DEVICE="cpu", FLUXSERVE_STEP_DELAY_S=str(step_s))
    return subprocess.Popen([sys.executable, str(LAUNCHER), *args], env=env, stderr=subprocess.PIPE, text=True)


def _start_worker(tmp_path, db_url, data_dir, step_s: float) -> tuple[subprocess.Popen, str]:
    proc = _launch(tmp_path, ["worker", "--demo", "--db", db_url, "--storage", str(tmp_path / "files"),
                              "--data-dir", str(data_dir), "--lease", str(LONG_LEASE_S)], step_s)
    lines = []
    while "fluxserve worker" not in (line := proc.stderr.readline()):
        assert line, f"the worker did not start: {''.join(lines)}"
        lines.append(line)
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
    proc.log = lines
    process_id = line.split(" worker(s) ")[1].split(" on ")[0]
    return proc, f"{process_id}/0"


def _kill(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_a_killed_worker_restarted_takes_its_job_back_at_once_and_leaves_its_sibling_alone(
        db_url, data_dir, tmp_path):
    store = JobStore(db_url)
    procs = []
    try:
        first, first_id = _start_worker(tmp_path, db_url, data_dir, step_s=1.0)
        sibling, sibling_id = _start_worker(tmp_path, db_url, data_dir, step_s=1.0)
        procs += [first, sibling]
        assert first_id.split("-worker")[1][0] != sibling_id.split("-worker")[1][0]  # slots 0 and 1
        jobs = [submit(store), submit(store)]
        wait_until(lambda: all(store.get(j.id).status == "running" for j in jobs), 120, "both jobs running")
        held = {store.get(j.id).worker_id: j.id for j in jobs}
        assert set(held) == {first_id, sibling_id}
        first.send_signal(signal.SIGKILL)
        first.wait(30)

        again, again_id = _start_worker(tmp_path, db_url, data_dir, step_s=0.01)
        procs.append(again)
        assert again_id != first_id and again_id.split("-", 1)[0] == first_id.split("-", 1)[0]
        done = wait_until(lambda: (j := store.get(held[first_id])).status == "completed" and j,
                          RECOVERY_BOUND_S, "the killed worker's job completing")
        assert done.worker_id == again_id and done.attempts == 2
        assert any("1 back in the queue" in line for line in again.log)
        live = store.get(held[sibling_id])  # the live sibling's job was never taken from it
        assert live.worker_id == sibling_id and live.attempts == 1 and live.status in ("running", "completed")
        assert not any("stopped responding" in line.message for line in store.logs(live.id))
    finally:
        _kill(*procs)
        store.close()


def _start_server(tmp_path, data_dir, db_url, port: int, step_s: float) -> subprocess.Popen:
    proc = _launch(tmp_path, ["serve", "--demo", "--db", db_url, "--storage", str(tmp_path / "files"),
                              "--data-dir", str(data_dir), "--port", str(port)], step_s)
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    wait_until(lambda: _healthy(port) or proc.poll() is not None, 120, "the server starting")
    assert proc.poll() is None, "the server exited"
    return proc


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_sync_request_of_a_killed_server_is_not_run_again_after_a_restart(data_dir, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    port = free_port()
    server = _start_server(tmp_path, data_dir, db_url, port, step_s=1.0)
    store = JobStore(db_url)
    try:
        def call() -> None:
            try:
                httpx.post(f"http://127.0.0.1:{port}/fal-ai/flux-2", json={"prompt": "a lighthouse",
                           "image_size": {"width": 512, "height": 512}, "num_inference_steps": 20}, timeout=300)
            except httpx.HTTPError:
                pass  # the server is killed under it

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        job = wait_until(lambda: next((j for j in store.list() if j.status == "running"), None), 120,
                         "the sync job running")
        assert job.caller and job.worker_id.startswith(job.caller + "/")
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        caller.join(30)

        server = _start_server(tmp_path, data_dir, db_url, port, step_s=0.01)
        done = store.get(job.id)  # recovered at start, before the restarted server answered /health
        assert done.status == "cancelled" and done.error == CALLER_GONE_ERROR and done.attempts == 1
        queued = httpx.post(f"http://127.0.0.1:{port}/fal-ai/flux-2", headers={"Host": "queue.fal.run"},
                            json={"prompt": "a lighthouse", "num_inference_steps": 4}, timeout=60)
        assert queued.status_code == 200, queued.text
        assert store.get(queued.json()["request_id"]).caller is None  # a queued request is polled, not waited on
    finally:
        _kill(server)
        store.close()


# ---- callers that disconnect -----------------------------------------------------------------------------
def _post_and_hang_up(port: int, path: str, body: dict, store: JobStore, dialect: str) -> str:
    """POST over a raw socket, wait for the job to be queued, then close the connection unanswered."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        job = wait_until(lambda: next(iter(store.list(dialect=dialect, status="queued")), None), 60,
                         "the job queued")
    return job.id


@pytest.mark.parametrize("dialect, path, body", [
    ("fal", "/fal-ai/flux-2", {"prompt": "a lighthouse", "num_inference_steps": 4}),
    ("fal", "/fal-ai/flux-2/stream", {"prompt": "a lighthouse", "num_inference_steps": 4}),
    ("openai", "/v1/images/generations", {"prompt": "a lighthouse", "n": 1}),
    ("openai", "/v1/images/generations", {"prompt": "a lighthouse", "stream": True}),
])
def test_a_sync_caller_that_hangs_up_has_its_queued_job_cancelled(engine, dialect, path, body):
    settings = settings_for(replace(engine.settings, demo=True, device="cpu"), f"hangup-{dialect}")
    with Server(settings, start_workers=False) as server:  # no workers: the job stays queued
        job_id = _post_and_hang_up(server.port, path, body, server.store, dialect)
        assert server.store.get(job_id).caller == server.app.state.process_id
        done = wait_until(lambda: (j := server.store.get(job_id)).terminal and j, 60, "the job cancelled")
        assert done.status == "cancelled" and done.started_at is None


def test_an_openai_caller_with_an_idempotency_key_may_come_back(engine):
    settings = settings_for(replace(engine.settings, demo=True, device="cpu"), "hangup-idempotent")
    with Server(settings, start_workers=False) as server:
        payload = json.dumps({"prompt": "a lighthouse"}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Idempotency-Key: k1\r\n" + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            job = wait_until(lambda: next(iter(server.store.list(dialect="openai")), None), 60, "the job queued")
        assert job.caller is None
        time.sleep(2 * 1.0)  # two of the request's disconnect checks (waits.CHECK_EVERY_S)
        assert server.store.get(job.id).status == "queued"
