"""Shared by the server benchmarks: a ``fluxserve serve`` process of its own, percentiles, the device and its
busy fraction (NVML)."""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
LOOPBACK = "127.0.0.1,localhost,::1"
NVML_PERIOD_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_only(env: dict[str, str]) -> dict[str, str]:
    """``env`` with loopback exempt from any HTTP proxy, so clients of a local server never leave the machine."""
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, (env.get(key), LOOPBACK)))
    return env


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a fluxserve child process: this checkout's ``src`` first on ``PYTHONPATH`` (when run
    from one), no Hugging Face network access, loopback exempt from proxies, plus ``extra``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(extra or {})}
    if (SRC / "fluxserve").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SRC), env.get("PYTHONPATH"))))
    return loopback_only(env)


class ServerDidNotStart(RuntimeError):
    """``fluxserve serve`` exited or did not answer in time; the message ends with its log's last lines."""


def start_server(data_dir: str, *flags: str, timeout: float = 120.0, env: dict[str, str] | None = None,
                 log_path: str | None = None) -> tuple[subprocess.Popen, str, int]:
    """``fluxserve serve`` on a free port of 127.0.0.1 in its own process (so the client does not compete with it
    for the GIL), without auth; returns (process, base URL, port) once /health answers (``--preload`` models are
    built before it does). Its output goes to ``log_path`` (default ``DATA_DIR/server.log``), never to a pipe
    nobody reads; stop it with ``stop_server``."""
    port = free_port()
    command = [sys.executable, "-m", "fluxserve", "serve", "--port", str(port), "--data-dir", data_dir, *flags]
    log_file = Path(log_path or Path(data_dir) / "server.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        server = subprocess.Popen(command, env=child_env({"FLUXSERVE_REQUIRE_AUTH": "0", **(env or {})}),
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False) as client:
        while True:
            try:
                client.get(f"{base}/health", timeout=1)
                return server, base, port
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    status = stop_server(server)
                    tail = log_file.read_text(errors="replace")[-2000:]
                    why = (f"exited with status {status}" if time.monotonic() <= deadline
                           else f"not answering after {timeout:.0f} s")
                    raise ServerDidNotStart(f"server did not start ({why}): {tail}") from None
                time.sleep(0.2)


def stop_server(server: subprocess.Popen, timeout: float = 60.0) -> int | None:
    """Stop the server by its PID: SIGTERM (a graceful shutdown), SIGKILL after ``timeout`` seconds; its exit
    status."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
    return server.returncode


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


class GpuSampler:
    """Mean NVML utilisation of one GPU while the ``with`` block runs (a thread samples it every 50 ms);
    ``result()`` is ``{"nvml": fraction or None, "nvml_samples": n, "nvml_note": why None}``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.samples: list[int] = []
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None

    def __enter__(self) -> Self:
        if not self.device.startswith("cuda"):
            self.note = f"no NVML on {self.device or 'this device'}"
            return self
        try:
            self._handle = nvml_handle(int(self.device.partition(":")[2] or 0))
        except Exception as exc:  # noqa: BLE001 - NVML missing or unusable: said in the result
            self.note = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return self
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import pynvml

        while not self._stop.wait(NVML_PERIOD_S):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def result(self) -> dict:
        value = statistics.fmean(self.samples) / 100 if self.samples else None
        return {"nvml": value, "nvml_samples": len(self.samples),
                "nvml_note": self.note if value is None else None}


def nvml_handle(index: int):
    """The NVML handle of CUDA device ``index`` of this process (``CUDA_VISIBLE_DEVICES`` taken into account)."""
    import pynvml

    pynvml.nvmlInit()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    entry = visible[index]
    return pynvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit() else \
        pynvml.nvmlDeviceGetHandleByUUID(entry)
