"""Waiting for jobs to end without holding a thread.

A synchronous caller (fal's run routes, Replicate's ``Prefer: wait``, OpenAI's generations and edits) keeps its
connection open until its job ends. ``JobWaits.wait`` awaits an ``asyncio.Event`` for that, where
``JobStore.wait`` would block a thread: one thread per waiter let one key's waiting requests take every thread
of the pools that every key's requests share, and another key's submit waited behind them.

- A job that ends through this process's store wakes its waiters at once: the store's terminal listener,
  called from the thread that ended the job, hands the wake-up to the waiter's event loop.
- A job ended by another process (``fluxserve worker`` processes or API replicas sharing the database) is found
  by one poll every ``poll_s`` seconds that reads all waited jobs in one query (``JobStore.ended``) in a
  thread: any number of waiters costs one short read per poll, never a thread per waiter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often jobs ended by other processes are looked for, while anyone waits
CHECK_EVERY_S = 1.0  # how often a waiter asks ``caller_gone``


class JobWaits:
    """Waits for jobs of one ``JobStore`` to end (become terminal, or disappear). Invariant: a waiter is
    registered before its first read of the job, so an end between that read and the wait still wakes it;
    waiting holds no thread (only the read at the start and the shared poll run in threads, and they are short)."""

    def __init__(self, store: Any, poll_s: float = POLL_S):
        self.store = store
        self.poll_s = poll_s
        self._lock = threading.Lock()  # the listener reads ``_waiters`` from the store's threads
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._poller: asyncio.Task | None = None
        store.add_terminal_listener(self._wake)

    async def wait(self, job_id: str, timeout: float, *,
                   caller_gone: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """True once job ``job_id`` is terminal or unknown; False when ``timeout`` seconds passed first, or when
        ``caller_gone()`` (asked every ``CHECK_EVERY_S``) answered True."""
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            if job_id in await asyncio.to_thread(self.store.ended, [job_id]):
                return True
            self._start_poller()
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(remaining, CHECK_EVERY_S)):
                        await waiter[1].wait()
                    return True
                except TimeoutError:
                    pass
                if caller_gone is not None and await caller_gone():
                    return False
            return False
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id, set())
                waiting.discard(waiter)
                if not waiting:
                    self._waiters.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        """Wake the waiters of ``job_id``; safe from any thread (the store calls it from the ending one)."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that waiter's event loop is closed: nobody is left to wake
                pass

    def _start_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="fluxserve job waits")

    async def _poll(self) -> None:
        """While anyone waits: every ``poll_s``, one read of every waited job; wake those that ended."""
        while True:
            await asyncio.sleep(self.poll_s)
            with self._lock:
                job_ids = list(self._waiters)
            if not job_ids:
                return
            try:
                ended = await asyncio.to_thread(self.store.ended, job_ids)
            except Exception:  # the database unreachable for a moment: the waits go on, the next poll retries
                log.warning("could not read the status of %d waited jobs", len(job_ids), exc_info=True)
                continue
            for job_id in ended:
                self._wake(job_id)
