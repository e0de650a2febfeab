"""Workers with the real engine (tiny demo models, 256x256, few steps) on SQLite and PostgreSQL: outputs, step
logs, previews, errors, cancel, timeouts, dead workers, restarts, clean shutdown and the worker command."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from PIL import Image

from fluxserve.catalog import Catalog
from fluxserve.config import Settings
from fluxserve.engine import Engine
from fluxserve.jobs.store import Job, JobStore
from fluxserve.jobs.worker import Worker
from fluxserve.storage import LocalStorage

pytest_plugins = ["db_fixtures"]


@pytest.fixture(scope="module")
def engine_settings(request, tmp_path_factory) -> Settings:
    """The suite's demo settings (tests/conftest.py) when there are any, else demo models built here."""
    try:
        settings = request.getfixturevalue("demo_settings")
    except pytest.FixtureLookupError:
        settings = Settings(data_dir=tmp_path_factory.mktemp("demo-data"), demo=True)
    return replace(settings, demo=True, device="cpu")


@pytest.fixture(scope="module")
def engine(engine_settings) -> Engine:
    return Engine(engine_settings, Catalog.load())


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "files")


@pytest.fixture
def finished() -> list[Job]:
    return []


@pytest.fixture
def worker(store, engine, storage, finished):
    worker = Worker(store, engine, storage, on_finished=finished.append, poll_s=0.2).start()
    yield worker
    worker.stop(timeout=60)


def request(**overrides) -> dict:
    return {"model": "dev", "prompt": "a red lighthouse", "width": 256, "height": 256, "steps": 2,
            "seed": 7, **overrides}


def submit(store: JobStore, **kwargs) -> Job:
    kwargs.setdefault("request", request())
    return store.submit(endpoint="fal-ai/flux-2", dialect="fal", **kwargs)


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_job_runs_to_completion(store, worker, storage, finished):
    job = submit(store, request=request(num_images=2))
    done = store.wait(job.id, timeout=120)
    assert done.status == "completed", (done.error, done.error_type)
    result = done.result
    assert result["seed"] == 7 and result["prompt"] == "a red lighthouse"
    assert result["has_nsfw_concepts"] == [False, False]
    assert set(result["timings"]) >= {"inference"}
    assert len(result["images"]) == 2
    for image in result["images"]:
        assert image["key"].startswith("outputs/") and image["content_type"] == "image/png"
        data, content_type = storage.get(image["key"])
        assert content_type == "image/png"
        assert Image.open(io.BytesIO(data)).size == (256, 256) == (image["width"], image["height"])
    assert [line.message for line in store.logs(job.id)] == ["step 1/2", "step 2/2"]
    assert done.step == 2 and done.total_steps == 2 and done.worker_id == worker.worker_id
    assert done.attempts == 1 and done.started_at is not None and done.completed_at is not None
    assert [j.id for j in finished] == [job.id] and finished[0].status == "completed"


def test_previews_are_stored_and_named_on_log_lines(store, worker, storage):
    job = submit(store, request=request(steps=4, partial_images=2))
    assert store.wait(job.id, timeout=120).status == "completed"
    previews = [line.preview_key for line in store.logs(job.id) if line.preview_key]
    assert previews, [line.message for line in store.logs(job.id)]
    for key in previews:
        assert key.startswith("previews/")
        data, content_type = storage.get(key)
        assert content_type.startswith("image/") and len(data) > 0


def test_priorities_run_normal_before_low(store, engine, storage):
    low = submit(store, priority="low")
    normal = submit(store)
    worker = Worker(store, engine, storage)
    first = worker.run_once()
    assert first.id == normal.id and first.status == "completed"
    assert worker.run_once().id == low.id
    assert worker.run_once() is None


def test_a_small_keys_job_runs_before_a_big_keys_backlog_drains(store, engine, storage):
    """Fair scheduling (fluxserve.jobs.fairness) with the real worker: key B's one job, submitted after key A's
    backlog, is among the next two jobs run; A's jobs run in their order."""
    backlog = [submit(store, owner="key-a", request=request(seed=n)) for n in range(6)]
    small = submit(store, owner="key-b")
    worker = Worker(store, engine, storage)
    ran = [worker.run_once() for _ in range(7)]
    assert all(job.status == "completed" for job in ran)
    assert small.id in [job.id for job in ran[:2]]
    assert [job.id for job in ran if job.owner == "key-a"] == [job.id for job in backlog]
    assert worker.run_once() is None


