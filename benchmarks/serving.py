"""Shared by the server benchmarks: a ``fluxserve serve`` process of its own, percentiles, the device."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: str, *flags: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str, int]:
    """``fluxserve serve`` on a free port in its own process (so the client does not compete with it for the
    GIL), without auth; returns (process, base URL, port) once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "fluxserve", "serve", "--port", str(port), "--data-dir", data_dir, *flags]
    server = subprocess.Popen(command, env={**os.environ, "FLUXSERVE_REQUIRE_AUTH": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{base}/health", timeout=1)
            return server, base, port
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
