"""One deadline for a whole outbound HTTP exchange, enforced by shutting its connections down.

httpcore's timeouts bound each network operation (one connect, one read, one write), not an exchange: a host
that sends a byte of its headers every second is never cut off, whatever the read timeout (httpx and httpcore
offer no total timeout for sync clients). A ``Deadline`` bounds the exchange: every connection opened for it
is watched (``watch``), and when the deadline passes one watchdog thread shuts the sockets down, which ends at
once any read, write or TLS handshake blocked on them; the blocked call fails and its caller reports the
deadline (``expired``).

Invariant: the watchdog only touches its own duplicate of each socket's descriptor (made by ``watch``, closed
by ``release`` or when the deadline fires, exactly once), so it never shuts down a descriptor number that the
connection's owner closed and the process reused. Shutting the duplicate down ends the one connection both
refer to.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time


class Deadline:
    """The end of one exchange, ``seconds`` from now (``time.monotonic``)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.at = time.monotonic() + self.seconds
        self._lock = threading.Lock()
        self._watched: dict[int, socket.socket] = {}
        self._handles = itertools.count(1)
        self._fired = False
        self._scheduled = False

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self._fired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> int:
        """Shut ``sock`` down when the deadline passes, unless ``release(handle)`` came first; returns the
        handle. A socket watched after the deadline fired is shut down at once."""
        duplicate = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
        with self._lock:
            if self._fired:
                handle = 0
            else:
                handle = next(self._handles)
                self._watched[handle] = duplicate
                schedule, self._scheduled = not self._scheduled, True
        if handle == 0:
            _shut(duplicate)
        elif schedule:
            _WATCHDOG.add(self)
        return handle

    def release(self, handle: int) -> None:
        """The connection's exchange is over: stop watching it (closes the duplicate descriptor)."""
        with self._lock:
            duplicate = self._watched.pop(handle, None)
        if duplicate is not None:
            duplicate.close()

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            watched, self._watched = list(self._watched.values()), {}
        for duplicate in watched:
            _shut(duplicate)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer
    sock.close()


class _Watchdog:
    """One daemon thread that fires deadlines in order of their time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadline", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        deadline = heapq.heappop(self._heap)[2]
                        break
                    self._wake.wait(wait)
            deadline._fire()


_WATCHDOG = _Watchdog()
