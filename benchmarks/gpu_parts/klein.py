"""Part ``klein``: FLUX.2 [klein] 4B, 4 steps, random weights, through the engine (what ``fluxserve serve`` runs):
stock diffusers first, then the acceleration levels none / regular / high on one build (ms/step, end to end, cold
first request, peak memory, MFU, ratio to diffusers, error of the image against ``none``)."""

from __future__ import annotations

from gpu_parts.common import (
    LEVELS,
    Run,
    allocated_gib,
    close_engine,
    free_memory,
    log,
    mfu,
    num,
    pct,
    png_pixels,
    ratio,
    rel_error,
    release_compiled,
)

ESTIMATES = {
    # measured on an H200 (runs 1-3): baseline 4-5 s, build 0.3-2.6 s, none 4 s, regular 20-31 s, high 15-70 s (the
    # first FP8 compile); regular now compiles the text encoder too. The part's estimate: through regular.
    "gpu": {"klein": 75, "klein.baseline": 10, "klein.build": 5, "klein.none": 8, "klein.regular": 50,
            "klein.high": 80},
    "tiny": {"klein": 40, "klein.baseline": 8, "klein.build": 5, "klein.none": 5, "klein.regular": 5,
             "klein.high": 5},
}


def part(run: Run, report: dict) -> dict:
    from fluxserve import bench
    from fluxserve.catalog import Catalog
    from fluxserve.config import Settings
    from fluxserve.engine import Engine, accel, random_weights
    from fluxserve.request import GenerationRequest

    model, scale, device = "klein-4b", run.scale, run.device
    settings = Settings(data_dir=run.work_dir / "data", device=str(device),
                        random_weights="tiny" if run.tiny else "full")
    catalog = Catalog.load()
    spec = catalog.models[model]
    arch = random_weights.tiny_architecture(model) if run.tiny else None
    guidance = bench.default_guidance(spec.pipeline)
    request = GenerationRequest(model=model, prompt=bench.PROMPT, width=scale.width, height=scale.height, seed=0,
                                steps=scale.klein_steps, guidance=guidance, acceleration="none",
                                output_format="png", safety_checker=False)
    report.update(model=model, device=run.device_name, random_weights=True, tiny=run.tiny,
                  request={"width": scale.width, "height": scale.height, "steps": scale.klein_steps,
                           "guidance": guidance, "warmup": scale.warmup, "repeat": scale.repeat,
                           "prompts": "a new prompt every run (bench.prompt_for), safety checker off"},
                  levels={})
    baseline = run.step("klein", report, "baseline", lambda: bench.run_baseline(
        spec=spec, settings=settings, device=device, dtype=run.dtype, random_weights=True, request=request,
        references=[], warmup=scale.warmup, repeat=scale.repeat, arch=arch))
    report["baseline"] = baseline
    free_memory(device)
    engine = Engine(settings, catalog)
    try:
        build = run.step("klein", report, "build", lambda: bench.load_timed(engine, spec, safety=False))
        if build is None:
            return klein_headline(run, report)
        report["build"] = {**build, "placement": engine.placement()["models"].get(model)}
        pipe = engine._models[model].pipe
        flops = bench.config_flops(pipe.transformer.config, scale.width, scale.height, [])
        report["flops"] = {**flops, "per_step": flops["forward"], "passes_per_step": 1}
        held = engine._models[model].placement.transformer
        reference: dict = {}
        for index, level in enumerate(LEVELS):
            result = run.step("klein", report, level, lambda level=level, index=index: klein_level(
                run, engine, request, level, index, flops["forward"], held, baseline, reference))
            if result is not None:
                report["levels"][level] = result
                run.save("klein", report)
        del pipe
    finally:
        close_engine(engine)
        accel.prompt_cache().clear()
        release_compiled()
        free_memory(device)
        report["allocated_after_cleanup_gib"] = allocated_gib(device)
    return klein_headline(run, report)


