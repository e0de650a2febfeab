"""Helpers for the probe tests: a TCP forwarder on 127.0.0.1 that a test can cut and restore, to make a real
database unreachable (connections refused at once, as when its host went away) without waiting on network
timeouts; and a real ``fluxserve worker`` process on the demo models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import httpx
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]


class TcpProxy:
    """``with TcpProxy("127.0.0.1", 5432) as proxy:`` forwards ``127.0.0.1:proxy.port`` to the target;
    ``cut()`` drops every connection and stops listening, ``restore()`` listens again on the same port."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def __enter__(self) -> Self:
        self.restore()
        return self

    def __exit__(self, *exc) -> None:
        self.cut()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def wait_for(predicate, seconds: float, what: str):
    """``predicate()``'s first true value, polled for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def get(url: str) -> httpx.Response | None:
    """The answer, or None while nothing listens there."""
    try:
        return httpx.get(url, timeout=30)
    except httpx.TransportError:
        return None


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` (a PostgreSQL URL) going through ``proxy``."""
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def start_worker(tmp_path: Path, db: str, health_port: int, *extra: str) -> subprocess.Popen:
    """``fluxserve worker`` on the demo models and the CPU, with its probes on ``health_port`` (later flags in
    ``extra`` win)."""
    cmd = [sys.executable, "-m", "fluxserve", "worker", "--demo", "--device", "cpu", "--data-dir", str(tmp_path),
           "--db", db, "--storage", str(tmp_path / "files"), "--health-port", str(health_port), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, as Kubernetes stops a pod; the process's output."""
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output
