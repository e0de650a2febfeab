"""Part ``whole_request``: FLUX.2 [dev] as an 80 GB GPU serves it, measured on a larger one.

The process's GPU memory is capped at 80 GiB (``Settings.gpu_memory_cap``, applied by the engine at start with
``torch.cuda.set_per_process_memory_fraction``), so the memory plan, the random-weight build and every request
see an 80 GiB GPU. Two placements, each on an engine of its own, with random weights of the real architectures
(the engine's setting ``random_weights``: ``random_weights.build_placed_random_pipeline`` on the plan the engine
makes under the cap):

* ``default``: what the plan picks with nothing forced: the FP8 transformer and the FP8 text encoder;
* ``bf16_stream``: ``--transformer bf16``: the bf16 transformer, and the plan then streams the text encoder
  (Mistral Small, 24B parameters) from host memory layer by layer for each new prompt.

Whole requests through ``Engine.generate`` at 1024x1024, 28 steps, the default acceleration level (``regular``),
safety checker off: one warm-up request of a few steps (compilation, CUDA graphs), then measured requests of 28
steps, each with a prompt of its own so the prompt cache never hides the text encoder. Per placement: the
placement as the engine reports it (and whether it is the expected one: without the cap a 141 GB GPU would hold
everything in bf16), the build, the stages (text encoding, denoising, per step, decoding, encoding), end to end,
peak GPU memory (allocated and reserved, against the cap) and host memory. ``--tiny``: the same code on the CPU
with tiny models; the cap is passed the same way and recorded as not applicable there.
"""

from __future__ import annotations

import resource
import time

from gpu_parts.common import (
    Run,
    allocated_gib,
    close_engine,
    free_memory,
    log,
    median,
    memory_reset,
    num,
    release_compiled,
    sync,
)

GIB = 1024**3
CAP_BYTES = 80 * GIB
STEPS = {"gpu": 28, "tiny": 2}  # the measured requests' steps
WARMUP_STEPS = {"gpu": 4, "tiny": 1}  # enough for the compiled graphs and CUDA graphs (captured per shape)
REPEAT = {"gpu": 2, "tiny": 1}  # measured requests per placement
# name -> (the placement asked for, the one the plan must choose under an 80 GiB cap, in words)
PLACEMENTS = {
    "default": ({"transformer": "auto", "text_encoder": "auto"}, ("fp8", "fp8"),
                "the default under the cap: FP8 transformer + FP8 text encoder"),
    "bf16_stream": ({"transformer": "bf16", "text_encoder": "auto"}, ("bf16", "stream"),
                    "--transformer bf16: bf16 transformer + text encoder streamed from host memory"),
}
STAGES = ("text_encoding", "denoising", "decoding", "safety", "encoding", "inference")

ESTIMATES = {
    # build: the random weights drawn on the GPU (the streamed text encoder copied to ~71 GiB of pinned host
    # memory); warmup: the first request compiles the transformer (FP8: ~60 s on an H200) and captures CUDA graphs
    "gpu": {"whole_request": 205,  # the default placement's steps; bf16_stream checks its own
            "whole_request.default.build": 45, "whole_request.default.warmup": 120,
            "whole_request.default.requests": 40,
            "whole_request.bf16_stream.build": 100, "whole_request.bf16_stream.warmup": 90,
            "whole_request.bf16_stream.requests": 50},
    "tiny": {"whole_request": 30,
             "whole_request.default.build": 4, "whole_request.default.warmup": 4,
             "whole_request.default.requests": 4,
             "whole_request.bf16_stream.build": 4, "whole_request.bf16_stream.warmup": 4,
             "whole_request.bf16_stream.requests": 4},
}


