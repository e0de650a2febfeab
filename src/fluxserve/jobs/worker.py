"""A worker thread: claims jobs from the store, runs the engine, stores outputs, records the outcome.

A job runs in two stages. The engine stage, in the worker's thread and holding the engine's lock: the GPU part
(``Engine.render``: text encoding to safety; a training job or an upstream request runs whole here). Then the
finishing stage, on the worker's finisher thread: the images encoded into files (``Engine.encode_images``, on
the engine's encoding pool), stored, and the outcome recorded. Meanwhile the worker claims the next job and the
GPU runs it. A worker holds at most ``1 + encode_ahead`` jobs (``encode_ahead`` defaults to 1): it claims a job
only when one of those places is free, so the images waiting to be encoded stay bounded and no queued job is
held by a worker that cannot start it (``encode_ahead=0``: one job at a time, as a single stage).

The engine thread never waits on the database or storage between steps: progress lines and previews go to a
per-job reporter thread, which writes them together with the heartbeat and keeps the lease alive from the claim
until the job's images are encoded (while a model loads, and while the job waits to be encoded). Cancels
requested through the same store are seen at the next step without a database read; cancels from other
processes arrive with the next heartbeat (every ``heartbeat_s``). A job whose GPU part has ended completes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fluxserve.inputs import image_type
from fluxserve.jobs.store import (
    BLOCKED_ERROR_TYPE,
    CANCELLED_ERROR,
    CANCELLED_ERROR_TYPE,
    TIMEOUT_ERROR,
    TIMEOUT_ERROR_TYPE,
    Job,
    JobStore,
    utcnow,
)
from fluxserve.jobs.training import TrainedLora, run_training, save_trained
from fluxserve.request import (
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    InputError,
    Progress,
    TrainingRequest,
)
from fluxserve.storage import Storage
from fluxserve.upstream.gateway import RunLocally
from fluxserve.usage import billable

log = logging.getLogger(__name__)

# one engine runs one generation at a time (per device): workers sharing an engine take turns
_engine_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_engine_locks_guard = threading.Lock()


def _engine_lock(engine: Any) -> threading.Lock:
    if not getattr(engine, "gpu", True):  # the gateway: no device to take turns on
        return threading.Lock()
    with _engine_locks_guard:
        try:
            return _engine_locks.setdefault(engine, threading.Lock())
        except TypeError:  # not weak-referenceable
            return threading.Lock()


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"



def blocked_message(flagged: list[int], count: int) -> str:
    """The log line (and, where the request asks for it, the error) for images the safety checker blocked."""
    if count == 1:
        return "NSFW content detected in the output image: the safety checker blocked it"
    which = ", ".join(str(i + 1) for i in flagged)
    return (f"NSFW content detected in {len(flagged)} of {count} output images (image {which}): "
            "the safety checker blocked them")

class _Run:
    """The state of one job while a worker runs it."""

    def __init__(self, job: Job):
        self.job = job
        self.stop_reason: str | None = None  # "cancel" | "timeout" | "lease" | "shutdown"
        self.step: int | None = None
        self.total: int | None = None
        self.engine_seconds = 0.0  # the engine stage's time on the job (the GPU's), whatever the outcome
        self.pending: list[tuple[dict, bytes | None]] = []  # (log line, preview bytes)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.done = threading.Event()  # the engine's work on the job (its encoding included) has ended
        self.reporter: Future | None = None

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


@dataclass
class _ToEncode:
    """An engine stage's images, as pixels: the finishing stage encodes them (``engine.encode_images``)."""

    rendered: Any


