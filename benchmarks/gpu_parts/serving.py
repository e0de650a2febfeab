"""Part ``serving``: requests timed through ``fluxserve serve`` (random weights on the GPU, the demo model with
``--tiny``) by concurrent official fal clients on loopback, against the engine alone on the same requests:
images/s, p50/p95 latency, the latency the server adds, GPU busy (benchmarks/serving_load.py does the work).

Each model is a sub-step with a server process and an engine-alone process of its own; both compile through the
run's compiler caches (``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` under the run's work directory, set
before anything starts), so the second compiles less than the first."""

from __future__ import annotations

from functools import partial

from gpu_parts.common import Run, log, num, pct

# model build + first compile in the server, then again (from the caches) in the engine-alone process; the part's
# estimate is its first model's
ESTIMATES = {
    "gpu": {"serving": 160, "serving.klein-4b": 160, "serving.dev": 240},
    "tiny": {"serving": 90, "serving.klein-4b": 80, "serving.dev": 80},
}


def load_config(run: Run):
    """What the part runs: on a GPU, [klein] 4B (4 steps) at concurrency 1, 2, 4, 8 and [dev] at 4 steps (the
    serving overhead per request does not depend on the step count; fewer steps make it weigh more) at 1 and 2,
    1024x1024, random weights; with ``--tiny``, the demo [klein] at fal's smallest size (512x512) at 1 and 2,
    two requests each, one CPU thread (the tiny models' small operations run fastest so on a busy machine)."""
    from serving_load import LoadConfig

    if run.tiny:
        return {"klein-4b": LoadConfig(models=("klein-4b",), concurrency=(1, 2), requests=2, warmup=1, size=512,
                                       demo=True, device="cpu", engine_requests=2, cpu_threads=1)}
    device = str(run.device)
    return {
        "klein-4b": LoadConfig(models=("klein-4b",), concurrency=(1, 2, 4, 8), requests=12, warmup=2, size=1024,
                               device=device, engine_requests=12),
        "dev": LoadConfig(models=("dev",), concurrency=(1, 2), requests=4, warmup=1, size=1024, steps={"dev": 4},
                          device=device, engine_requests=4),
    }


def part(run: Run, report: dict) -> dict:
    import serving_load

    data_dir = run.work_dir / "serving"
    configs = load_config(run)
    report.update(device=run.device_name, tiny=run.tiny, definition=serving_load.__doc__.split("\n\n")[0],
                  client=serving_load.describe_client(next(iter(configs.values()))), models={})

    def save(row: dict, model: str) -> None:
        report["models"][model] = row
        run.save("serving", report)

    for model, config in configs.items():
        row = run.step("serving", report, model, lambda model=model, config=config: serving_load.measure_model(
            config, model, data_dir, on_update=partial(save, model=model)))
        if row is not None:
            save(row, model)
            log_model(run, row)
    return headline(report)


def log_model(run: Run, row: dict) -> None:
    for level in row["levels"].values():
        log(f"serving {row['model']} {row['size']} ({row['weights']}) on {run.device_name}, {level['concurrency']} "
            f"client(s): {num(level['images_per_s'])} images/s ({pct(level['vs_engine'])} of the engine alone "
            f"{num(level['engine_images_per_s'])}), p50 {num(level['p50_s'])} s, p95 {num(level['p95_s'])} s, GPU "
            f"busy NVML {pct(level['gpu_busy']['nvml'])} / engine time {pct(level['gpu_busy']['engine_seconds_over_wall'])}")
    log(f"serving {row['model']}: added latency p50 at 1 client {num((row.get('added_latency_p50_s') or 0) * 1000)} "
        f"ms, saturation {pct((row.get('saturation') or {}).get('vs_engine'))} of the engine alone")


def headline(report: dict) -> dict:
    out = {}
    for model, row in report["models"].items():
        out[model] = {
            "what": f"{model} {row['size']} through fluxserve serve, {row['weights']}, on {report['device']}",
            "saturation_vs_engine": (row.get("saturation") or {}).get("vs_engine"),
            "added_latency_p50_s": row.get("added_latency_p50_s"),
            "levels": {c: {key: level.get(key) for key in ("images_per_s", "engine_images_per_s", "p50_s", "p95_s",
                                                           "gpu_busy")}
                       for c, level in row["levels"].items()},
        }
    return out
