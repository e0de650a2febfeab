"""Part ``lossless``: the lossless savings of ``regular``/``high`` that act on the pipeline around the transformer,
each off and on (``fluxserve.engine.lossless_checks``), on a [klein] 4B pipeline built here: the text encoder
compiled for its fixed 512 tokens, the post-processing to uint8 on the GPU (bit-identical pixels) and
``cudnn.benchmark`` for the VAE decode. The transformer's own (the RoPE tables kept per shape, the CUDA graph
partitions of a step) are measured by the ``dev`` part on [dev]."""

from __future__ import annotations

from gpu_parts.common import Run, free_memory, log, release_compiled

ESTIMATES = {
    "gpu": {"lossless": 120, "lossless.klein": 110},
    "tiny": {"lossless": 20, "lossless.klein": 15},
}


def part(run: Run, report: dict) -> dict:
    report.update(device=run.device_name, resolution=f"{run.scale.width}x{run.scale.height}",
                  note="each saving measured off and on in the same process (CUDA events on a GPU); exactness as "
                       "the saving promises it (bit_identical, rel_error)")
    run.step("lossless", report, "klein", lambda: klein_savings(run, report))
    headline: dict = {}
    for name in ("text_encoder_compile", "postprocess", "vae_cudnn_benchmark"):
        row = report.get("klein", {}).get(name)
        if row:
            headline[name] = off_on(row)
    return headline


EXACTNESS = ("bit_identical", "bit_identical_at_boundaries", "rel_error", "first_call_s", "first_call_on_s",
             "recompiles_for_later_prompts", "compiled", "compile_failed", "status", "why")


def off_on(row: dict) -> dict:
    """A measurement's median ms off and on, and what it says of exactness and first calls."""
    out = {f"{side}_ms": (row.get(side) or {}).get("median_ms") for side in ("off", "on")}
    out.update({key: row[key] for key in EXACTNESS if key in row})
    return out


def klein_savings(run: Run, report: dict) -> dict:
    """The text encoder compiled, the post-processing on the GPU and cudnn.benchmark on a [klein] 4B build."""
    result: dict = {"what": run.where("klein-4b", "one prompt / one image", str(run.dtype).removeprefix("torch."),
                                      "regular")}
    report["klein"] = result
    try:
        measure_klein(run, report, result)
    finally:  # the pipeline is gone with measure_klein's frame; its graphs and memory go here
        release_compiled()
        free_memory(run.device)
    return result


def measure_klein(run: Run, report: dict, result: dict) -> None:
    from fluxserve.engine import accel, lossless_checks, random_weights

    arch = random_weights.tiny_architecture("klein-4b") if run.tiny else None
    pipe, _placement = random_weights.build_placed_random_pipeline("klein-4b", run.device, run.dtype, seed=0,
                                                                   arch=arch)
    accel.apply_acceleration(pipe, "regular", run.device)
    width, height = run.scale.width, run.scale.height
    measures = {
        "postprocess": lambda: lossless_checks.measure_postprocess(pipe.image_processor, run.device, width=width,
                                                                   height=height),
        "vae_cudnn_benchmark": lambda: lossless_checks.measure_vae_cudnn_benchmark(pipe, run.device, width=width,
                                                                                   height=height),
        "text_encoder_compile": lambda: lossless_checks.measure_text_encoder_compile(pipe, run.device),
    }
    if run.tiny:  # inductor compiles C++ for a minute on the CPU; tests/test_lossless.py checks the compile there
        measures.pop("text_encoder_compile")
        result["text_encoder_compile"] = {"status": "skipped", "why": "--tiny: not compiled on the CPU"}
    for name, measure in measures.items():
        result[name] = measure()
        run.save("lossless", report)
        log(f"{result['what']}: {name}: " + ", ".join(f"{key} {value}" for key, value in
                                                       off_on(result[name]).items()))
