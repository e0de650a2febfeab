"""Slow HTTP hosts on 127.0.0.1 for the outbound-fetch tests: a raw TCP server that reads each request's head
and answers with a script, byte by byte if the script wants, so a test decides exactly how slowly the status
line, the headers and the body arrive."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Self


class SlowHost:
    """``SlowHost(script)``: each connection's request head is read, recorded in ``requests`` (the raw head as
    text), then ``script(host, connection, head)`` answers. ``release`` ends every drip early (at teardown)."""

    def __init__(self, script: Callable[[SlowHost, socket.socket, str], None]):
        self.requests: list[str] = []
        self.release = threading.Event()
        self.arrived = threading.Condition()
        host = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = b""
                self.request.settimeout(30)
                try:
                    while b"\r\n\r\n" not in head and len(head) < 65536:
                        chunk = self.request.recv(4096)
                        if not chunk:
                            return
                        head += chunk
                except OSError:
                    return
                text = head.decode("latin-1")
                with host.arrived:
                    host.requests.append(text)
                    host.arrived.notify_all()
                try:
                    script(host, self.request, text)
                except OSError:
                    pass  # the client hung up: what a deadline does

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for_requests(self, count: int, timeout: float = 60) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def drip(self, connection: socket.socket, data: bytes, every_s: float = 0.25) -> bool:
        """Send ``data`` one byte every ``every_s``; False when released (or the client left) first."""
        for byte in data:
            connection.sendall(bytes([byte]))
            if self.release.wait(every_s):
                return False
        return True

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drip_headers(seconds: float = 60, status: str = "200 OK", headers: str = "Content-Length: 0\r\n",
                 body: bytes = b"") -> Callable[[SlowHost, socket.socket, str], None]:
    """A script: the status line at once, then a header dripped for ``seconds`` (4 bytes a second), then
    ``headers`` and ``body``."""

    def script(host: SlowHost, connection: socket.socket, head: str) -> None:
        connection.sendall(f"HTTP/1.1 {status}\r\nX-Drip: ".encode())
        if host.drip(connection, b"a" * int(seconds * 4)):
            connection.sendall(f"\r\n{headers}Connection: close\r\n\r\n".encode() + body)

    return script
