"""Who a server or worker process is, across restarts: its jobs are taken back at once when it comes back.

A process takes a *slot* in its data directory: ``<host>-serve0`` for the first ``fluxserve serve`` on a
machine, ``<host>-worker0``, ``<host>-worker1``... for ``fluxserve worker`` processes, or ``worker-<name>``
for a worker started with ``--worker-id <name>``. The slot is held with an operating-system file lock
(``<data dir>/run/<slot>.lock``), which the system drops when the process ends in any way, ``kill -9``
included; so a process that gets a slot knows that the slot's previous holder is gone, while a live sibling
keeps its own slot and its jobs. Each process records, next to the lock, the worker ids its jobs were claimed
under and its process id (which synchronous requests name as their caller). The next holder of the slot
reads that record and hands it to ``JobStore.recover``: the jobs the dead process was running go back to the
queue at once instead of after their lease (``--lease``, 30 s by default), and the synchronous requests whose
connection it held are cancelled, as nobody waits for them any more.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

MAX_SLOTS = 1024  # processes of one role sharing a data directory on one machine


class SlotBusy(RuntimeError):
    """Another live process on this machine holds the slot (a worker name given twice)."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


class ProcessSlot:
    """A slot held by this process (``ProcessSlot.acquire``); ``worker_ids`` are the ids its workers claim
    jobs under, ``process_id`` the id synchronous requests it answers record as their caller."""

    def __init__(self, directory: Path, slot: str, lock: FileLock, process_id: str):
        self.directory = directory
        self.slot = slot
        self.process_id = process_id
        self._lock = lock
        self._record_path = directory / f"{slot}.json"
        self.previous = self._read_record()
        self.worker_ids: list[str] = []

    def __repr__(self) -> str:
        return f"ProcessSlot({self.slot!r}, process_id={self.process_id!r})"

    @classmethod
    def acquire(cls, data_dir: Path | str, role: str, name: str | None = None) -> ProcessSlot:
        """The first free slot of ``role`` ("serve" or "worker") on this machine, or the slot of the worker
        ``name``; ``SlotBusy`` when that named worker already runs here."""
        directory = Path(data_dir) / "run"
        directory.mkdir(parents=True, exist_ok=True)
        if name:
            slot = f"worker-{_safe(name)}"
            lock = FileLock(directory / f"{slot}.lock", timeout=0, thread_local=False)
            try:
                lock.acquire()
            except Timeout:
                raise SlotBusy(f"a worker named {name!r} already runs with the data directory {data_dir}") from None
            return cls(directory, slot, lock, name)
        host = _safe(socket.gethostname())
        for n in range(MAX_SLOTS):
            slot = f"{host}-{role}{n}"
            lock = FileLock(directory / f"{slot}.lock", timeout=0, thread_local=False)
            try:
                lock.acquire()
            except Timeout:
                continue
            return cls(directory, slot, lock, f"{slot}-{uuid.uuid4().hex[:8]}")
        raise SlotBusy(f"{MAX_SLOTS} {role} processes already run with the data directory {data_dir}")

    def auto_worker_ids(self, count: int) -> list[str]:
        """Worker ids inside this process: ``<process id>/<n>``."""
        return [f"{self.process_id}/{n}" for n in range(count)]

    def start(self, store: Any, worker_ids: list[str]) -> dict[str, int]:
        """Recover the jobs of the slot's previous holder, then record this process's ids; returns what
        ``JobStore.recover`` did."""
        counts = {"requeued": 0, "failed": 0, "cancelled": 0}
        previous = self.previous or {}
        # (a named worker's ids are the same in every incarnation: this process claims nothing before this)
        old_ids = [wid for wid in previous.get("worker_ids", []) if isinstance(wid, str)]
        old_process = previous.get("process_id")
        if not isinstance(old_process, str) or old_process == self.process_id:
            old_process = None
        if old_ids or old_process:
            counts = store.recover(old_ids, old_process)
            if any(counts.values()):
                log.warning("%s: the previous process in this slot stopped without giving its jobs back: "
                            "%d requeued, %d failed, %d cancelled", self.slot, counts["requeued"],
                            counts["failed"], counts["cancelled"])
        self.worker_ids = list(worker_ids)
        self._write_record()
        self.previous = None
        return counts

    def close(self) -> None:
        """Let the slot go (the record stays: there is nothing left to recover from a clean stop)."""
        self._lock.release()

    def _read_record(self) -> dict | None:
        try:
            data = json.loads(self._record_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write_record(self) -> None:
        record = {"process_id": self.process_id, "worker_ids": self.worker_ids, "pid": os.getpid(),
                  "started_at": datetime.now(UTC).isoformat()}
        tmp = self._record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._record_path)
