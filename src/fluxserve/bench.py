"""The benchmark harness behind ``fluxserve bench``.

It measures what the server runs: requests go through ``fluxserve.engine.Engine.generate`` (the same stages,
acceleration and placement as ``fluxserve serve``). Per run it records the engine's stage timings (text
encoding, denoising, decoding, safety, file encoding) and the time of every denoising step (from the progress
callback, after a device synchronise); it reports medians over ``repeat`` runs after ``warmup`` runs, the
peak GPU memory, the model FLOPs utilisation (MFU) against the arithmetic of docs/performance.md, and, with
``baseline="diffusers"``, the same requests through a stock diffusers pipeline (plain ``__call__``, no
acceleration) on the same weights, seeds and inputs, run first in the same process, with the speed-up ratio.

Every run has a prompt of its own, so the prompt cache never hides the text encoder in the measured runs (the
baseline encodes every prompt too); one extra run repeats a prompt to report the cache hit separately. The
headline time is the pipeline (text encoding + denoising + decoding); safety and file encoding are reported
apart (encoding a random-weight noise image says nothing about real images). Random-weight runs need nothing
from any network: no safety checker, tokenizers built locally.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fluxserve.request import GenerationRequest, Progress

PROMPT = "A lighthouse on a rocky coast at dusk, waves breaking, warm light in the windows, 35mm photograph"
STAGES = ("text_encoding", "denoising", "decoding", "safety", "encoding")
TEXT_TOKENS = 512  # prompts are padded to max_sequence_length

# Dense peak rates (FLOP/s, no sparsity) used for MFU. H100 SXM and H200 share the Hopper GH100 tensor cores.
PEAKS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989e12, "fp8": 1979e12},
    "H200": {"bf16": 989e12, "fp8": 1979e12},
}


# ---- arithmetic ---------------------------------------------------------------------------------------------
def transformer_flops(
    *, hidden: int, layers: int, mlp_ratio: float, image_tokens: int, text_tokens: int, ref_tokens: int = 0
) -> dict[str, float]:
    """FLOPs of one FLUX.2 transformer forward for one image (see docs/performance.md).

    Every token passes through ``(4 + 3 r) d^2`` weights per block (QKV 3d^2 and output d^2 of attention,
    SwiGLU in 2 r d^2 and out r d^2; the same count in double and single blocks): linear FLOPs
    ``2 (4 + 3r) d^2 L N``. Attention: ``QK^T`` and ``PV`` are ``2 N^2 d`` each per layer: ``4 N^2 d L``.
    ``N`` = image + text + reference tokens. Embedders, modulation and norms are below 1% and left out.
    """
    n = image_tokens + text_tokens + ref_tokens
    params_per_token = (4 + 3 * mlp_ratio) * hidden * hidden * layers
    linear = 2 * params_per_token * n
    attention = 4 * n * n * hidden * layers
    return {
        "tokens": n,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "reference_tokens": ref_tokens,
        "params_per_token": params_per_token,
        "linear": linear,
        "attention": attention,
        "forward": linear + attention,
    }


def config_flops(config: Any, width: int, height: int, ref_sizes: list[tuple[int, int]]) -> dict[str, float]:
    """``transformer_flops`` from a Flux2Transformer2DModel config and pixel sizes (16 pixels per token side)."""
    hidden = int(config.num_attention_heads) * int(config.attention_head_dim)
    layers = int(config.num_layers) + int(config.num_single_layers)
    refs = sum((w // 16) * (h // 16) for w, h in ref_sizes)
    return transformer_flops(
        hidden=hidden,
        layers=layers,
        mlp_ratio=float(config.mlp_ratio),
        image_tokens=(width // 16) * (height // 16),
        text_tokens=TEXT_TOKENS,
        ref_tokens=refs,
    )


def peak_flops(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, label) for a device name, or (None, reason) when unknown (CPU, other GPUs). Only FP8
    matmuls (``fp8-w8a8``) count against the FP8 peak; FP8 weights multiplied in bf16 run at bf16 rates."""
    fp8_matmul = precision == "fp8-w8a8"
    for key, rates in PEAKS.items():
        if key in device_name:
            rate = rates["fp8" if fp8_matmul else "bf16"]
            return rate, f"{key} dense {'FP8' if fp8_matmul else 'BF16'} {rate / 1e12:.0f} TFLOP/s"
    return None, f"no peak rate known for {device_name!r}: MFU not computed"


