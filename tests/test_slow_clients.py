"""Slow clients cannot hold the API: a real ``fluxserve serve --demo`` process, many connections on 127.0.0.1
that open and then drip their request head a byte at a time (slowloris), or send nothing, or send a head that
never ends. ``/health`` keeps answering on fresh connections, and the slow ones are closed once their head
timeout passed. The server runs with a file-descriptor limit of 256, as a small host's would be: without a
connection limit the slow connections alone would use up every descriptor, and no new connection could be
accepted.

The bounds are wide: the head timeout is 2 s and a slow connection has 30 s to be closed; a probe of /health
has 10 s to be answered.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fal_helpers import free_port

from fluxserve.cli import build_parser
from fluxserve.commands.common import settings_from_args

SLOW_CONNECTIONS = 300
HEAD_TIMEOUT_S = 2
MAX_CONNECTIONS = 60
CLOSE_BOUND_S = 30.0
PROBE_TIMEOUT_S = 10.0
DESCRIPTORS = 256  # the server's file-descriptor limit: fewer than the slow connections


@pytest.fixture
def server(demo_data_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cache").symlink_to(Path(demo_data_dir) / "cache", target_is_directory=True)
    port = free_port()
    env = dict(os.environ, FLUXSERVE_DEVICE="cpu", FLUXSERVE_HTTP_HEADER_TIMEOUT=str(HEAD_TIMEOUT_S),
               FLUXSERVE_HTTP_KEEP_ALIVE_TIMEOUT=str(HEAD_TIMEOUT_S),
               FLUXSERVE_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS))
    proc = subprocess.Popen([sys.executable, "-m", "fluxserve", "serve", "--demo", "--data-dir", str(data),
                             "--port", str(port), "--no-workers"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))  # before it serves
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=PROBE_TIMEOUT_S).status_code == 200
    except httpx.HTTPError:
        return False


class Drip:
    """Open connections that send ``start`` and then one more byte every ``every_s`` (never a complete head)."""

    def __init__(self, port: int, count: int, start: bytes, every_s: float = 0.5):
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(start)
            self.sockets.append(sock)
        self.every_s, self.stop = every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            for sock in self.sockets:
                try:
                    sock.send(b"x")
                except OSError:
                    pass  # closed by the server

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.sockets:
            sock.close()


def _closed(sock: socket.socket, bound_s: float) -> bool:
    """Whether the server closed ``sock`` within ``bound_s`` (what it answered first is read and dropped)."""
    deadline = time.monotonic() + bound_s
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def test_slow_and_idle_connections_neither_lock_out_health_nor_stay_open(server):
    port = server
    slow = Drip(port, SLOW_CONNECTIONS // 2, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(SLOW_CONNECTIONS // 2)]
    try:
        answered = []
        for _ in range(5):
            answered.append(_answers(port))
            time.sleep(0.5)
        assert all(answered), f"/health answered {sum(answered)} of {len(answered)} probes"
        started = time.monotonic()
        for sock in [*slow.sockets, *idle]:
            assert _closed(sock, max(0.1, CLOSE_BOUND_S - (time.monotonic() - started))), \
                "a slow connection was still open after the bound"
        assert _answers(port)
    finally:
        slow.close()
        for sock in idle:
            sock.close()


def test_a_keep_alive_connection_that_then_drips_is_closed(server):
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next head starts (this cancels the idle timeout) ...
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(0.5):
                try:
                    sock.send(b"X-Slow: y\r\n")  # ... and never ends
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            assert _closed(sock, CLOSE_BOUND_S)
        finally:
            stop.set()
            dripper.join(10)


def test_a_request_head_that_never_ends_is_refused_by_size(server):
    """Past the head-size limit the server answers 431 and closes (or resets, if our bytes were still in
    flight); it never keeps reading."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer, closed = b"", False
        for _ in range(256):  # 256 x 4 KiB: far past the limit on the request head (64 KiB)
            try:
                sock.sendall(b"X-Big: " + b"y" * 4000 + b"\r\n")
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.01)[0]:
                break  # the server answered
        sock.settimeout(CLOSE_BOUND_S)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
            closed = True
        except TimeoutError:
            pass
        except OSError:
            closed = True
        assert closed, "the server kept reading a request head that never ends"
        assert not answer or answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_the_connection_settings_have_flags_and_defaults():
    defaults = settings_from_args(build_parser().parse_args(["serve"]))
    assert (defaults.http_header_timeout, defaults.http_keep_alive_timeout, defaults.http_max_connections,
            defaults.http_max_header_kb) == (10.0, 5.0, 1000, 64)
    args = build_parser().parse_args(["serve", "--http-header-timeout", "3", "--http-keep-alive-timeout", "1.5",
                                      "--http-max-connections", "50", "--http-max-header-kb", "16"])
    chosen = settings_from_args(args, **{name: getattr(args, name) for name in (
        "http_header_timeout", "http_keep_alive_timeout", "http_max_connections", "http_max_header_kb")})
    assert (chosen.http_header_timeout, chosen.http_keep_alive_timeout, chosen.http_max_connections,
            chosen.http_max_header_kb) == (3.0, 1.5, 50, 16)


# ---- both of uvicorn's HTTP/1.1 implementations, in-process -------------------------------------------------------
@pytest.fixture(params=["httptools", "h11"])
def small_app_server(request):
    """A tiny ASGI app on uvicorn with ``head_limited`` over one implementation: 2 s head deadline, 3
    connections, 8 KiB heads."""
    import uvicorn

    from fluxserve.api.connections import ConnectionLimits, head_limited

    if request.param == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = ConnectionLimits(header_timeout=HEAD_TIMEOUT_S, keep_alive_timeout=30, max_connections=3,
                              max_header_bytes=8 * 1024)
    options = limits.uvicorn_options() | {"http": head_limited(limits, base)}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off",
                                           **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(30)


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock.recv(65536)


def test_each_implementation_closes_slow_heads_and_makes_room(small_app_server):
    port = small_app_server
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    for sock in slow:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as fresh:  # over the limit: room is made
        assert _get(fresh).startswith(b"HTTP/1.1 200")
        assert _get(fresh).startswith(b"HTTP/1.1 200")  # keep-alive works
        assert _closed(slow[0], CLOSE_BOUND_S)  # the oldest slow one made the room
        for sock in slow[1:]:
            assert _closed(sock, CLOSE_BOUND_S)  # the others: their head deadline
    for sock in slow:
        sock.close()


def test_each_implementation_answers_431_to_a_long_head(small_app_server):
    with socket.create_connection(("127.0.0.1", small_app_server), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"y" * 9000 + b"\r\n")
        sock.settimeout(CLOSE_BOUND_S)
        assert sock.recv(65536).startswith(b"HTTP/1.1 431")
        assert _closed(sock, CLOSE_BOUND_S)


def test_each_implementation_serves_a_large_body_sent_with_its_head(small_app_server):
    """The head-size cap counts the head only: a body in the same read is no head."""
    body = b"z" * 200_000
    with socket.create_connection(("127.0.0.1", small_app_server), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        sock.settimeout(CLOSE_BOUND_S)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_each_implementation_counts_no_late_body_as_a_head(small_app_server):
    """The app answers before the body arrives (as a 401 or 413 does); the body that follows is no head."""
    with socket.create_connection(("127.0.0.1", small_app_server), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n")
        sock.settimeout(CLOSE_BOUND_S)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"z" * 20000)
        time.sleep(0.5)
        sock.settimeout(0.5)
        try:
            late = sock.recv(65536)
        except TimeoutError:
            late = b""
        assert not late.startswith(b"HTTP/1.1 431"), late[:100]
