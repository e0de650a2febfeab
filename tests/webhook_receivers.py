"""A real webhook receiver for the signing tests: an http.server on 127.0.0.1 that keeps each delivery's raw
body and headers, so a test can verify signatures over the exact bytes that arrived."""

from __future__ import annotations

import json
import threading
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