def prompt_for(run: int) -> str:
    """A prompt of its own for every run (the same text encoder work, never a prompt-cache hit)."""
    return f"{PROMPT}, take {run + 1}"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message is one line that says why."""


# ---- timing -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepClock:
    """Timestamps of step ends (after a device synchronise); durations are the gaps between them."""

    device: torch.device
    start: float = 0.0
    ends: list[float] = field(default_factory=list)

    def begin(self) -> None:
        _sync(self.device)
        self.start = time.perf_counter()
        self.ends = []

    def tick(self) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Per-step durations from the second step on (the first includes the loop's set-up)."""
        return [(b - a) * 1000 for a, b in zip(self.ends, self.ends[1:])]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- environment --------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {
        "type": device.type,
        "name": platform.processor() or platform.machine() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["threads"] = torch.get_num_threads()
    return info


# ---- inputs -------------------------------------------------------------------------------------------------
def make_references(count: int, width: int, height: int, directory: Path) -> list[Path]:
    """``count`` deterministic reference images (smooth gradients plus seeded noise, never constant)."""
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack(
            [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), np.full_like(x, 40 * i % 256)],
            axis=-1,
        )
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype("uint8")
        path = directory / f"reference-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def default_guidance(pipeline_name: str) -> float:
    return 2.5 if pipeline_name == "Flux2Pipeline" else 1.0


# ---- the stock diffusers baseline ---------------------------------------------------------------------------
def run_baseline(
    *,
    spec,
    settings,
    device: torch.device,
    dtype: torch.dtype,
    random_weights: bool,
    request: GenerationRequest,
    references: list,
    warmup: int,
    repeat: int,
    arch=None,
) -> dict:
    """Stock ``Flux2Pipeline``/``Flux2KleinPipeline.__call__`` with no acceleration on the same weights.
    ``arch``: a ``random_weights.Architecture`` to build instead of the full-size one (tiny CPU runs)."""
    from fluxserve.engine.weights import load_pipeline, resolve_weights

    start = time.perf_counter()
    placement = "resident"
    if random_weights:
        from fluxserve.engine.random_weights import build_random_pipeline

        pipe = build_random_pipeline(spec.key, device, dtype, seed=0, arch=arch)
    else:
        pipe = load_pipeline(spec, resolve_weights(spec, settings), dtype, demo=settings.demo)
        if device.type == "cuda" and not _fits(pipe, device):
            pipe.enable_model_cpu_offload(device=device)  # what stock diffusers needs when it does not fit
            placement = "model_cpu_offload"
        else:
            pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start

    clock = StepClock(device)

    def on_step(_pipe, _i, _t, _kwargs):
        clock.tick()
        return {}

    kwargs = {
        "prompt": request.prompt,
        "image": references or None,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "num_images_per_prompt": request.num_images,
        "output_type": "pil",
        "callback_on_step_end": on_step,
    }
    totals, steps = [], []
    _peak_memory_reset(device)
    for run in range(warmup + repeat):
        kwargs["prompt"] = prompt_for(run)
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(request.seed or 0)
        clock.begin()
        with torch.no_grad():
            pipe(**kwargs)
        _sync(device)
        if run >= warmup:
            totals.append(time.perf_counter() - clock.start)
            steps.extend(clock.step_ms())
    result = {
        "name": "diffusers",
        "pipeline": type(pipe).__name__,
        "placement": placement,
        "load_s": round(load_s, 3),
        "end_to_end_s": _median(totals),
        "end_to_end_all_s": totals,
        "step_ms": _median(steps),
        "peak_memory_gib": _peak_memory_gib(device),
    }
    del pipe
    _free_memory(device)
    return result