def test_bad_inputs_fail_with_a_validation_error(store, worker):
    missing = submit(store, request={"model": "dev", "width": 256, "height": 256})
    unknown_model = submit(store, request=request(model="no-such-model"))
    bad_reference = submit(store, request=request(image_urls=["/nonexistent/ref.png"]))
    for job in (missing, unknown_model, bad_reference):
        done = store.wait(job.id, timeout=120)
        assert done.status == "failed" and done.error_type == "validation_error", (done.error, done.error_type)
    assert "prompt" in store.get(missing.id).error
    assert store.get(missing.id).error_detail["field"] == "prompt"
    assert store.get(unknown_model.id).error_detail["field"] == "model"
    assert store.get(bad_reference.id).error_detail["field"].startswith("image_urls")


def test_an_internal_error_fails_the_job_and_the_worker_keeps_going(store, worker, storage):
    root = storage.root
    shutil.rmtree(root)
    root.write_text("not a directory any more")  # every output write now fails
    job = submit(store)
    failed = store.wait(job.id, timeout=120)
    assert failed.status == "failed" and failed.error_type == "internal_error"
    assert "could not store the outputs" in failed.error
    assert any(line.level == "ERROR" for line in store.logs(job.id))
    root.unlink()
    root.mkdir()
    again = submit(store)
    assert store.wait(again.id, timeout=120).status == "completed"
    assert worker.running


def _wait_running(store: JobStore, job_id: str) -> None:
    wait_until(lambda: store.get(job_id).status == "running" and store.logs(job_id), timeout=120)


@pytest.mark.parametrize("from_another_process", [False, True])
def test_cancel_stops_a_running_job_at_the_next_step(store, db_url, worker, finished, from_another_process):
    job = submit(store, request=request(steps=100))
    _wait_running(store, job.id)
    api_store = JobStore(db_url) if from_another_process else store
    try:
        assert api_store.request_cancel(job.id) == "CANCELLATION_REQUESTED"
        done = store.wait(job.id, timeout=60)
    finally:
        if from_another_process:
            api_store.close()
    assert done.status == "cancelled" and done.error_type == "cancelled"
    assert done.step < 100 and done.result is None
    wait_until(lambda: finished)  # on_finished runs just after the job became terminal
    assert finished[-1].id == job.id and finished[-1].status == "cancelled"
    assert store.request_cancel(job.id) == "ALREADY_COMPLETED"


def test_a_queued_job_cancelled_behind_a_running_one_never_runs(store, worker):
    running = submit(store, request=request(steps=20))
    queued = submit(store)
    assert store.request_cancel(queued.id) == "CANCELLATION_REQUESTED"
    assert store.get(queued.id).status == "cancelled"
    assert store.wait(running.id, timeout=120).status == "completed"
    cancelled = store.get(queued.id)
    assert cancelled.status == "cancelled" and cancelled.started_at is None and cancelled.attempts == 0


class SlowSteps:
    """The engine with every denoising step at least ``step_s`` long, so a timeout is reached whatever the
    machine's speed."""

    def __init__(self, engine, step_s: float):
        self.engine, self.step_s = engine, step_s

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def render(self, request, on_progress=None, should_cancel=None):
        def slow(progress):
            time.sleep(self.step_s)
            if on_progress is not None:
                on_progress(progress)

        return self.engine.render(request, on_progress=slow, should_cancel=should_cancel)


def test_a_running_job_past_its_timeout_is_stopped(store, engine, storage):
    engine.load("dev")
    job = submit(store, request=request(steps=100), timeout_s=1.0)  # 100 steps of >= 50 ms: >= 5 s
    worker = Worker(store, SlowSteps(engine, 0.05), storage)
    done = worker.run_once()
    assert done.id == job.id
    assert done.status == "failed" and done.error_type == "request_timeout" and done.error == "Request timed out"
    assert done.started_at is not None and (done.step or 0) < 100  # stopped before the end


def test_a_job_of_a_dead_worker_is_claimed_again_and_completes(store, engine, storage):
    job = submit(store)
    assert store.claim("worker-that-died", lease_s=0.3).id == job.id  # and never heartbeats
    worker = Worker(store, engine, storage, poll_s=0.1).start()
    try:
        done = store.wait(job.id, timeout=120)
        deadline = time.monotonic() + 60
        while done.status != "completed" and time.monotonic() < deadline:
            done = store.wait(job.id, timeout=1)
    finally:
        worker.stop()
    assert done.status == "completed" and done.worker_id == worker.worker_id and done.attempts == 2