def part(run: Run, report: dict) -> dict:
    from fluxserve import bench
    from fluxserve.catalog import Catalog
    from fluxserve.request import GenerationRequest

    mode = "tiny" if run.tiny else "gpu"
    scale, catalog = run.scale, Catalog.load()
    request = GenerationRequest(model="dev", prompt=bench.PROMPT, width=scale.width, height=scale.height, seed=0,
                                steps=STEPS[mode], guidance=bench.default_guidance("Flux2Pipeline"),
                                acceleration="regular", output_format="png", safety_checker=False)
    report.update(model="dev", device=run.device_name, tiny=run.tiny, random_weights=True,
                  memory_cap={"requested_gib": CAP_BYTES / GIB, "setting": "Settings.gpu_memory_cap "
                              "(--gpu-memory-cap 80GiB, FLUXSERVE_GPU_MEMORY_CAP)", "per_placement": {}},
                  request={"width": scale.width, "height": scale.height, "steps": STEPS[mode],
                           "steps_note": f"{STEPS[mode]} steps measured, nothing extrapolated",
                           "warmup_steps": WARMUP_STEPS[mode], "repeat": REPEAT[mode],
                           "guidance": request.guidance, "acceleration": request.acceleration,
                           "prompts": "a new prompt for every request (bench.prompt_for), safety checker off"},
                  placement={}, stages={}, placements={})
    for index, (name, (requested, expected, words)) in enumerate(PLACEMENTS.items()):
        row = report["placements"].setdefault(name, {"what": words, "requested": requested})
        try:
            measure_placement(run, report, catalog, request, name, requested, expected, row, 1000 * (index + 1))
        finally:
            run.save("whole_request", report)
    return headline(report)


def measure_placement(run: Run, report: dict, catalog, request, name: str, requested: dict, expected: tuple,
                      row: dict, first_prompt: int) -> None:
    """One placement on an engine of its own under the cap: build, warm-up, measured requests; the engine and
    its memory released afterwards whatever happened."""
    from fluxserve.config import Settings
    from fluxserve.engine import Engine, accel, memory

    mode = "tiny" if run.tiny else "gpu"
    device = run.device
    free_memory(device)
    settings = Settings(data_dir=run.work_dir / "data", device=str(device), gpu_memory_cap=CAP_BYTES,
                        transformer_placement=requested["transformer"],
                        text_encoder_placement=requested["text_encoder"],
                        random_weights="tiny" if run.tiny else "full")
    engine = Engine(settings, catalog)
    cap = engine.memory_cap.as_dict()
    cap["pytorch_fraction"] = _pytorch_fraction(device)
    report["memory_cap"]["per_placement"][name] = cap
    row["memory_cap"] = cap
    row["memory_before_build"] = memory.memory_report(device)
    log(f"whole_request.{name}: memory cap {cap['requested_gib']} GiB: "
        + (cap["how"] if cap["applied"] else f"not applied ({cap['note']})"))
    try:
        built = run.step("whole_request", report, f"{name}.build", lambda: build(run, engine, catalog, cap))
        if built is None:
            return
        placement = engine.placement()
        model = placement["models"]["dev"]
        held = (model["transformer"], model["text_encoder"])
        row["build"] = built
        row["placement"] = {"engine": model, "memory": placement["memory"], "held": list(held),
                            "expected_under_cap": list(expected),
                            "as_expected": held == expected if device.type == "cuda" else None}
        report["placement"][name] = {"summary": model.get("summary"), "transformer": held[0],
                                     "text_encoder": held[1], "as_expected": row["placement"]["as_expected"],
                                     "plan": model.get("plan")}
        planned = model.get("plan") or {}
        log(f"whole_request.{name}: placed {model.get('summary')} "
            + (f"(expected under the cap: {' + '.join(expected)}; the plan needs {planned.get('needed_gib')} GiB of "
               f"{planned.get('free_gib')} GiB free)" if planned else f"({device}: no GPU plan, everything resident)"))
        run.save("whole_request", report)
        warm = request.model_copy(update={"steps": WARMUP_STEPS[mode]})
        row["warmup"] = run.step("whole_request", report, f"{name}.warmup",
                                 lambda: timed_request(run, engine, warm, first_prompt))
        if row["warmup"] is None:
            return
        cache_before = accel.prompt_cache().stats()
        memory_reset(device)
        runs = run.step("whole_request", report, f"{name}.requests",
                        lambda: measured_requests(run, engine, request, first_prompt + 1))
        if runs is None:
            return
        cache_after = accel.prompt_cache().stats()
        row["requests"] = runs
        row["summary"] = summarise(runs, request.steps)
        row["summary"].update(peak_memory(device, cap))
        row["summary"]["prompt_cache_hits"] = cache_after["hits"] - cache_before["hits"]
        row["summary"]["acceleration"] = _acceleration(engine.placement()["models"]["dev"])
        row["summary"]["host_memory"] = host_memory()
        report["stages"][name] = row["summary"]
        log(f"whole_request.{name}: {model.get('summary')}: end to end {num(row['summary']['end_to_end_s'])} s "
            f"(text encoding {num(row['summary']['stages_s']['text_encoding'])} s, denoising "
            f"{num(row['summary']['stages_s']['denoising'])} s at {num(row['summary']['step_ms'])} ms/step, "
            f"decoding {num(row['summary']['stages_s']['decoding'])} s, encoding "
            f"{num(row['summary']['stages_s']['encoding'])} s), peak {num(row['summary']['peak_allocated_gib'])} "
            f"GiB allocated / {num(row['summary']['peak_reserved_gib'])} GiB reserved under the cap")
    finally:
        close_engine(engine)
        accel.prompt_cache().clear()
        release_compiled()
        free_memory(device)
        _release_pinned_host_memory()
        row["lifted_cap"] = memory.apply_memory_cap(device, 0).as_dict()
        row["allocated_after_cleanup_gib"] = allocated_gib(device)