def _fits(pipe, device: torch.device) -> bool:
    """Whether the whole pipeline fits the GPU memory the planner sees (under the cap), working memory kept."""
    from fluxserve.engine import memory
    from fluxserve.engine.placement import module_bytes
    from fluxserve.engine.plan import headroom_bytes

    need = sum(module_bytes(getattr(pipe, n)) for n in ("transformer", "text_encoder", "vae"))
    free, total = memory.free_gpu_bytes(device)
    return need + headroom_bytes(total) <= free


# ---- fluxserve ----------------------------------------------------------------------------------------------
def load_for_bench(engine, spec, safety: bool) -> None:
    """Load the model (built with random weights where the engine's setting ``random_weights`` says so), and the
    safety checker when the runs use it, before anything is timed or compiled; any failure is one
    ``BenchError`` line."""
    try:
        engine.load(spec.key)
        if safety:
            engine._safety_checker()
    except (KeyboardInterrupt, BenchError):
        raise
    except Exception as exc:
        what = "build" if engine.settings.random_weights else "load"
        raise BenchError(f"could not {what} {spec.key}: {type(exc).__name__}: {str(exc).splitlines()[0][:500]}"
                         ) from exc


def _prompt_cache_of(engine, model: str):
    from fluxserve.engine import accel

    loaded = engine._models.get(model)
    return accel._cache_of(loaded.pipe) if loaded is not None else None


def run_fluxserve(*, engine, spec, request: GenerationRequest, warmup: int, repeat: int) -> dict:
    """Load (or build) the model, then time ``request`` through the engine (``load_timed`` + ``time_requests``)."""
    loaded = load_timed(engine, spec, safety=request.safety_checker)
    return {**loaded, **time_requests(engine, request, warmup=warmup, repeat=repeat)}


