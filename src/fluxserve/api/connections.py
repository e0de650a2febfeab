"""Connections that cannot hold the server: a deadline on the request head, a cap on its size, and a limit on
open connections, for the HTTP server ``fluxserve serve`` runs (uvicorn).

uvicorn times out idle keep-alive connections (``timeout_keep_alive``) but nothing else: a client that opens a
connection and sends nothing, or drips its request head a byte at a time (slowloris), keeps it open for ever,
and enough of them use up the process's file descriptors, after which no client is served. ``head_limited``
makes uvicorn's HTTP/1.1 protocol enforce, per connection:

- **Head deadline**: the complete request head (request line and headers) must arrive within
  ``header_timeout`` seconds of the connection opening, or of its previous response; otherwise it is closed.
  Bodies are not covered (a request with a complete head is being served; keep a reverse proxy in front to
  buffer slow bodies).
- **Head size**: a head longer than ``max_header_bytes`` is answered 431 and the connection closed.
- **Connection limit**: at most ``max_connections`` connections are open (WebSockets included). A new one
  over the limit closes the connection that has waited longest for a request head (an idle keep-alive or a
  slow client), so slow clients cannot lock out new ones; when every connection is serving a request, the new
  one is closed at once.

Invariant: a connection is "waiting for a head" (``head_since`` set) from when it opens or answers, until a
request head has been parsed; only such connections are timed out or evicted, never one serving a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("fluxserve.api.connections")

READ_SIZE = 256 * 1024  # the most asyncio reads from a socket at once
DESCRIPTOR_RESERVE = 128  # file descriptors kept for everything but client connections
HEADER_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"connection: close\r\ncontent-length: 32\r\n\r\nRequest header fields too large\n")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds for a complete request head
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1000  # open connections
    max_header_bytes: int = 64 * 1024  # bytes of one request head

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(header_timeout=settings.http_header_timeout, keep_alive_timeout=settings.http_keep_alive_timeout,
                   max_connections=settings.http_max_connections, max_header_bytes=settings.http_max_header_kb * 1024)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting that is out of range."""
        for name, value in (("http_header_timeout", self.header_timeout),
                            ("http_keep_alive_timeout", self.keep_alive_timeout),
                            ("http_max_connections", self.max_connections),
                            ("http_max_header_kb", self.max_header_bytes)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``. h11's own cap on an incomplete head
        (a 400) is set one read above ours, so that ours (a 431) answers first with either implementation."""
        return {"http": head_limited(self), "timeout_keep_alive": self.keep_alive_timeout,
                "h11_max_incomplete_event_size": self.max_header_bytes + READ_SIZE}

    def fit_descriptors(self) -> tuple[ConnectionLimits, str | None]:
        """These limits, with the process's file-descriptor limit raised (up to its hard limit) to hold
        ``max_connections`` connections beside the descriptors already open and ``DESCRIPTOR_RESERVE`` more
        (database, storage, fetches). Where the hard limit is lower, ``max_connections`` is lowered to fit, and
        the note says so; otherwise the note is None. Without this, connections past the descriptor limit
        would not be accepted at all, and the limit could never make room for new clients."""
        try:
            import resource
        except ImportError:  # not a Unix: nothing to fit
            return self, None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = open_descriptors() + DESCRIPTOR_RESERVE + self.max_connections
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return self, None
        room = max(1, soft - open_descriptors() - DESCRIPTOR_RESERVE)
        return replace(self, max_connections=room), (
            f"the file-descriptor limit ({soft}) holds only {room} connections: http_max_connections lowered "
            f"from {self.max_connections} (raise the limit, e.g. ulimit -n or LimitNOFILE=, to keep it)")


def open_descriptors() -> int:
    """How many file descriptors this process has open (0 where that cannot be read)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return 0


def head_limited(limits: ConnectionLimits, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (``base``, default the one uvicorn picks: httptools, else h11) enforcing
    ``limits`` (see the module docstring). It relies on what both of uvicorn's implementations have:
    ``connection_made`` / ``data_received`` / ``connection_lost``, ``on_response_complete``, ``loop``,
    ``transport``, ``connections`` (the server's open connections) and ``cycle`` (the current request)."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol

    class HeadLimitedProtocol(base):  # type: ignore[misc, valid-type]
        head_since: float | None = None  # monotonic time since which a request head is awaited
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: Any = None  # the request cycle when the wait began: a new one means a head was parsed
        _head_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_head()
            if len(self.connections) > limits.max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.head_since is None:
                return
            if self._head_parsed():
                self._head_done()
                return
            if self.cycle is not None and self.cycle.more_body:
                return  # the rest of a body its answer did not wait for: no head yet (the deadline still runs)
            self._head_bytes += len(data)
            if self._head_bytes > limits.max_header_bytes and not self.transport.is_closing():
                log.warning("closing a connection from %s: its request head passed %d bytes", self._peer(),
                            limits.max_header_bytes)
                self._head_done()
                self.transport.write(HEADER_TOO_LARGE)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._serving():
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_done()
            super().connection_lost(exc)

        # ---- the head deadline ----
        def _serving(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_parsed(self) -> bool:
            return self.cycle is not self._head_cycle or self.transport.get_protocol() is not self

        def _await_head(self) -> None:
            self._head_done()
            self.head_since, self._head_cycle, self._head_bytes = time.monotonic(), self.cycle, 0
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

        def _head_done(self) -> None:
            self.head_since = None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            waiting, self._head_timer, self.head_since = self.head_since is not None, None, None
            if waiting and not self._head_parsed() and not self._serving() and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request head in %g s", self._peer(),
                         limits.header_timeout)
                self.transport.close()

        # ---- the connection limit ----
        def _make_room(self) -> None:
            """Over the limit: close the connection that has waited longest for a head (not this new one,
            unless every other connection is serving a request)."""
            waiting = [conn for conn in self.connections
                       if conn is not self and getattr(conn, "head_since", None) is not None
                       and not conn.transport.is_closing()]
            if waiting:
                oldest = min(waiting, key=lambda conn: conn.head_since)
                oldest._head_done()
                oldest.transport.close()
                return
            log.warning("refusing a connection from %s: %d connections are serving requests", self._peer(),
                        limits.max_connections)
            self._head_done()
            self.transport.close()

        def _peer(self) -> str:
            client = getattr(self, "client", None)
            return f"{client[0]}:{client[1]}" if client else "an unknown address"

    HeadLimitedProtocol.__name__ = HeadLimitedProtocol.__qualname__ = f"HeadLimited{base.__name__}"
    return HeadLimitedProtocol
