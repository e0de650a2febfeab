"""Part ``dev``: the FLUX.2 [dev] transformer alone (one forward = one denoising step): none, regular (bf16, the
attention backend the engine measured and chose), then high with the transformer held in FP8 (what an 80 GB GPU
runs at every level; the fused quantisation kernels and FP8 attention where they run); then ``high`` with each lossy
or fused switch flipped against what ``high`` chose (``VARIANTS``): compile time, ms/step, peak memory, MFU, error
against ``none`` (and against ``high`` for the variants), and a profile of one step at ``regular`` and ``high``
(``profile.json``)."""

from __future__ import annotations

import time

from gpu_parts.common import (
    LEVELS,
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

# ``high`` with one switch flipped: name -> (what it changes, the AccelOptions fields it sets). A variant whose
# switches resolve to what ``high`` ran already (FP8 attention not available, say) is recorded as the same, not run
# (but with --tiny, where every switch resolves the same on the CPU, so that the code path runs).
VARIANTS = {
    "high-unfused": ("the fused FP8 kernels off: inductor's own activation quantisation", {"fused_kernels": False}),
    "high-fp8-attention": ("FP8 attention forced on", {"fp8_attention": True}),
    "high-bf16-attention": ("FP8 attention forced off: the exact backend", {"fp8_attention": False}),
    "high-fast-accum": ("_scaled_mm with fast accumulation", {"fp8_fast_accum": True}),
}
RUNS = (*LEVELS, *VARIANTS)
PROFILED = ("regular", "high")
TRANSFORMER_SAVINGS_AT = "high"  # the level the RoPE cache and the graph partitions are measured at
# the state fields that tell two high runs apart
SWITCH_FIELDS = ("fused_kernels", "fp8_attention", "attention", "fp8_fast_accum", "block_forward",
                 "split_projection")

ESTIMATES = {
    # measured on an H200 (runs 2 and 3): build 0.3 s, none 6 s, regular 27-31 s (compile, graphs), high 66 s
    # (quantise, FP8 compile); regular adds the attention measurement (at most 20 s), a variant recompiles the blocks.
    # The part's own estimate is what it needs to say anything (build, none, regular); each later step checks its own.
    "gpu": {"dev": 70, "dev.build": 10, "dev.none": 10, "dev.regular": 50, "dev.profile-regular": 8,
            "dev.high": 85, "dev.rope-cache": 8, "dev.graph-partitions": 10, "dev.profile-high": 8,
            "dev.high-unfused": 60, "dev.high-fp8-attention": 60, "dev.high-bf16-attention": 60,
            "dev.high-fast-accum": 60},
    "tiny": {"dev": 25, "dev.build": 3, "dev.none": 3, "dev.regular": 3, "dev.profile-regular": 2, "dev.high": 3,
             "dev.rope-cache": 2, "dev.graph-partitions": 2, "dev.profile-high": 2, "dev.high-unfused": 2,
             "dev.high-fp8-attention": 2, "dev.high-bf16-attention": 2, "dev.high-fast-accum": 2},
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
    profiles: dict = {"part": "dev", "levels": {}}
    for name in run.dev_levels:
        variant = VARIANTS.get(name)
        if variant is not None and "high" not in report["levels"]:
            report.setdefault("skipped", {})[name] = "high did not run before it"
            continue
        result = run.step("dev", report, name, lambda name=name: dev_level(
            run, pipe, inputs, name, flops["forward"], reference))
        if result is None:
            continue
        report["levels"][name] = result
        run.save("dev", report)
        if name == TRANSFORMER_SAVINGS_AT:
            for saving, measure in (("rope-cache", "measure_rope_cache"), ("graph-partitions",
                                                                           "measure_graph_partitions")):
                row = run.step("dev", report, saving, lambda name=name, measure=measure: transformer_saving(
                    run, pipe, inputs, name, measure))
                if row is not None:
                    report.setdefault("lossless", {})[saving] = row
                    run.save("dev", report)
        if name in PROFILED:
            from gpu_parts.profile import profile_step

            record = run.step("dev", report, f"profile-{name}", lambda name=name: profile_step(run, pipe, inputs,
                                                                                                name))
            if record is not None:
                profiles["levels"][name] = record
                run.save("profile", profiles)
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


def dev_level(run: Run, pipe: TransformerOnly, inputs: dict, name: str, flops_per_step: float,
              reference: dict) -> dict:
    """One level or variant: the first (cold) forward, warm forwards (median of ``forward_repeat``), peak memory,
    MFU and the output's error against ``none``'s (a variant's against ``high``'s too). ``high`` first holds the
    transformer in FP8 (``prepare_transformer``: quantised in place, the bf16 weights released), as the 80 GB
    placement does."""
    import dataclasses

    import torch

    from fluxserve.engine import accel

    device, scale = run.device, run.scale
    extra: dict = {}
    level = "high" if name in VARIANTS else name
    options = accel.AccelOptions.from_env()
    if name in VARIANTS:
        what, fields = VARIANTS[name]
        options = dataclasses.replace(options, **fields)
        extra["variant"] = what
        state = accel.apply_acceleration(pipe, level, device, options=options)
        switches = {key: state.get(key) for key in SWITCH_FIELDS}
        if switches == reference.get("high_switches") and not run.tiny:  # tiny: measured anyway, for the test
            return {"variant": what, "same_as": "high", "switches": switches,
                    "note": "the switch resolved to what high ran: not measured again"}
    if level == "high" and name == "high":
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
    state = accel.apply_acceleration(pipe, level, device, options=options)

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
    if name == "none":
        reference["out"] = out
    state = accel.acceleration_state(pipe) or state
    if name == "high":
        reference["high_out"] = out
        reference["high_switches"] = {key: state.get(key) for key in SWITCH_FIELDS}
    if name in VARIANTS and "high_out" in reference:
        extra["rel_error_vs_high"] = rel_error(out, reference["high_out"])
    precision = state.get("transformer_precision", "unknown")
    step_ms = median(times)
    result = {
        "what": run.where("dev transformer", "per step (one forward)", precision, name),
        "level": state.get("level"), "requested": level, "precision": precision,
        **{key: state.get(key) for key in SWITCH_FIELDS},
        "attention_why": state.get("attention_why"), "fp8_attention_why": state.get("fp8_attention_why"),
        "fused_qkv": state.get("fused_qkv"), "compiled": state.get("compiled"),
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
        f"error vs none {num(result['rel_error_vs_none'])}"
        + (f", vs high {num(extra['rel_error_vs_high'])}" if "rel_error_vs_high" in extra else "")
        + f"; attention {result['attention']} (FP8 {result['fp8_attention']}), fused kernels "
        f"{result['fused_kernels']}, fast accumulation {result['fp8_fast_accum']}")
    return result


def transformer_saving(run: Run, pipe, inputs: dict, level: str, measure: str) -> dict:
    """A lossless saving of the transformer's own, off and on (``lossless_checks.measure_rope_cache``: the RoPE
    tables kept per shape; ``measure_graph_partitions``: CUDA graph replays, input copies, host-side eager ops and
    GPU idle time of one step), on the [dev] transformer at ``level`` as it is now."""
    from fluxserve.engine import accel, lossless_checks

    state = accel.apply_acceleration(pipe, level, run.device)
    row = getattr(lossless_checks, measure)(pipe.transformer, inputs, run.device)
    row["what"] = run.where("dev transformer", "one forward", state.get("transformer_precision", "?"), level)
    log(f"{row['what']}: {measure}: " + ", ".join(f"{key} {row.get(key)}" for key in (
        "saved_ms_per_forward", "bit_identical", "cuda_graph_replays_per_forward", "memcpy_dtod") if key in row))
    return row


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
        if "same_as" in row:
            headline[level] = {"same_as": row["same_as"]}
            continue
        headline[level] = {key: row.get(key) for key in ("what", "precision", "step_ms", "cold_first_forward_s",
                                                          "peak_memory_gib", "rel_error_vs_none", "rel_error_vs_high",
                                                          "attention", "fp8_attention", "fused_kernels")
                           if key in row}
        headline[level]["mfu"] = row["mfu"].get("value")
    if "placement_80gb" in report:
        headline["fp8_speedup_per_step"] = report["placement_80gb"].get("fp8_speedup_per_step")
    return headline