def load_timed(engine, spec, *, safety: bool) -> dict:
    """``load_for_bench`` with its time, the peak GPU memory while loading (FP8 placements never hold a bf16
    component whole) and the memory resident afterwards."""
    device = engine.device
    _peak_memory_reset(device)
    start = time.perf_counter()
    load_for_bench(engine, spec, safety)
    _sync(device)
    return {
        "load_s": round(time.perf_counter() - start, 3),
        "load_peak_memory_gib": _peak_memory_gib(device),
        "resident_memory_gib": (round(torch.cuda.memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None),
    }


def time_requests(
    engine, request: GenerationRequest, *, warmup: int, repeat: int, first_prompt: int = 0, extras: bool = True
) -> dict:
    """Time ``warmup + repeat`` requests on an engine whose model is loaded: stage medians, per-step times,
    the first (cold) request, peak memory. Run ``i`` has the prompt ``prompt_for(first_prompt + i)``, so a
    later call with a higher ``first_prompt`` (another level on the same engine) never hits the prompt cache.
    ``extras``: also time a repeated prompt (a cache hit) and a first request at another resolution."""
    device = engine.device
    clock = StepClock(device)

    def on_progress(_progress: Progress) -> None:
        clock.tick()

    stage_runs: dict[str, list[float]] = {k: [] for k in (*STAGES, "inference")}
    steps: list[float] = []
    warm: list[float] = []
    _peak_memory_reset(device)
    for run in range(warmup + repeat):
        clock.begin()
        prompt = prompt_for(first_prompt + run)
        result = engine.generate(request.model_copy(update={"prompt": prompt}), on_progress=on_progress)
        _sync(device)
        total = time.perf_counter() - clock.start
        if run < warmup:
            warm.append(total)
            continue
        for key, values in stage_runs.items():
            values.append(float(result.timings.get(key, 0.0)))
        steps.extend(clock.step_ms())
        if len(clock.ends) < 2:  # one step: the whole denoising stage is the step
            steps.append(result.timings.get("denoising", 0.0) * 1000 / max(1, request.steps))
    peak = _peak_memory_gib(device)
    repeated, change = None, None
    if extras:
        # The last prompt again: what a repeated prompt costs (a prompt-cache hit where the level has the cache).
        cache = _prompt_cache_of(engine, request.model)
        hits = cache.hits if cache is not None else 0
        again = engine.generate(request.model_copy(
            update={"prompt": prompt_for(first_prompt + warmup + repeat - 1)}))
        repeated = {"prompt_cache_hit": cache is not None and cache.hits > hits,
                    "text_encoding_s": again.timings.get("text_encoding"),
                    "end_to_end_s": sum(again.timings.get(k, 0.0) for k in ("text_encoding", "denoising", "decoding"))}
        # A new resolution after the warm ones: with regional compilation and dynamic shapes this must not
        # recompile the whole model (the number to compare with the warm end-to-end time).
        other = request.model_copy(update={"width": (request.width or 1024) + 128,
                                           "height": (request.height or 1024) - 128,
                                           "prompt": prompt_for(first_prompt + warmup + repeat)})
        clock.begin()
        engine.generate(other, on_progress=on_progress)
        _sync(device)
        change = {"size": f"{other.width}x{other.height}", "first_request_s": time.perf_counter() - clock.start}
        peak = _peak_memory_gib(device)
    stages = {k: _median(v) for k, v in stage_runs.items()}
    pipeline_s = [
        a + b + c
        for a, b, c in zip(stage_runs["text_encoding"], stage_runs["denoising"], stage_runs["decoding"])
    ]
    return {
        "warmup_s": warm,
        "cold_start_s": warm[0] if warm else None,
        "resolution_change": change,
        "stages_s": stages,
        "stages_all_s": stage_runs,
        "end_to_end_s": _median(pipeline_s),
        "end_to_end_all_s": pipeline_s,
        "serving_s": stages["inference"],
        "repeated_prompt": repeated,
        "step_ms": _median(steps),
        "step_ms_all": steps,
        "peak_memory_gib": peak,
    }


# ---- the whole benchmark -------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    model: str
    width: int = 1024
    height: int = 1024
    steps: int = 28
    refs: int = 0
    num_images: int = 1
    acceleration: str = "regular"
    baseline: str | None = None
    repeat: int = 3
    warmup: int = 1
    demo: bool = False
    random_weights: bool = False
    guidance: float | None = None
    seed: int = 0


def run(config: BenchConfig, settings) -> dict:
    from fluxserve.catalog import Catalog
    from fluxserve.engine import Engine
    from fluxserve.engine.accel import acceleration_state, normalise_level

    catalog = Catalog.load(settings.catalog or None)
    if config.model not in catalog.models:
        raise ValueError(f"--model {config.model!r}: choose one of {', '.join(catalog.models)}")
    spec = catalog.models[config.model]
    if config.random_weights and not settings.random_weights:
        settings = replace(settings, random_weights="full")
    engine = Engine(settings, catalog)  # refuses random weights where they cannot run (no CUDA, --demo)
    device = engine.device

    guidance = config.guidance if config.guidance is not None else default_guidance(spec.pipeline)
    with tempfile.TemporaryDirectory(prefix="fluxserve-bench-") as tmp:
        ref_paths = make_references(config.refs, config.width, config.height, Path(tmp))
        request = GenerationRequest(
            model=spec.key,
            prompt=PROMPT,
            image_urls=[str(p) for p in ref_paths],
            width=config.width,
            height=config.height,
            num_images=config.num_images,
            seed=config.seed,
            steps=config.steps,
            guidance=guidance,
            acceleration=normalise_level(config.acceleration),
            output_format="png",
            # random weights make noise, and the safety model would be a download: off for them
            safety_checker=not config.random_weights,
        )
        baseline = None
        if config.baseline == "diffusers":
            from PIL import Image

            references = [Image.open(p).convert("RGB") for p in ref_paths]
            baseline = run_baseline(
                spec=spec,
                settings=settings,
                device=device,
                dtype=engine.dtype,
                random_weights=config.random_weights,
                request=request,
                references=references,
                warmup=config.warmup,
                repeat=config.repeat,
            )
        ours = run_fluxserve(
            engine=engine,
            spec=spec,
            request=request,
            warmup=config.warmup,
            repeat=config.repeat,
        )

    loaded = engine._models[spec.key]
    pipe = loaded.pipe
    accel_state = acceleration_state(pipe) or {}
    precision = accel_state.get("transformer_precision", str(engine.dtype).removeprefix("torch."))
    held = loaded.placement.transformer
    flops = config_flops(
        pipe.transformer.config, config.width, config.height, [(config.width, config.height)] * config.refs
    )
    passes = 2 if (spec.pipeline == "Flux2KleinPipeline" and guidance > 1 and not spec.distilled) else 1
    per_step = flops["forward"] * config.num_images * passes
    env = environment(device)
    peak, peak_label = (
        peak_flops(env["name"], precision)
        if device.type == "cuda"
        else (None, "CPU: no peak rate, MFU not computed")
    )
    step_s = (ours["step_ms"] or 0) / 1000
    mfu = per_step / step_s / peak if (peak and step_s) else None
    report = {
        "model": spec.key,
        "pipeline": spec.pipeline,
        "demo": bool(settings.demo),
        "random_weights": config.random_weights,
        "device": env,
        "request": {
            "width": config.width,
            "height": config.height,
            "steps": config.steps,
            "refs": config.refs,
            "num_images": config.num_images,
            "guidance": guidance,
            "acceleration": request.acceleration,
            "warmup": config.warmup,
            "repeat": config.repeat,
            "seed": config.seed,
        },
        "acceleration": accel_state,
        "precision": precision,
        "precision_summary": precision_summary(held, precision),
        "safety_checker": request.safety_checker,
        "placement": engine.placement(),
        "fluxserve": ours,
        "flops": {**flops, "passes_per_step": passes, "per_step": per_step},
        "mfu": {
            "value": mfu,
            "peak_flops": peak,
            "peak": peak_label,
            "achieved_flops": per_step / step_s if step_s else None,
        },
        "baseline": baseline,
        "speedup": None,
    }
    if baseline is not None:
        report["speedup"] = {
            "end_to_end": _ratio(baseline["end_to_end_s"], ours["end_to_end_s"]),
            "per_step": _ratio(baseline["step_ms"], ours["step_ms"]),
            "note": "baseline end to end (text encoding + denoising + decoding) over fluxserve's same three "
            "stages; per step: median step time ratio",
        }
    return report


def precision_summary(held: str, precision: str) -> str:
    """What ran, in words: how the transformer is held and what its matmuls were."""
    matmuls = {"fp8-w8a8": "FP8 matmuls (weights and activations in FP8)",
               "fp8-weight-only": "bf16 matmuls on dequantised FP8 weights"}.get(precision, f"{precision} matmuls")
    return f"transformer held {held}, {matmuls}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ---- output -------------------------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    env, ours, req, state = report["device"], report["fluxserve"], report["request"], report["acceleration"]
    lines = [
        f"fluxserve bench: {report['model']} ({report['pipeline']})"
        + (" [demo model]" if report["demo"] else "")
        + (" [random weights]" if report["random_weights"] else ""),
        (
            f"device: {env['type']} {env['name']}  torch {env['torch']}  CUDA {env['cuda']}  "
            f"diffusers {env['diffusers']}  transformers {env['transformers']}"
        ),
        (
            f"request: {req['width']}x{req['height']}, {req['steps']} steps, {req['refs']} refs, "
            f"{req['num_images']} image(s), acceleration {req['acceleration']} -> {state.get('level')}; "
            f"safety checker {'on' if report.get('safety_checker') else 'off'}; a new prompt every run; "
            f"median of {req['repeat']} after {req['warmup']} warm-up"
        ),
        f"precision: {report.get('precision_summary') or report['precision']}",
        (
            f"kernels: attention {state.get('attention')}, fused QKV {state.get('fused_qkv')}, compiled "
            f"{state.get('compiled')}, CUDA graphs {state.get('cuda_graphs')}"
            + (f" ({len(state.get('cuda_graph_shapes') or [])} shape(s) of at most {state.get('cuda_graph_cap')}, "
               f"{(state.get('cuda_graph_bytes') or 0) / 2**30:.2f} GiB)" if state.get("cuda_graphs") else "")
        ),
    ]
    lines += [f"note: {note}" for note in state.get("notes") or []]
    models = report["placement"].get("models", {})
    for key, info in models.items():
        plan = info.get("plan") or {}
        sizes = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in (info.get("bytes") or {}).items())
        lines.append(
            f"placement {key}: {info.get('summary')} on {info.get('device')}"
            + (f"; plan {plan.get('needed_gib')} GiB of {plan.get('free_gib')} GiB free" if plan.get("free_gib") else "")
            + (f"; {info.get('dtype')} GiB: {sizes}" if sizes else "")
        )
    cap = report["placement"].get("memory", {}).get("cap")
    if cap:
        lines.append(f"GPU memory cap {cap['requested_gib']} GiB: "
                     + (f"applied ({cap['how']})" if cap["applied"] else f"not applied ({cap['note']})"))
    lines.append(
        "stage medians (s): "
        + ", ".join(f"{k} {_fmt(ours['stages_s'].get(k))}" for k in (*STAGES, "inference"))
    )
    repeated = ours.get("repeated_prompt") or {}
    lines.append(
        f"end to end (text encoding + denoising + decoding): {_fmt(ours['end_to_end_s'])} s; with safety and file "
        f"encoding {_fmt(ours.get('serving_s'))} s; a repeated prompt "
        f"({'prompt cache hit' if repeated.get('prompt_cache_hit') else 'no prompt cache'}): text encoding "
        f"{_fmt(repeated.get('text_encoding_s'))} s, end to end {_fmt(repeated.get('end_to_end_s'))} s"
    )
    lines.append(
        f"denoising step median: {_fmt(ours['step_ms'])} ms; load {ours['load_s']:.2f} s; "
        f"peak GPU memory {_fmt(ours['peak_memory_gib'])} GiB (loading: {_fmt(ours.get('load_peak_memory_gib'))} "
        f"GiB, resident after load {_fmt(ours.get('resident_memory_gib'))} GiB)"
    )
    change = ours.get("resolution_change") or {}
    lines.append(
        f"cold start: first request {_fmt(ours.get('cold_start_s'))} s (compilation, graph capture, caches); "
        f"first request after a resolution change to {change.get('size')}: {_fmt(change.get('first_request_s'))} s"
    )
    flops = report["flops"]
    mfu = report["mfu"]
    lines.append(
        f"FLOPs per step: {flops['per_step'] / 1e12:.4g} TFLOP ({flops['tokens']} tokens); "
        + (f"MFU {mfu['value'] * 100:.1f}% of {mfu['peak']}" if mfu["value"] is not None else mfu["peak"])
    )
    if report["baseline"]:
        base, speed = report["baseline"], report["speedup"]
        lines.append(
            f"baseline diffusers ({base['placement']}): end to end {_fmt(base['end_to_end_s'])} s, "
            f"step {_fmt(base['step_ms'])} ms, peak {_fmt(base['peak_memory_gib'])} GiB"
        )
        lines.append(
            f"speed-up vs diffusers: end to end {_fmt(speed['end_to_end'])}x, "
            f"per step {_fmt(speed['per_step'])}x"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
