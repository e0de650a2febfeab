"""Retention: requests, their inputs and results, and every stored file (uploads, outputs, previews) are deleted
``retention_hours`` after they were made (``FLUXSERVE_RETENTION_HOURS`` / ``--retention-hours``; 0 keeps
everything). Each API process sweeps periodically; several replicas sweeping the same store is harmless."""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import timedelta
from typing import Any

from fluxserve.jobs.store import utcnow

log = logging.getLogger(__name__)


def sweep(store: Any, storage: Any, retention_hours: float) -> tuple[int, int]:
    """Delete what is older than the retention: (jobs deleted, files deleted)."""
    cutoff = utcnow() - timedelta(hours=retention_hours)
    keys = store.expired_files(cutoff)
    delete_files(store, storage, keys)
    return store.delete_before(cutoff), len(keys)


def delete_job(store: Any, storage: Any, job_id: str) -> str:
    """Delete one finished job now, with its outputs and previews (the playground's Delete): what
    ``store.delete_job`` answers ("DELETED", "NOT_FOUND", "ACTIVE"); files are deleted only when the job was."""
    keys = store.job_files(job_id)
    outcome = store.delete_job(job_id)
    if outcome == "DELETED":
        delete_files(store, storage, keys)
    return outcome


def delete_files(store: Any, storage: Any, keys: list[str]) -> None:
    """Delete stored files and their ownership records."""
    for key in keys:
        with contextlib.suppress(KeyError, FileNotFoundError):  # already gone
            storage.delete(key)
    store.forget_files(keys)


class RetentionSweeper:
    """A daemon thread running ``sweep`` every ``interval_s`` (default: a tenth of the retention, 1 min to 1 h)."""

    def __init__(self, store: Any, storage: Any, retention_hours: float, interval_s: float | None = None):
        self.store, self.storage, self.retention_hours = store, storage, retention_hours
        self.interval_s = interval_s or min(3600.0, max(60.0, retention_hours * 360.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fluxserve-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                jobs, files = sweep(self.store, self.storage, self.retention_hours)
                if jobs or files:
                    log.info("retention: deleted %d requests and %d files", jobs, files)
            except Exception:  # a failed sweep is retried at the next interval
                log.exception("retention sweep failed")
            self._stop.wait(self.interval_s)
