"""Liveness and readiness, as Kubernetes probes (and Docker and compose health checks) expect them.

* ``GET /health/live``: 200 while the process runs and answers HTTP. A failing liveness probe restarts the
  container, so it checks nothing else: a database outage must not restart every replica.
* ``GET /health/ready``: 200 when this process can do its work: the job store answers a query on the jobs
  table, and every worker thread of the process (if it has any) is running; otherwise 503 with the reason.

Models load lazily, on the first job that needs them, so readiness does not wait for them: a process that must
have its models resident before it is ready loads them first (``fluxserve serve --preload``), and then opens its
port only once they are.

``fluxserve serve`` answers both paths on its API port; ``fluxserve worker --health-port`` answers them on a
port of its own (``ProbeServer``), since a worker serves no HTTP otherwise, with its Prometheus metrics at
``/metrics`` (the jobs its threads finished: generation time, queue wait, time to first byte).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import text

LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
STORE_TIMEOUT_S = 5.0  # a store that takes longer than this to answer one query is not ready


@dataclass(frozen=True)
class Readiness:
    ready: bool
    checks: dict[str, str]

    @property
    def status_code(self) -> int:
        return 200 if self.ready else 503

    def body(self) -> dict:
        if self.ready:
            return {"status": "ready", "checks": self.checks}
        reasons = [f"{name}: {state}" for name, state in self.checks.items() if state != "ok"]
        return {"status": "not ready", "reason": "; ".join(reasons), "checks": self.checks}


def _store_state(store: Any) -> str:
    """``ok``, or why the job store did not answer a query on the jobs table within ``STORE_TIMEOUT_S``."""
    outcome: list[str] = []

    def query() -> None:
        try:
            with store.engine.connect() as conn:
                conn.execute(text("SELECT count(*) FROM jobs WHERE 1 = 0")).scalar()
            outcome.append("ok")
        except Exception as exc:  # noqa: BLE001 - any failure to answer means not ready; the class says which
            outcome.append(f"the job store did not answer ({type(exc).__name__})")

    thread = threading.Thread(target=query, name="readiness-store", daemon=True)
    thread.start()
    thread.join(STORE_TIMEOUT_S)
    return outcome[0] if outcome else f"the job store did not answer within {STORE_TIMEOUT_S:g} s"


def readiness(store: Any, workers: Sequence[Any]) -> Readiness:
    """Whether a process with this job store and these workers (none for an API-only process) is ready."""
    checks = {"store": _store_state(store)}
    if workers:
        running = sum(1 for worker in workers if worker.running)
        checks["workers"] = "ok" if running == len(workers) else f"{running} of {len(workers)} worker threads running"
    return Readiness(all(state == "ok" for state in checks.values()), checks)


class ProbeServer:
    """The two probe paths (and, given ``metrics``, ``/metrics``) on their own port, for processes without an
    HTTP API (``fluxserve worker``). ``ProbeServer(host, port, store, workers).start()``; ``stop()``."""

    def __init__(self, host: str, port: int, store: Any, workers: Sequence[Any], metrics: Any = None):
        def answer(handler: BaseHTTPRequestHandler) -> None:
            path = handler.path.split("?", 1)[0]
            content_type = "application/json"
            if path == LIVE_PATH:
                code, data = 200, json.dumps({"status": "ok"}).encode()
            elif path == READY_PATH:
                state = readiness(store, workers)
                code, data = state.status_code, json.dumps(state.body()).encode()
            elif path == "/metrics" and metrics is not None:
                from prometheus_client import CONTENT_TYPE_LATEST

                code, data, content_type = 200, metrics.render(), CONTENT_TYPE_LATEST
            else:
                code, data = 404, json.dumps({"detail": "Not Found"}).encode()
            handler.send_response(code)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)

        class Handler(BaseHTTPRequestHandler):
            do_GET = do_HEAD = answer

            def log_message(self, *args) -> None:  # probes every few seconds: no line each
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health-probes", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> ProbeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