class Worker:
    """``Worker(store, engine, storage, worker_id=None, on_finished=None)``; ``start()`` / ``stop()``."""

    def __init__(self, store: JobStore, engine: Any, storage: Storage, worker_id: str | None = None,
                 on_finished: Callable[[Job], None] | None = None, *, lease_s: float = 30.0,
                 heartbeat_s: float = 0.5, poll_s: float = 1.0, models: list[str] | None = None,
                 kinds: list[str] | None = None, note: Callable[[Job], str | None] | None = None,
                 encode_ahead: int = 1):
        self.store = store
        self.engine = engine
        self.storage = storage
        self.worker_id = worker_id or default_worker_id()
        self.on_finished = on_finished
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.models = models
        self.kinds = kinds  # the job kinds this worker takes ("generate", "train"); None: all
        self.note = note  # a first log line for a job, or None (which weights serve a routed endpoint)
        self.jobs_done = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_state: _Run | None = None  # the job in its engine stage
        self._engine_lock = _engine_lock(engine)
        # the jobs this worker holds at once: one in its engine stage, up to encode_ahead finishing
        self._places = threading.Semaphore(1 + max(0, encode_ahead))
        # Long-lived reporter threads (one per job held) and one finisher: the store keeps a connection per
        # thread, so a thread per job would open a new database connection for every job (~10 ms on PostgreSQL).
        self._reporter = ThreadPoolExecutor(max_workers=1 + max(0, encode_ahead),
                                            thread_name_prefix=f"reporter-{self.worker_id}")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"finisher-{self.worker_id}")
        self._finishing: set[Future] = set()
        self._finishing_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r})"

    @property
    def current_job_id(self) -> str | None:
        """The job in its engine stage, if any."""
        run = self._run_state
        return run.job.id if run is not None else None

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> Worker:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.worker_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop claiming; let the job on the engine finish for up to ``timeout`` seconds, then stop it at the next
        step and give it back to the queue for another worker. Jobs past their GPU part are finished (encoded,
        stored, recorded) before this returns."""
        self.request_stop()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            run = self._run_state
            if run is not None:
                run.stop("shutdown")
            thread.join()
        with self._finishing_lock:
            finishing = list(self._finishing)
        wait(finishing)
        self._thread = None

    def request_stop(self) -> None:
        """Stop claiming new jobs (returns at once; ``stop`` waits)."""
        self._stopping.set()
        self.store.wake_all()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                version = self.store.work_version()
                if self._start_next() is None and not self._stopping.is_set():
                    self.store.wait_for_work(version, self.poll_s)
            except Exception:
                log.exception("worker %s: unexpected error; retrying in %.1fs", self.worker_id, self.poll_s)
                self._stopping.wait(self.poll_s)

    # --- one job --------------------------------------------------------------------------------------

    def run_once(self) -> Job | None:
        """Claim and run one job, and wait for it to be finished; the job as it ended, or None when there was
        none."""
        finishing = self._start_next()
        return None if finishing is None else finishing.result()

    def _start_next(self) -> Future | None:
        """Wait for a free place, claim a job and run its engine stage in the calling thread, then hand it to the
        finishing stage; that stage's future (the job as it ended), or None when there was no job to claim."""
        self._places.acquire()
        try:
            run, outcome = self._engine_stage()
            if run is None:
                self._places.release()
                return None
        except BaseException:
            self._places.release()
            raise
        try:
            finishing = self._finisher.submit(self._finishing_stage, run, outcome)
        except BaseException:  # the finisher is gone (interpreter shutdown): the lease lapses, the job runs again
            self._stop_reporting(run)
            self._places.release()
            raise
        with self._finishing_lock:
            self._finishing.add(finishing)
        finishing.add_done_callback(self._finished)
        return finishing

    def _finished(self, finishing: Future) -> None:
        with self._finishing_lock:
            self._finishing.discard(finishing)

    def _engine_stage(self) -> tuple[_Run | None, Any]:
        """Claim a job and run its engine part, holding the engine's lock; (None, None) when there was none."""
        with self._engine_lock:
            if self._stopping.is_set() and self._thread is not None:
                return None, None
            job = self.store.claim(self.worker_id, self.lease_s, self.models, self.kinds)
            if job is None:
                return None, None
            run = _Run(job)
            run.reporter = self._reporter.submit(self._report_loop, run)
            self._run_state = run
            try:
                return run, self._generate(run)
            except BaseException:
                self._stop_reporting(run)
                raise
            finally:
                self._run_state = None

    def _finishing_stage(self, run: _Run, outcome: Any) -> Job | None:
        """Encode the images (keeping the lease alive meanwhile), store them and record the outcome; the job as
        it ended. Frees the worker's place for another job."""
        try:
            try:
                if isinstance(outcome, _ToEncode):
                    outcome = self._encode(run, outcome)
            finally:
                self._stop_reporting(run)
            finished = self._finish(run, outcome)
            self.jobs_done += 1
        except BaseException:
            log.exception("worker %s: could not finish job %s", self.worker_id, run.job.id)
            raise
        finally:
            self._places.release()
        if finished is not None and self.on_finished is not None:
            try:
                self.on_finished(finished)
            except Exception:
                log.exception("on_finished failed for job %s", run.job.id)
        return finished or self.store.get(run.job.id)

    def _encode(self, run: _Run, outcome: _ToEncode) -> GenerationResult | BaseException | None:
        """The encoded images, the error that stopped them, or None when the job is no longer this worker's."""
        if run.stop_reason == "lease":
            return None
        try:
            return self.engine.encode_images(outcome.rendered)
        except Exception as e:
            log.exception("job %s: encoding failed on worker %s", run.job.id, self.worker_id)
            return e

    @staticmethod
    def _stop_reporting(run: _Run) -> None:
        """End the job's reporter (its pending lines are then written with the outcome) and wait for it."""
        run.done.set()
        run.wake.set()
        if run.reporter is not None:
            run.reporter.result()

    def _generate(self, run: _Run) -> GenerationResult | TrainedLora | _ToEncode | BaseException:
        job = run.job
        try:
            model = TrainingRequest if job.kind == "train" else GenerationRequest
            request = model.model_validate(job.request)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "request"
            return InputError(field, first["msg"])

        def on_progress(progress: Progress) -> None:
            line = {"message": progress.message or f"step {progress.step}/{progress.total}",
                    "timestamp": utcnow()}
            with run.lock:
                run.step, run.total = progress.step, progress.total
                run.pending.append((line, progress.preview))
            run.wake.set()

        def should_cancel() -> bool:
            if run.stop_reason is not None:
                return True
            if self.store.cancel_requested(job.id):
                run.stop("cancel")
            elif job.timeout_at is not None and utcnow() >= job.timeout_at:
                run.stop("timeout")
            return run.stop_reason is not None

        if self.note is not None and (line := self.note(job)):
            on_progress(Progress(step=0, total=0, message=line))
        started = time.perf_counter()
        try:
            if job.kind == "train":
                return run_training(self.engine, self.storage, request, on_progress, should_cancel)
            if hasattr(self.engine, "run_job"):  # the gateway: the endpoint's routes
                result = self.engine.run_job(job, request, on_progress, should_cancel)
            else:  # this server's engine: the GPU part here, the encoding in the finishing stage
                return _ToEncode(self.engine.render(request, on_progress, should_cancel))
        except (GenerationCancelled, InputError, RunLocally) as e:
            return e
        except Exception as e:
            log.exception("job %s failed on worker %s", job.id, self.worker_id)
            return e
        finally:
            run.engine_seconds = time.perf_counter() - started if getattr(self.engine, "gpu", True) else 0.0
        result.timings.setdefault("inference", run.engine_seconds)
        return result

    def _report_loop(self, run: _Run) -> None:
        """Write progress lines, previews and heartbeats until the engine's work on the job ends, encoding included
        (the lines still pending then are written with the job's outcome, in the same transaction)."""
        last = time.monotonic()
        while True:
            run.wake.wait(self.heartbeat_s)
            run.wake.clear()
            if run.done.is_set():
                return
            with run.lock:
                pending, run.pending = run.pending, []
                step, total = run.step, run.total
            if pending or time.monotonic() - last >= self.heartbeat_s:
                try:
                    lines = self._lines(pending)
                    if not self.store.report(run.job.id, self.worker_id, step, total, lines) \
                            and run.stop_reason is None:
                        current = self.store.get(run.job.id)
                        run.stop("cancel" if current is not None and current.cancel_requested else "lease")
                except Exception:
                    log.exception("heartbeat for job %s failed; retrying", run.job.id)
                last = time.monotonic()

    def _lines(self, pending: list[tuple[dict, bytes | None]]) -> list[dict]:
        """Log lines with their previews stored."""
        lines = []
        for line, preview in pending:
            if preview:
                content_type = image_type(preview) or "image/png"
                line["preview_key"] = self.storage.put(preview, content_type, prefix="previews")
            lines.append(line)
        return lines

    def _finish(self, run: _Run, outcome: GenerationResult | TrainedLora | BaseException | None) -> Job | None:
        """Record the outcome; the terminal job, or None when this worker no longer holds it (then nothing is
        stored or written)."""
        job, store, wid = run.job, self.store, self.worker_id
        if outcome is None or (run.stop_reason == "lease" and not isinstance(outcome, BaseException)):
            log.warning("worker %s lost the lease on job %s; leaving it to its new worker", wid, job.id)
            return None
        local = getattr(self.engine, "gpu", True)
        spent = {"gpu_seconds": run.engine_seconds, "steps": (run.step or 0) if local else 0,
                 "provider": "local" if local else None}
        try:
            lines = self._lines(run.pending)
        except Exception:
            log.exception("could not store the previews of job %s", job.id)
            lines = [line for line, _preview in run.pending]
        if isinstance(outcome, GenerationCancelled) or (
            isinstance(outcome, BaseException) and run.stop_reason in ("lease", "shutdown")
        ):
            reason = run.stop_reason or "cancel"
            if reason == "timeout":
                return store.fail(job.id, TIMEOUT_ERROR, TIMEOUT_ERROR_TYPE, worker_id=wid, lines=lines,
                                  usage=spent)
            if reason == "cancel":
                return store.fail(job.id, CANCELLED_ERROR, CANCELLED_ERROR_TYPE, status="cancelled", worker_id=wid,
                                  lines=lines, usage=spent)
            if reason == "shutdown":
                store.release(job.id, wid)
                log.info("worker %s stopping: job %s returned to the queue", wid, job.id)
            else:
                log.warning("worker %s lost the lease on job %s; leaving it to its new worker", wid, job.id)
            return None
        if isinstance(outcome, RunLocally):
            store.reroute(job.id, wid, "generate", lines)
            return None
        if isinstance(outcome, InputError):
            return store.fail(job.id, str(outcome), "validation_error", worker_id=wid, lines=lines,
                              error_detail={"field": outcome.field, "message": outcome.message}, usage=spent)
        if isinstance(outcome, BaseException):
            message = f"{type(outcome).__name__}: {outcome}" if str(outcome) else type(outcome).__name__
            lines.append({"message": message, "level": "ERROR"})
            return store.fail(job.id, message, "internal_error", worker_id=wid, lines=lines, usage=spent)
        if isinstance(outcome, TrainedLora):
            return self._complete(run, lambda: save_trained(self.storage, outcome), lines, spent)
        flagged = [i for i, image in enumerate(outcome.images) if image.nsfw]
        if flagged:
            message = blocked_message(flagged, len(outcome.images))
            lines.append({"message": message, "level": "WARN"})
            if (job.request or {}).get("fail_if_blocked"):
                return store.fail(job.id, message, BLOCKED_ERROR_TYPE, worker_id=wid, lines=lines, usage=spent)
        billed = billable(outcome.reference_sizes, [(image.width, image.height) for image in outcome.images])
        usage = {**vars(billed), "megapixels": billed.megapixels, "gpu_seconds": run.engine_seconds,
                 "steps": (run.total or run.step or job.request.get("steps") or 0) if local else 0,
                 "provider": outcome.served_by}
        return self._complete(run, lambda: self._save(outcome), lines, usage)

    def _complete(self, run: _Run, save: Callable[[], dict], lines: list[dict], usage: dict) -> Job | None:
        """Store the outputs (``save`` returns the job's result) and complete the job, or fail it when they
        cannot be stored."""
        job, wid = run.job, self.worker_id
        try:
            result = save()
        except Exception as e:
            log.exception("could not store the outputs of job %s", job.id)
            message = f"could not store the outputs: {type(e).__name__}: {e}"
            lines.append({"message": message, "level": "ERROR"})
            return self.store.fail(job.id, message, "internal_error", worker_id=wid, lines=lines, usage=usage)
        return self.store.complete(job.id, wid, result, lines=lines, usage=usage)

    def _save(self, result: GenerationResult) -> dict:
        images = []
        for image in result.images:
            key = self.storage.put(image.data, image.content_type, prefix="outputs")
            images.append({"key": key, "width": image.width, "height": image.height,
                           "content_type": image.content_type, "nsfw": image.nsfw})
        return {
            "images": images,
            "seed": result.seed,
            "prompt": result.prompt,
            "timings": dict(result.timings),
            "has_nsfw_concepts": result.has_nsfw_concepts,
        }