def build(run: Run, engine, catalog, cap: dict) -> dict:
    """The random-weight [dev] pipeline built where the engine's plan (under the cap) puts it."""
    from fluxserve import bench

    loaded = bench.load_timed(engine, catalog.models["dev"], safety=False)  # the engine's random_weights setting
    loaded["reserved_memory_gib"] = _reserved_gib(run.device)
    loaded["peak"] = peak_memory(run.device, cap)  # while building, against the cap
    loaded["host_memory"] = host_memory()
    log(f"whole_request: built in {loaded['load_s']:.1f} s, peak {num(loaded['load_peak_memory_gib'])} GiB, "
        f"resident {num(loaded['resident_memory_gib'])} GiB")
    return loaded


def timed_request(run: Run, engine, request, prompt_index: int) -> dict:
    """One whole request with a prompt of its own: wall time around ``Engine.generate``, the engine's stage
    timings, and each step's time from the progress callback (after a device synchronise)."""
    from fluxserve import bench

    clock = bench.StepClock(run.device)
    clock.begin()
    result = engine.generate(request.model_copy(update={"prompt": bench.prompt_for(prompt_index)}),
                             on_progress=lambda _progress: clock.tick())
    sync(run.device)
    wall = time.perf_counter() - clock.start
    return {"steps": request.steps, "wall_s": wall,
            "stages_s": {key: float(result.timings.get(key, 0.0)) for key in STAGES},
            "step_ms_all": clock.step_ms(), "images": len(result.images),
            "image_bytes": len(result.images[0].data) if result.images else 0}


def measured_requests(run: Run, engine, request, first_prompt: int) -> list[dict]:
    """``REPEAT`` whole requests; a later one only when the time it took the first still fits the budget."""
    runs: list[dict] = []
    for index in range(REPEAT["tiny" if run.tiny else "gpu"]):
        if runs and run.budget.left() < 1.5 * runs[0]["wall_s"] + 20:
            log(f"whole_request: request {index + 1} left out: {run.budget.left():.0f} s left")
            break
        runs.append(timed_request(run, engine, request, first_prompt + index))
    return runs


