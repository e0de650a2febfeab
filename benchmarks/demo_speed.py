"""How fast the demo models generate a 1024x768 image with each endpoint's default steps.

    .venv/bin/python benchmarks/demo_speed.py [--runs 5] [--data-dir DIR] [--endpoint ID ...]

Builds the demo weights if needed, loads each model once (not timed), warms up once, then times ``--runs``
generations per endpoint through ``Engine.generate`` (safety checker on, PNG, as the fal endpoint does).
Prints every stage's median and the total; the target is < 2 s for fal-ai/flux-2 (28 steps) on 2 CPU cores.
Wall-clock numbers depend on what else runs on the machine: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

TARGET_S = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-dir", help="data directory holding the demo weights (default: a temporary one)")
    parser.add_argument("--endpoint", action="append", help="endpoint ids (default: fal-ai/flux-2 and flash)")
    parser.add_argument("--size", default="1024x768")
    args = parser.parse_args()

    import torch

    from fluxserve.catalog import Catalog
    from fluxserve.config import Settings
    from fluxserve.engine import Engine
    from fluxserve.request import GenerationRequest

    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    settings = Settings(data_dir=data_dir, demo=True, device="cpu")
    catalog = Catalog.load()
    engine = Engine(settings, catalog)
    width, height = (int(v) for v in args.size.lower().split("x"))
    endpoints = args.endpoint or ["fal-ai/flux-2", "fal-ai/flux-2/flash"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{width}x{height}, {args.runs} runs")
    worst = 0.0
    for endpoint_id in endpoints:
        endpoint = catalog.endpoint(endpoint_id)
        request = GenerationRequest(model=endpoint.model, prompt="a red fox in the snow, golden hour",
                                    width=width, height=height, steps=endpoint.steps, guidance=endpoint.guidance,
                                    sigmas=list(endpoint.sigmas) if endpoint.sigmas else None, seed=1,
                                    output_format="png")
        engine.load(endpoint.model)
        engine.generate(request)  # warm-up
        runs: list[dict[str, float]] = []
        cpu: list[float] = []
        for i in range(args.runs):
            cpu_start = time.process_time()
            result = engine.generate(request.model_copy(update={"seed": i, "prompt": f"{request.prompt}, take {i}"}))
            cpu.append(time.process_time() - cpu_start)
            runs.append(result.timings)
        medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        total = medians["inference"]
        worst = max(worst, total) if endpoint_id == "fal-ai/flux-2" else worst
        stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in medians.items() if k != "inference")
        load = os.getloadavg()[0]
        print(f"{endpoint_id} ({endpoint.model} demo, {endpoint.steps} steps): median {total:.2f} s "
              f"(min {min(r['inference'] for r in runs):.2f} s; process CPU {statistics.median(cpu):.2f} s; "
              f"load average {load:.1f})\n    {stages}")
    verdict = "OK" if worst < TARGET_S else "SLOWER THAN"
    print(f"{verdict} the {TARGET_S:.0f} s target for fal-ai/flux-2 at {width}x{height}")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
