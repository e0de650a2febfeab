"""Real webhook receivers on 127.0.0.1: an http.server that keeps each delivery's raw body and headers, so a
test can verify signatures over the exact bytes that arrived, and a slow one that drips its response headers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]  # names in lower case

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class SigningReceiver:
    """Answers 500 to the first ``failures`` POSTs, then 200; ``wait_for(n)`` blocks until n arrived."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.received: list[Received] = []
        self.condition = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.condition:
                    receiver.received.append(Received(body, {k.lower(): v for k, v in self.headers.items()}))
                    failing = len(receiver.received) <= receiver.failures
                    receiver.condition.notify_all()
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 60) -> list[Received]:
        """Wait until ``predicate(received)`` holds (or ``timeout``); the deliveries so far."""
        with self.condition:
            self.condition.wait_for(lambda: predicate(self.received), timeout)
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DrippingReceiver:
    """A slow receiver: it reads each POST whole, then sends its response headers one byte every ``interval_s``
    for ``hold_s`` seconds (every read well within any read timeout), then ends the answer with 200.
    ``holding`` is how many connections it holds now, ``most`` the most it held at once, ``requests`` how many
    POSTs it read. ``close`` drops every connection at once, so a test's teardown never waits for the drip."""

    def __init__(self, interval_s: float = 0.5, hold_s: float = 120):
        self.interval_s, self.hold_s = interval_s, hold_s
        self.holding = self.most = self.requests = 0
        self.condition = threading.Condition()
        self._closed = threading.Event()
        self._connections: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/slow"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self.condition:
                self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                body += chunk
            with self.condition:
                self.requests += 1
                self.holding += 1
                self.most = max(self.most, self.holding)
                self.condition.notify_all()
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                until = time.monotonic() + self.hold_s
                while time.monotonic() < until and not self._closed.wait(self.interval_s):
                    connection.sendall(b"a")
                connection.sendall(b"\r\nContent-Length: 0\r\n\r\n")
            finally:
                with self.condition:
                    self.holding -= 1
                    self.condition.notify_all()
        except OSError:
            return
        finally:
            connection.close()

    def wait_for(self, predicate, timeout: float = 60) -> bool:
        """Wait until ``predicate(self)`` holds (or ``timeout``); whether it does."""
        with self.condition:
            return self.condition.wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self.condition:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