def summarise(runs: list[dict], steps: int) -> dict:
    """Medians over the measured requests: the stages, end to end (the wall time of ``Engine.generate``), the
    pipeline (text encoding + denoising + decoding) and the step; a 28-step figure from them."""
    stages = {key: median([r["stages_s"][key] for r in runs]) for key in STAGES}
    step_times = [ms for r in runs for ms in r["step_ms_all"]]
    step_ms = median(step_times)
    if step_ms is None and stages["denoising"]:  # one step: the stage is the step
        step_ms = stages["denoising"] * 1000 / steps
    fixed = sum(stages[key] or 0.0 for key in ("text_encoding", "decoding", "safety", "encoding"))
    return {
        "requests": len(runs), "steps": steps, "stages_s": stages, "step_ms": step_ms, "step_ms_all": step_times,
        "end_to_end_s": median([r["wall_s"] for r in runs]),
        "end_to_end_all_s": [r["wall_s"] for r in runs],
        "pipeline_s": median([r["stages_s"]["text_encoding"] + r["stages_s"]["denoising"]
                              + r["stages_s"]["decoding"] for r in runs]),
        "steps_28_s": fixed + 28 * step_ms / 1000 if step_ms is not None else None,
        "steps_28_note": ("measured at 28 steps" if steps == 28 else
                          f"measured at {steps} steps; 28 steps = the other stages + 28 x the median step"),
    }


def peak_memory(device, cap: dict) -> dict:
    """Peak GPU memory since the last reset (allocated and reserved by PyTorch's allocator), against the cap."""
    import torch

    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "within_cap": None}
    allocated = torch.cuda.max_memory_allocated(device) / GIB
    reserved = torch.cuda.max_memory_reserved(device) / GIB
    return {"peak_allocated_gib": round(allocated, 2), "peak_reserved_gib": round(reserved, 2),
            "within_cap": reserved <= cap["requested_gib"] + 1e-6 if cap["applied"] else None}


def host_memory() -> dict:
    """The process's peak resident host memory (pinned memory of a streamed component included) and the CUDA
    pinned-memory allocator's figures where torch has them."""
    info: dict = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    try:
        import torch

        if torch.cuda.is_available():
            stats = torch.cuda.host_memory_stats()
            info["pinned"] = {key: round(value / GIB, 2) for key, value in stats.items()
                              if "bytes" in key and isinstance(value, (int, float))}
    except Exception as exc:  # noqa: BLE001 - informative only
        info["pinned"] = f"not available: {type(exc).__name__}"
    return info


def headline(report: dict) -> dict:
    out: dict = {"memory_cap_gib": report["memory_cap"]["requested_gib"]}
    for name, row in report.get("placements", {}).items():
        summary = row.get("summary") or {}
        placed = report.get("placement", {}).get(name, {})
        out[name] = {"placement": placed.get("summary"), "as_expected": placed.get("as_expected"),
                     "end_to_end_s": summary.get("end_to_end_s"), "step_ms": summary.get("step_ms"),
                     "text_encoding_s": (summary.get("stages_s") or {}).get("text_encoding"),
                     "peak_reserved_gib": summary.get("peak_reserved_gib")}
    return out


def _acceleration(model: dict) -> dict:
    """What the measured requests ran, from the engine's placement report of the model."""
    state = model.get("acceleration") or {}
    return {key: state.get(key) for key in ("level", "transformer_precision", "attention", "compiled",
                                              "cuda_graphs", "compile_failed", "notes")}


def _pytorch_fraction(device) -> float | None:
    """The memory fraction PyTorch's allocator holds for ``device``, where torch can say (None otherwise)."""
    import torch

    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
    if device.type != "cuda" or getter is None:
        return None
    try:
        return float(getter(device))
    except Exception:  # noqa: BLE001 - informative only
        return None


def _reserved_gib(device) -> float | None:
    import torch

    return round(torch.cuda.memory_reserved(device) / GIB, 2) if device.type == "cuda" else None


def _release_pinned_host_memory() -> None:
    """Give the pinned host memory a streamed component held back to the system (PyTorch caches freed pinned
    blocks); best effort, where torch has the call."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None)
    if torch.cuda.is_available() and empty is not None:
        empty()
