"""A real fluxserve (demo models, SQLite, a local files directory) on uvicorn at a free loopback port, with an
API key required; shared by the OpenAI and Replicate client tests (one server per test session)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from fluxserve.config import Settings


@dataclass
class LiveServer:
    url: str
    key: str
    app: Any
    admin_key: str = ""  # sees every key's work, the metrics and the health details

    @property
    def store(self):
        return self.app.state.store

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers() | kwargs.pop("headers", {}), timeout=120, **kwargs)

    @contextmanager
    def workers_paused(self) -> Iterator[None]:
        """No job runs inside the block (the workers stop and start again after it): queued stays queued."""
        workers = self.app.state.workers
        for worker in workers:
            worker.stop()
        try:
            yield
        finally:
            for worker in workers:
                worker.start()

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers=self.headers() | kwargs.pop("headers", {}), timeout=300,
                          **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> LiveServer:
    from fluxserve.api.app import create_app

    data_dir = tmp_path_factory.mktemp("dialects")
    settings = Settings(data_dir=data_dir, demo=True, device="cpu",
                        fetch_allow="127.0.0.1")  # test servers serve references on 127.0.0.1
    app = create_app(settings)
    _, secret = app.state.store.create_key("dialect tests")
    _, admin = app.state.store.create_key("operators", admin=True)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield LiveServer(f"http://127.0.0.1:{port}", secret, app, admin)
    server.should_exit = True
    thread.join(30)