def klein_level(run: Run, engine, request, level: str, index: int, flops_per_step: float, held: str,
                baseline: dict | None, reference: dict) -> dict:
    """One acceleration level on the resident build: timed requests, then one image with the fixed prompt and
    seed, compared with the ``none`` level's."""
    from fluxserve import bench
    from fluxserve.engine import accel

    scale = run.scale
    req = request.model_copy(update={"acceleration": level})
    timing = bench.time_requests(engine, req, warmup=scale.warmup, repeat=scale.repeat,
                                 first_prompt=100 * (index + 1), extras=False)
    state = accel.acceleration_state(engine._models[request.model].pipe) or {}
    precision = state.get("transformer_precision", "unknown")
    image = png_pixels(engine.generate(req).images[0].data)
    if level == "none":
        reference["image"] = image
    error = rel_error(image, reference["image"]) if "image" in reference else None
    result = {
        "what": run.where(request.model, f"{scale.klein_steps} steps", precision, level),
        "level": state.get("level"), "requested": level, "precision": precision,
        "precision_summary": bench.precision_summary(held, precision),
        "attention": state.get("attention"), "fused_qkv": state.get("fused_qkv"), "compiled": state.get("compiled"),
        "cuda_graphs": state.get("cuda_graphs"), "compile_failed": state.get("compile_failed"),
        "vae_compiled": state.get("vae_compiled"), "vae_compile_failed": state.get("vae_compile_failed"),
        "notes": state.get("notes"),
        "step_ms": timing["step_ms"], "step_ms_all": timing["step_ms_all"],
        "end_to_end_s": timing["end_to_end_s"], "end_to_end_all_s": timing["end_to_end_all_s"],
        "stages_s": timing["stages_s"], "cold_start_s": timing["cold_start_s"], "warmup_s": timing["warmup_s"],
        "peak_memory_gib": timing["peak_memory_gib"],
        "mfu": mfu(flops_per_step, timing["step_ms"], run.device_name, precision, run.device),
        "vs_diffusers": {
            "end_to_end": ratio((baseline or {}).get("end_to_end_s"), timing["end_to_end_s"]),
            "per_step": ratio((baseline or {}).get("step_ms"), timing["step_ms"]),
            "note": "stock diffusers time / fluxserve time (above 1: fluxserve is faster)",
        },
        "image_rel_error_vs_none": error,
        "image_std": float(image.std()),
        "image_note": "PNG decoded to floats, same prompt and seed as the none level; random weights: the image "
                      "is noise, so the error measures numerics only (image_std > 0: not a constant image)",
    }
    log(f"{result['what']}: {num(result['step_ms'])} ms/step, end to end {num(result['end_to_end_s'])} s, "
        f"cold first request {num(result['cold_start_s'])} s, peak {num(result['peak_memory_gib'])} GiB, MFU "
        f"{pct(result['mfu']['value'])}, x diffusers {num(result['vs_diffusers']['end_to_end'])} end to end, "
        f"image error vs none {num(error)}")
    return result


def klein_headline(run: Run, report: dict) -> dict:
    headline: dict = {}
    base = report.get("baseline")
    if base:
        headline["diffusers"] = {"what": run.where(report["model"], f"{run.scale.klein_steps} steps",
                                                   str(run.dtype).removeprefix("torch."), "stock diffusers"),
                                 "step_ms": base.get("step_ms"), "end_to_end_s": base.get("end_to_end_s"),
                                 "peak_memory_gib": base.get("peak_memory_gib")}
    for level, row in report.get("levels", {}).items():
        headline[level] = {key: row.get(key) for key in ("what", "precision", "step_ms", "end_to_end_s",
                                                          "cold_start_s", "peak_memory_gib",
                                                          "image_rel_error_vs_none")}
        headline[level]["mfu"] = row["mfu"].get("value")
        headline[level]["x_diffusers_end_to_end"] = row["vs_diffusers"]["end_to_end"]
        headline[level]["x_diffusers_per_step"] = row["vs_diffusers"]["per_step"]
    return headline


