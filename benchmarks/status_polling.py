"""Status polling throughput: 50 concurrent pollers on ``GET /queue/{app}/requests/{id}/status``.

Runs ``fluxserve serve --demo --no-workers`` in a subprocess (uvicorn with uvloop + httptools, access log off),
submits jobs that stay queued (their status answer includes the queue position) and jobs cancelled at once
(COMPLETED with an error), then polls them over 50 keep-alive HTTP/1.1 connections from a minimal asyncio
client (one request in flight per connection; the client costs far less than the server per request).
Scenarios:
  * own-queued:    each poller polls its own queued job (50 jobs; positions 0..49): no two polls share a read
  * own-completed: each poller polls its own completed (cancelled) job
  * shared-queued: all 50 pollers poll one queued job (status snapshots are reused for 25 ms)
Prints requests/s, per-request latency p50/p99 (request written -> response read) and errors (any answer other
than 200/202). Target: >= 1500 req/s with 50 pollers on this 2-core machine (client and server share the cores).

    .venv/bin/python benchmarks/status_polling.py [--pollers 50] [--seconds 10] [--repeat 3] [--db URL]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import tempfile
import time

import httpx
from serving import cpu_model, percentile, start_server

ENDPOINT = "fal-ai/flux-2/flash"
TARGET = 1500


async def poller(port: int, path: str, stop_at: float, latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Key bench\r\n\r\n".encode()
    clock = time.perf_counter
    try:
        while clock() < stop_at:
            started = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(clock() - started)
            status = head[9:12]
            if status not in (b"200", b"202"):
                errors.append(status.decode())
    finally:
        writer.close()


async def measure(port: int, paths: list[str], seconds: float) -> tuple[float, list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(poller(port, path, stop_at, latencies, errors) for path in paths))
    return len(latencies) / (time.perf_counter() - started), latencies, errors


def server_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1, help="measure each scenario this many times")
    parser.add_argument("--db", default="", help="job store URL (default: SQLite in a temporary directory)")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="fluxserve-poll-")
    server, base, port = start_server(data_dir, "--demo", "--no-workers", *(["--db", args.db] if args.db else []))
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            def submit(prompt: str) -> str:
                body = client.post(f"/queue/{ENDPOINT}", json={"prompt": prompt}).json()
                return body["status_url"].removeprefix(base)

            queued = [submit(f"queued {i}") for i in range(args.pollers)]
            completed = [submit(f"cancelled {i}") for i in range(args.pollers)]
            for path in completed:
                client.put(path.removesuffix("/status") + "/cancel")
        scenarios = {"own-queued": queued, "own-completed": completed, "shared-queued": queued[:1] * args.pollers}
        loops = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
        print(f"device: {cpu_model()}, {len(os.sched_getaffinity(0))} cores shared by client and server; "
              f"server: uvicorn ({loops}, {http}), access log off; db: {args.db or 'SQLite (WAL) file'}")
        print(f"{args.pollers} pollers x {args.seconds:g} s per run; load average before: {os.getloadavg()[0]:.2f}")
        for label, paths in scenarios.items():
            for run in range(args.repeat):
                cpu0 = server_cpu_seconds(server.pid)
                rate, latencies, errors = asyncio.run(measure(port, paths, args.seconds))
                server_cpu = (server_cpu_seconds(server.pid) - cpu0) / args.seconds
                print(f"{label:14s} run {run + 1}: {rate:6.0f} req/s  p50 {statistics.median(latencies) * 1e3:5.1f} ms"
                      f"  p99 {percentile(latencies, 99) * 1e3:5.1f} ms  errors {len(errors)}  server CPU "
                      f"{server_cpu * 100:3.0f}%  load {os.getloadavg()[0]:.2f}  "
                      f"(target >= {TARGET}: {'met' if rate >= TARGET else 'NOT met'})")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