def test_a_job_accepted_before_a_restart_is_run_after_it(db_url, engine, storage):
    api = JobStore(db_url)
    job = submit(api)
    api.close()  # the server goes away with the job queued
    restarted = JobStore(db_url)
    worker = Worker(restarted, engine, storage).start()
    try:
        assert restarted.wait(job.id, timeout=120).status == "completed"
    finally:
        worker.stop()
        restarted.close()


def test_an_idle_worker_is_woken_by_a_submit_not_by_polling(store, engine, storage):
    worker = Worker(store, engine, storage, poll_s=3600).start()  # it would not poll again within this test
    try:
        time.sleep(0.2)  # let it go idle
        for _ in range(2):
            job = submit(store)
            assert store.wait(job.id, timeout=120).status == "completed"
    finally:
        worker.stop()


def test_stop_finishes_cleanly_and_claims_nothing_more(store, engine, storage):
    worker = Worker(store, engine, storage, poll_s=0.1).start()
    job = submit(store)
    assert store.wait(job.id, timeout=120).status == "completed"
    worker.stop()
    assert not worker.running
    later = submit(store)
    time.sleep(0.3)
    assert store.get(later.id).status == "queued"


def test_stop_with_no_grace_returns_the_running_job_to_the_queue(store, engine, storage):
    worker = Worker(store, engine, storage, poll_s=0.1).start()
    job = submit(store, request=request(steps=100))
    _wait_running(store, job.id)
    worker.stop(timeout=0)
    back = store.get(job.id)
    assert back.status == "queued" and back.worker_id is None and back.attempts == 0
    assert store.claim("next").id == job.id


def _cli_env(engine_settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["FLUXSERVE_DEVICE"] = "cpu"
    return env


def test_worker_command_once(db_url, engine_settings, tmp_path, capsys, monkeypatch):
    from fluxserve.cli import main

    monkeypatch.setenv("FLUXSERVE_DEVICE", "cpu")
    store = JobStore(db_url)
    try:
        job = submit(store)
        files = tmp_path / "cli-files"
        argv = ["worker", "--once", "--demo", "--db", db_url, "--storage", str(files),
                "--data-dir", str(engine_settings.data_dir)]
        assert main(argv) == 0
        assert "queue empty after 1 job(s)" in capsys.readouterr().err
        done = store.get(job.id)
        assert done.status == "completed"
        assert (files / done.result["images"][0]["key"]).is_file()
        assert main([*argv, "--models", "nope"]) == 2
        assert "--models: unknown model(s) nope" in capsys.readouterr().err
    finally:
        store.close()


def test_worker_command_stops_cleanly_on_sigterm(engine_settings, tmp_path):
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    data_dir = tmp_path / "data"  # its own worker slots (a named worker runs once per data directory)
    data_dir.mkdir()
    (data_dir / "cache").symlink_to(engine_settings.data_dir / "cache", target_is_directory=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxserve", "worker", "--demo", "--db", db, "--storage", str(tmp_path / "f"),
         "--data-dir", str(data_dir), "--worker-id", "gpu-7", "--grace", "0"],
        env=_cli_env(engine_settings), stderr=subprocess.PIPE, text=True,
    )
    try:
        banner = proc.stderr.readline()
        assert "fluxserve worker" in banner and "gpu-7" in banner
        store = JobStore(db)
        job = submit(store, request=request(steps=100))
        wait_until(lambda: store.get(job.id).status == "running", timeout=120)
        assert store.get(job.id).worker_id == "gpu-7"
        proc.send_signal(signal.SIGTERM)  # --grace 0: the running job goes back to the queue
        assert proc.wait(timeout=60) == 0
        assert "received SIGTERM" in proc.stderr.read()
        back = store.get(job.id)
        assert back.status == "queued" and back.worker_id is None
        store.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_keys_command(db_url, capsys):
    from fluxserve.cli import main

    assert main(["keys", "create", "--name", "ci", "--db", db_url]) == 0
    secret = capsys.readouterr().out.strip()
    store = JobStore(db_url)
    try:
        assert store.verify_key(secret)
        key_id = secret.split(":")[0]
        assert main(["keys", "list", "--db", db_url]) == 0
        listing = capsys.readouterr().out
        assert key_id in listing and "ci" in listing and "active" in listing and secret not in listing
        assert main(["keys", "revoke", key_id, "--db", db_url]) == 0
        assert not store.verify_key(secret)
        assert main(["keys", "revoke", key_id, "--db", db_url]) == 1
    finally:
        store.close()


