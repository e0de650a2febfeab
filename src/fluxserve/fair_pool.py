"""A thread pool shared fairly between tenants (API keys).

Invariant: at most ``slots`` calls run at once, and at most ``per_tenant`` of them for any one tenant; a
tenant's further calls wait in its own queue, first in first out. When a slot frees, it goes to the next
tenant in turn that has a call waiting and is under its share, so one tenant's slow calls hold at most its
share of the slots and never delay another tenant's call while a slot is free for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Lock
from typing import Any

_NOBODY = object()


class FairPool:
    def __init__(self, slots: int, per_tenant: int, name: str):
        self.slots = max(1, slots)
        self.per_tenant = max(1, min(per_tenant, self.slots))
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix=name)  # never queues: see _take
        self._lock = Lock()
        self._waiting: dict[Hashable, deque[tuple[Future, Callable[[], Any]]]] = {}  # in turn order
        self._running: dict[Hashable, int] = {}
        self._busy = 0

    def submit(self, tenant: Hashable, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` for ``tenant`` when its turn comes; cancelling the future before then drops it."""
        future: Future = Future()
        with self._lock:
            self._waiting.setdefault(tenant, deque()).append((future, fn))
            started = self._take()
        self._start(started)
        return future

    def running(self, tenant: Hashable) -> int:
        with self._lock:
            return self._running.get(tenant, 0)

    def shutdown(self) -> None:
        """Cancel every waiting call; running ones finish on their threads."""
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for queue in waiting:
            for future, _ in queue:
                future.cancel()
        self._executor.shutdown(wait=False)

    def _take(self) -> list[tuple[Hashable, Future, Callable[[], Any]]]:
        """Under the lock: the calls that start now, one per tenant in turn."""
        started = []
        while self._busy < self.slots:
            tenant = next((t for t in self._waiting if self._running.get(t, 0) < self.per_tenant), _NOBODY)
            if tenant is _NOBODY:
                break
            queue = self._waiting.pop(tenant)
            future, fn = queue.popleft()
            if queue:
                self._waiting[tenant] = queue  # to the back of the turn order
            if not future.set_running_or_notify_cancel():
                continue  # its caller went away while it waited
            self._running[tenant] = self._running.get(tenant, 0) + 1
            self._busy += 1
            started.append((tenant, future, fn))
        return started

    def _start(self, started: list[tuple[Hashable, Future, Callable[[], Any]]]) -> None:
        for tenant, future, fn in started:
            self._executor.submit(self._run, tenant, future, fn)

    def _run(self, tenant: Hashable, future: Future, fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            with self._lock:
                self._busy -= 1
                self._running[tenant] -= 1
                if not self._running[tenant]:
                    del self._running[tenant]
                started = self._take()
            self._start(started)
