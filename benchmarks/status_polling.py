"""Status polling throughput: 50 concurrent pollers on ``GET .../requests/{id}/status``, requests per second.

Runs ``fluxserve serve --no-workers`` in a subprocess (its own core), submits a request (left queued: the
status answer then also counts its queue position) and a cancelled one (COMPLETED with an error), and polls
them over 50 keep-alive connections from a minimal asyncio HTTP/1.1 client (so the client, not the server,
is never the bottleneck). Target: >= 1500 req/s on a 2-core machine.

    .venv/bin/python benchmarks/status_polling.py [--pollers 50] [--seconds 10] [--db URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def poller(host: str, port: int, path: str, stop_at: float, counts: list[int], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Key bench\r\n\r\n".encode()
    done = 0
    try:
        while time.perf_counter() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status not in (200, 202):
                errors.append(str(status))
            done += 1
    finally:
        counts.append(done)
        writer.close()


async def measure(port: int, path: str, pollers: int, seconds: float) -> tuple[float, int]:
    counts: list[int] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(poller("127.0.0.1", port, path, stop_at, counts, errors) for _ in range(pollers)))
    elapsed = time.perf_counter() - started
    return sum(counts) / elapsed, len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--db", default="")
    args = parser.parse_args()

    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="fluxserve-poll-")
    command = [sys.executable, "-m", "fluxserve", "serve", "--demo", "--no-workers", "--port", str(port),
               "--data-dir", data_dir]
    if args.db:
        command += ["--db", args.db]
    env = {**os.environ, "FLUXSERVE_REQUIRE_AUTH": "0"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        endpoint = "fal-ai/flux-2/flash"
        queued = httpx.post(f"{base}/queue/{endpoint}", json={"prompt": "queued"}).json()
        finished = httpx.post(f"{base}/queue/{endpoint}", json={"prompt": "cancelled"}).json()
        httpx.put(finished["cancel_url"])
        cpu = platform.processor() or platform.machine()
        print(f"device: CPU {cpu}, {len(os.sched_getaffinity(0))} cores (server and client share them)")
        for label, submitted in (("IN_QUEUE (with queue position)", queued), ("COMPLETED", finished)):
            path = submitted["status_url"].removeprefix(base) + "?logs=0"
            rate, errors = asyncio.run(measure(port, path, args.pollers, args.seconds))
            verdict = "met" if rate >= 1500 else "NOT met"
            print(f"{label:32s} {args.pollers} pollers: {rate:7.0f} req/s  errors {errors}  "
                  f"(target >= 1500: {verdict})")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
