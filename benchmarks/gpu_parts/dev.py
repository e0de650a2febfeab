"""Part ``dev``: the FLUX.2 [dev] transformer alone (one forward = one denoising step): none, regular (bf16), then
high with the transformer held in FP8 (what an 80 GB GPU runs at every level): compile time, ms/step, peak memory,
MFU, error against ``none``."""

from __future__ import annotations

import time

from gpu_parts.common import (
    Run,
    TransformerOnly,
    allocated_gib,
    dev_inputs,
    dev_transformer_meta,
    free_memory,
    log,
    median,
    memory_reset,
    mfu,
    num,
    pct,
    peak_gib,
    rel_error,
    release_compiled,
    sync,
    time_calls,
)

ESTIMATES = {
    "gpu": {"dev": 210, "dev.build": 20, "dev.none": 15, "dev.regular": 85, "dev.high": 85},
    "tiny": {"dev": 15, "dev.build": 3, "dev.none": 3, "dev.regular": 3, "dev.high": 3},
}


def part(run: Run, report: dict) -> dict:
    import torch

    from fluxserve import bench
    from fluxserve.engine import fp8, plan
    from fluxserve.engine.placement import linear_shapes as shapes_of
    from fluxserve.engine.placement import module_bytes

    scale = run.scale
    meta = dev_transformer_meta(run)
    flops = bench.config_flops(meta.config, scale.width, scale.height, [])
    size = module_bytes(meta, run.dtype)
    element = torch.empty((), dtype=run.dtype).element_size()
    fp8_size = plan.fp8_footprint(size, shapes_of(meta, fp8.transformer_block_filter), element)
    report.update(model="dev", component="transformer", device=run.device_name, tiny=run.tiny,
                  resolution=f"{scale.width}x{scale.height}", tokens=flops["tokens"],
                  flops={**flops, "per_step": flops["forward"]},
                  bytes={"full_precision": size, "fp8": fp8_size, "dtype": str(run.dtype).removeprefix("torch.")},
                  note="one transformer forward = one denoising step ([dev] is guidance-distilled: one pass); "
                       "random inputs of the pipeline's shapes; "
                       + ("CUDA events around each forward" if run.device.type == "cuda" else "wall time"),
                  levels={})
    del meta
    pipe = run.step("dev", report, "build", lambda: build_dev(run, report))
    if pipe is None:
        return dev_headline(run, report)
    inputs = dev_inputs(pipe.transformer.config, run)
    reference: dict = {}
    for level in run.dev_levels:
        result = run.step("dev", report, level, lambda level=level: dev_level(
            run, pipe, inputs, level, flops["forward"], reference))
        if result is not None:
            report["levels"][level] = result
            run.handoff["dev"] = {"pipe": pipe, "inputs": inputs, "level": level}
            run.save("dev", report)
    report["placement_80gb"] = placement_choice(report)
    return dev_headline(run, report)


def build_dev(run: Run, report: dict) -> TransformerOnly:
    """The [dev] transformer with seeded random weights, materialised tensor by tensor on the device."""

    from fluxserve.engine import memory, random_weights
    from fluxserve.engine.placement import place_module
    from fluxserve.engine.plan import headroom_bytes

    device = run.device
    transformer = dev_transformer_meta(run)
    if device.type == "cuda":
        free, total = memory.free_gpu_bytes(device)
        need = report["bytes"]["full_precision"] + headroom_bytes(total)
        report["memory_before_build"] = {"free_gib": round(free / 2**30, 2), "needed_gib": round(need / 2**30, 2)}
        if need > free:
            raise MemoryError(f"the bf16 [dev] transformer needs {need / 2**30:.1f} GiB with working memory; "
                              f"{free / 2**30:.1f} GiB free on {run.device_name}")
    memory_reset(device)
    start = time.perf_counter()
    place_module(transformer, device, materialise=random_weights.random_init(0, "transformer"))
    sync(device)
    report["build"] = {"seconds": round(time.perf_counter() - start, 2), "peak_memory_gib": peak_gib(device),
                       "resident_gib": allocated_gib(device), "dtype": str(run.dtype).removeprefix("torch.")}
    return TransformerOnly(transformer.eval())