def test_worker_threads_share_one_engine_without_running_a_job_twice(store, engine, storage):
    jobs = [submit(store) for _ in range(4)]
    workers = [Worker(store, engine, storage, poll_s=0.1).start() for _ in range(2)]
    try:
        done = [store.wait(job.id, timeout=120) for job in jobs]
    finally:
        for w in workers:
            w.stop()
    assert all(j.status == "completed" and j.attempts == 1 for j in done)
    assert sum(w.jobs_done for w in workers) == 4


# ---- the GPU part and the encoding overlap ------------------------------------------------------------------
class HeldEncoding:
    """The engine with every job's encoding held until ``release`` is set; ``rendered[prompt]`` is set when that
    job's GPU part has ended, ``encoding`` when an encoding is waiting for ``release``."""

    def __init__(self, engine, prompts: list[str]):
        self.engine = engine
        self.rendered = {prompt: threading.Event() for prompt in prompts}
        self.encoding, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def render(self, request, on_progress=None, should_cancel=None):
        rendered = self.engine.render(request, on_progress, should_cancel)
        self.rendered[request.prompt].set()
        return rendered

    def encode_images(self, rendered):
        self.encoding.set()
        assert self.release.wait(120), "the test never released the encoding"
        return self.engine.encode_images(rendered)


def test_the_gpu_runs_the_next_job_while_the_last_one_encodes(store, engine, storage, finished):
    engine.load("dev")
    held = HeldEncoding(engine, ["first", "second", "third"])
    jobs = [submit(store, request=request(prompt=prompt)) for prompt in ("first", "second", "third")]
    worker = Worker(store, held, storage, on_finished=finished.append, poll_s=0.1, heartbeat_s=0.05).start()
    try:
        assert held.encoding.wait(120)  # the first job's images are held before they are encoded...
        assert held.rendered["second"].wait(120)  # ...and meanwhile the GPU ran the second job's part, whole
        first = store.get(jobs[0].id)
        assert first.status == "running" and first.result is None and first.worker_id == worker.worker_id
        # the held job stays leased: its heartbeats go on while it waits for its encoding
        wait_until(lambda: store.get(jobs[0].id).lease_expires_at > first.lease_expires_at)
        assert store.get(jobs[1].id).status == "running"
        # two jobs held (one encoding, one waiting to): the worker claims no third until one is finished
        assert store.get(jobs[2].id).status == "queued"
    finally:
        held.release.set()
    try:
        done = [store.wait(job.id, timeout=120) for job in jobs]
        wait_until(lambda: len(finished) == 3)
    finally:
        worker.stop()
    assert all(job.status == "completed" and job.attempts == 1 for job in done), [j.error for j in done]
    assert [job.result["prompt"] for job in done] == ["first", "second", "third"]
    assert sorted(job.id for job in finished) == sorted(job.id for job in jobs)  # each finished once
    for job in done:
        assert set(job.result["timings"]) >= {"encoding", "inference"}
        assert job.result["timings"]["inference"] >= job.result["timings"]["encoding"] > 0
        data, content_type = storage.get(job.result["images"][0]["key"])
        assert content_type == "image/png" and Image.open(io.BytesIO(data)).size == (256, 256)


def test_a_job_whose_lease_lapsed_while_it_waited_to_encode_is_left_to_its_new_worker(store, engine, storage):
    engine.load("dev")
    held = HeldEncoding(engine, ["first"])
    job = submit(store, request=request(prompt="first"))
    # no heartbeat between progress lines: once the GPU part is over, the lease lapses while the encoding is held
    old = Worker(store, held, storage, worker_id="old/0", lease_s=0.5, heartbeat_s=3600)
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(old.run_once()))
    runner.start()
    try:
        assert held.encoding.wait(120)
        deadline = time.monotonic() + 60
        while (taken := store.claim("new/0", lease_s=600)) is None:
            assert time.monotonic() < deadline, "the lease never lapsed"
            time.sleep(0.05)
        assert taken.id == job.id and taken.attempts == 2
    finally:
        held.release.set()
        runner.join(120)
    assert not runner.is_alive()
    current = store.get(job.id)
    assert current.status == "running" and current.worker_id == "new/0" and current.result is None
    assert outcome[0].worker_id == "new/0" and old.jobs_done == 1
