"""Queue overhead: submit -> COMPLETED as a client sees it, minus the engine's own time.

Starts fluxserve in this process (uvicorn on a free port, one worker, demo models unless --real), warms the model
up, then submits jobs one at a time and polls their status every 2 ms. Overhead = wall time from the submit
request to the first COMPLETED status, minus ``timings.inference`` that the engine reported for the job.
Target: p50 <= 15 ms.

    .venv/bin/python benchmarks/queue_overhead.py [--jobs 40] [--endpoint fal-ai/flux-2/flash] [--db URL]
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from fluxserve.api.app import create_app
from fluxserve.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def describe_device(app) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads, {len(__import__('os').sched_getaffinity(0))} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--endpoint", default="fal-ai/flux-2/flash")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--db", default="", help="job store URL (default: SQLite in a temporary directory)")
    parser.add_argument("--data-dir", default="", help="reuse a data directory (keeps built demo weights)")
    parser.add_argument("--real", action="store_true", help="real weights instead of the demo models")
    args = parser.parse_args()

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fluxserve-bench-"))
    settings = Settings(data_dir=data_dir, demo=not args.real, db=args.db)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "a lighthouse at dusk", "image_size": {"width": args.size, "height": args.size}}

    overheads, walls, engines = [], [], []
    with httpx.Client(timeout=600) as client:
        for i in range(args.jobs + 2):  # the first two warm the model up and are not counted
            t0 = time.perf_counter()
            submitted = client.post(f"{base}/queue/{args.endpoint}", json={**body, "seed": i}).json()
            while True:
                status = client.get(submitted["status_url"]).json()
                if status["status"] == "COMPLETED":
                    break
                time.sleep(0.002)
            wall = time.perf_counter() - t0
            result = client.get(submitted["response_url"]).json()
            engine = (result.get("timings") or {}).get("inference") or status["metrics"]["inference_time"]
            if i >= 2:
                walls.append(wall)
                engines.append(engine)
                overheads.append(wall - engine)
    server.should_exit = True

    ms = lambda v: f"{v * 1000:.1f} ms"
    print(f"device: {describe_device(app)}")
    print(f"store: {app.state.store!r}   endpoint: {args.endpoint} {args.size}x{args.size}   jobs: {len(walls)}")
    print(f"submit->COMPLETED wall: p50 {ms(statistics.median(walls))}  p99 {ms(percentile(walls, 99))}")
    print(f"engine time:            p50 {ms(statistics.median(engines))}")
    print(f"queue overhead:         p50 {ms(statistics.median(overheads))}  p99 {ms(percentile(overheads, 99))}"
          f"   (target p50 <= 15 ms: {'met' if statistics.median(overheads) <= 0.015 else 'NOT met'})")


if __name__ == "__main__":
    main()