def dev_level(run: Run, pipe: TransformerOnly, inputs: dict, level: str, flops_per_step: float,
              reference: dict) -> dict:
    """One level: the first (cold) forward, warm forwards (median of ``forward_repeat``), peak memory, MFU and
    the output's error against ``none``'s. ``high`` first holds the transformer in FP8 (``prepare_transformer``:
    quantised in place, the bf16 weights released), as the 80 GB placement does."""
    import torch

    from fluxserve.engine import accel

    device, scale = run.device, run.scale
    extra: dict = {}
    if level == "high":
        release_compiled()  # the bf16 graphs' memory pools go before the FP8 ones are recorded
        free_memory(device)
        start = time.perf_counter()
        held = accel.prepare_transformer(pipe, "fp8", device)
        sync(device)
        extra["quantise_s"] = round(time.perf_counter() - start, 2)
        extra["held"] = held
        extra["resident_gib_after_quantise"] = allocated_gib(device)
        free_memory(device)
    memory_reset(device)
    state = accel.apply_acceleration(pipe, level, device)

    def forward():
        with torch.no_grad():
            return pipe.transformer(**inputs)[0]

    start = time.perf_counter()
    first = forward()
    sync(device)
    cold_s = time.perf_counter() - start
    del first
    # CUDA graphs warm a shape up, then record it, then replay (accel.GRAPH_CAPTURE_CALLS calls)
    warmup = accel.GRAPH_CAPTURE_CALLS if state.get("cuda_graphs") else 1
    times = time_calls(forward, device, warmup=warmup, repeat=scale.forward_repeat)
    out = forward().detach().clone()  # a CUDA graph's output is overwritten by the next replay
    sync(device)
    if level == "none":
        reference["out"] = out
    state = accel.acceleration_state(pipe) or state
    precision = state.get("transformer_precision", "unknown")
    step_ms = median(times)
    result = {
        "what": run.where("dev transformer", "per step (one forward)", precision, level),
        "level": state.get("level"), "requested": level, "precision": precision,
        "attention": state.get("attention"), "fused_qkv": state.get("fused_qkv"), "compiled": state.get("compiled"),
        "cuda_graphs": state.get("cuda_graphs"), "compile_failed": state.get("compile_failed"),
        "vae_compiled": state.get("vae_compiled"), "vae_compile_failed": state.get("vae_compile_failed"),
        "notes": state.get("notes"), **extra,
        "cold_first_forward_s": cold_s, "step_ms": step_ms, "step_ms_all": times,
        "steps_28_s": step_ms * 28 / 1000 if step_ms else None,
        "peak_memory_gib": peak_gib(device),
        "mfu": mfu(flops_per_step, step_ms, run.device_name, precision, device),
        "rel_error_vs_none": rel_error(out, reference["out"]) if "out" in reference else None,
    }
    log(f"{result['what']}: {num(step_ms)} ms/step ({num(result['steps_28_s'])} s for 28 steps), first "
        f"forward {cold_s:.2f} s, peak {num(result['peak_memory_gib'])} GiB, MFU {pct(result['mfu']['value'])}, "
        f"error vs none {num(result['rel_error_vs_none'])}")
    return result


def placement_choice(report: dict) -> dict:
    """The two ways [dev] fits an 80 GB GPU, side by side: a bf16 transformer (its text encoder streamed from host
    memory) runs ``regular`` in bf16; a transformer held in FP8 (text encoder FP8 too) runs FP8 matmuls at every
    level, which is the ``high`` row here."""
    levels = report.get("levels", {})
    bf16, fp8_held = levels.get("regular") or {}, levels.get("high") or {}
    choice = {
        "bf16_transformer_streamed_text_encoder": {
            "step_ms": bf16.get("step_ms"), "precision": bf16.get("precision"),
            "rel_error_vs_none": bf16.get("rel_error_vs_none"), "peak_memory_gib": bf16.get("peak_memory_gib"),
            "note": "lossless; each new prompt streams the text encoder (Mistral, 48 GB) over PCIe: not measured "
                    "here"},
        "fp8_transformer_fp8_text_encoder": {
            "step_ms": fp8_held.get("step_ms"), "precision": fp8_held.get("precision"),
            "rel_error_vs_none": fp8_held.get("rel_error_vs_none"),
            "peak_memory_gib": fp8_held.get("peak_memory_gib"),
            "note": "lossy (FP8 weights and activations) at every level, the text encoder resident in FP8"},
    }
    if bf16.get("step_ms") and fp8_held.get("step_ms"):
        choice["fp8_speedup_per_step"] = bf16["step_ms"] / fp8_held["step_ms"]
    return choice


def dev_headline(run: Run, report: dict) -> dict:
    headline: dict = {}
    for level, row in report.get("levels", {}).items():
        headline[level] = {key: row.get(key) for key in ("what", "precision", "step_ms", "cold_first_forward_s",
                                                          "peak_memory_gib", "rel_error_vs_none")}
        headline[level]["mfu"] = row["mfu"].get("value")
    if "placement_80gb" in report:
        headline["fp8_speedup_per_step"] = report["placement_80gb"].get("fp8_speedup_per_step")
    return headline


