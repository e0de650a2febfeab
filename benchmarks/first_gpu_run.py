"""The first run of fluxserve on a new GPU: the numbers that matter, in one command, inside a time budget.

    python3 benchmarks/first_gpu_run.py [--tiny] [--budget SECONDS] OUT_DIR

Six parts, most important first; each writes its own JSON into OUT_DIR as soon as it ends (and partial
results as they come), and ``summary.json`` lists every part with its status, seconds and headline numbers:

1. ``checks``: the device and library versions; bf16 and FP8 (``torch._scaled_mm``, row-wise scales) matrix
   products on FLUX.2 [dev]'s Linear shapes at 1024x1024 (4608 tokens), the whole FP8 w8a8 layer (activation
   quantisation included); every attention backend on [dev]'s attention shape, with its error against fp32.
2. ``klein``: FLUX.2 [klein] 4B, 1024x1024, 4 steps, random weights, through the engine: stock diffusers,
   then the acceleration levels none / regular / high on one build (ms/step, end to end, cold first request,
   peak memory, MFU, ratio to diffusers, error of the image against ``none``).
3. ``dev``: the FLUX.2 [dev] transformer alone at 1024x1024 (one forward = one step): none, regular (bf16),
   then high with the transformer held in FP8 (what an 80 GB GPU runs at every level): compile time, ms/step,
   peak memory, MFU, error against ``none``.
4. ``profile``: the top CUDA kernels of one warm [dev] step at the last level the ``dev`` part ran.
5. ``vae``: the FLUX.2 VAE decoder at 1024x1024, eager in channels-last layout (what the engine runs) and
   compiled: whether compiling it pays.
6. ``train``: LoRA training steps at 1024x1024, rank 16: [klein] 4B base in bf16 and [dev] held in FP8 (s/step,
   peak memory, the memory plan's estimate of a step's working memory). Outside the default budget after a full
   run: ``--parts train`` runs it alone.

The budget (``--budget``, default 510 s) is checked before every part and every sub-step against a generous
estimate of its cost; what does not fit is skipped and the summary says why. Every part and sub-step runs in
its own ``try``: an error is recorded with its traceback and the run goes on. Exit status 0 when no part
failed, 1 otherwise.

``--tiny`` runs the very same code on the CPU with tiny models of the same structure (64x64, 2 steps): FP8
matrix products and the non-native attention kernels are recorded as not supported there. CI runs it.

Nothing here touches a network: random weights, locally built tokenizers, ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import io
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "fluxserve").is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

DEFAULT_BUDGET_S = 510.0
PARTS = ("checks", "klein", "dev", "profile", "vae", "train")
LEVELS = ("none", "regular", "high")

# Generous costs in seconds (first compile included, no inductor cache) of each part and sub-step: one is
# started only when its estimate fits in the time left.
GPU_ESTIMATES = {
    "checks": 30, "checks.environment": 5, "checks.matmul": 15, "checks.attention": 10,
    "klein": 180, "klein.baseline": 35, "klein.build": 15, "klein.none": 15, "klein.regular": 60,
    "klein.high": 55,
    "dev": 210, "dev.build": 20, "dev.none": 15, "dev.regular": 85, "dev.high": 85,
    "profile": 40,
    "vae": 60,
    "train": 200, "train.klein-4b": 60, "train.dev": 130,
}
TINY_ESTIMATES = {
    "checks": 8, "checks.environment": 2, "checks.matmul": 3, "checks.attention": 3,
    "klein": 40, "klein.baseline": 8, "klein.build": 5, "klein.none": 5, "klein.regular": 5, "klein.high": 5,
    "dev": 15, "dev.build": 3, "dev.none": 3, "dev.regular": 3, "dev.high": 3,
    "profile": 5,
    "vae": 10,
    "train": 20, "train.klein-4b": 8, "train.dev": 8,
}


@dataclass(frozen=True)
class Scale:
    """The sizes one mode runs at: the real ones on a GPU, tiny ones on the CPU."""

    width: int
    height: int
    klein_steps: int
    warmup: int  # unmeasured requests before the measured ones (the first compiles)
    repeat: int  # measured requests per level
    forward_repeat: int  # measured transformer forwards per level ([dev])
    kernel_repeat: int  # measured calls per matrix product / attention
    text_tokens: int = 512


GPU_SCALE = Scale(width=1024, height=1024, klein_steps=4, warmup=1, repeat=3, forward_repeat=5, kernel_repeat=10)
TINY_SCALE = Scale(width=64, height=64, klein_steps=2, warmup=1, repeat=2, forward_repeat=2, kernel_repeat=3)


# ---- the clock, the log and the files -------------------------------------------------------------------------
class Budget:
    """Seconds left of the run's budget, counted from the start of the script."""

    def __init__(self, seconds: float, start: float) -> None:
        self.seconds = seconds
        self.start = start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def shortfall(self, estimate: float) -> str | None:
        """Why a step estimated at ``estimate`` seconds does not fit, or None when it does."""
        left = self.left()
        if estimate <= left:
            return None
        return f"needs ~{estimate:.0f} s, {max(0.0, left):.0f} s left of the {self.seconds:.0f} s budget"


START = time.perf_counter()


def log(message: str) -> None:
    """One progress line with the wall clock and the seconds since the start, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` whole or not at all (a run killed mid-write leaves the previous version)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def error_record(exc: BaseException) -> dict:
    """The error and its traceback for a part's JSON; the traceback's last lines go to the log too."""
    trace = traceback.format_exc()
    for line in trace.strip().splitlines()[-7:-1]:
        print(f"    | {line}", flush=True)
    return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}", "traceback": trace[-6000:]}


@dataclass
class Run:
    """What every part shares: the output folder, the device, the budget and the summary."""

    out: Path
    tiny: bool
    budget: Budget
    scale: Scale
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    work_dir: Path
    summary: dict = field(default_factory=dict)
    device_name: str = ""
    estimates: dict[str, float] = field(default_factory=dict)  # --estimate overrides
    handoff: dict = field(default_factory=dict)  # the [dev] transformer, kept for the profile part
    dev_levels: tuple[str, ...] = LEVELS  # the profile part profiles the last one

    def estimate(self, name: str) -> float:
        if name in self.estimates:
            return self.estimates[name]
        return float((TINY_ESTIMATES if self.tiny else GPU_ESTIMATES)[name])

    def save(self, part: str, report: dict) -> None:
        write_json(self.out / f"{part}.json", report)

    def save_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.budget.elapsed(), 1)
        write_json(self.out / "summary.json", self.summary)

    def step(self, part: str, report: dict, name: str, fn: Callable[[], Any]) -> Any:
        """Run sub-step ``name`` of ``part`` when its estimate fits the time left: its result, or None when it
        was skipped (``report["skipped"]``) or failed (``report["errors"]``, with the traceback)."""
        reason = self.budget.shortfall(self.estimate(f"{part}.{name}"))
        if reason:
            log(f"{part}.{name}: skipped ({reason})")
            report.setdefault("skipped", {})[name] = reason
            self.save(part, report)
            return None
        log(f"{part}.{name}: start ({self.budget.left():.0f} s left)")
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
            report.setdefault("errors", {})[name] = error_record(exc)
            log(f"{part}.{name}: FAILED after {time.perf_counter() - start:.1f} s: {type(exc).__name__}: "
                f"{str(exc)[:300]}")
            self.save(part, report)
            return None
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
        log(f"{part}.{name}: done in {time.perf_counter() - start:.1f} s")
        self.save(part, report)
        return result

    def where(self, model: str, steps: str, precision: str, level: str | None = None) -> str:
        """Which device, model, resolution, steps and precision a number came from."""
        what = f"{model} {self.scale.width}x{self.scale.height}, {steps}"
        what += f", {level} ({precision})" if level else f", {precision}"
        return f"{what} on {self.device_name}"


# ---- small measuring tools -------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device, *, warmup: int, repeat: int) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn`` after ``warmup`` unmeasured ones: CUDA events around
    each call on a GPU (the stream's time, launch overhead included), wall time on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
    return times


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rel_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖, computed in float32 (float64 for arrays)."""
    import numpy as np
    import torch

    if isinstance(out, np.ndarray):
        a, b = out.astype(np.float64), ref.astype(np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    a, b = out.float(), ref.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def memory_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def allocated_gib(device) -> float | None:
    import torch

    return round(torch.cuda.memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def release_compiled() -> None:
    """Drop compiled graphs and the CUDA graphs recorded on this thread (their memory pools), so the next
    model starts with the GPU's memory free."""
    import torch

    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"could not reset CUDA graph trees: {exc}")
    torch._dynamo.reset()


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def mfu(flops_per_step: float, step_ms: float | None, device_name: str, precision: str, device) -> dict:
    """Model FLOPs utilisation against the dense peak of the precision that ran (``bench.peak_flops``)."""
    from fluxserve import bench

    if not step_ms:
        return {"value": None, "peak": "no step time"}
    achieved = flops_per_step / (step_ms / 1000)
    if device.type != "cuda":
        return {"value": None, "achieved_tflops": achieved / 1e12, "peak": "CPU: no peak rate, MFU not computed"}
    peak, label = bench.peak_flops(device_name, precision)
    return {"value": achieved / peak if peak else None, "achieved_tflops": achieved / 1e12, "peak": label}


# ---- part 1: checks ----------------------------------------------------------------------------------------------
def part_checks(run: Run, report: dict) -> dict:
    report["environment"] = run.step("checks", report, "environment", lambda: environment(run))
    matmul = run.step("checks", report, "matmul", lambda: matmul_checks(run, report))
    attention = run.step("checks", report, "attention", lambda: attention_checks(run, report))
    headline: dict = {"device": run.device_name}
    if matmul:
        for kind in ("bf16", "fp8_scaled_mm", "fp8_linear_w8a8"):
            rates = [row[kind]["tflops"] for row in matmul["shapes"] if "tflops" in row.get(kind, {})]
            if rates:
                headline[f"{kind}_tflops_best"] = round(max(rates), 1)
                headline[f"{kind}_tflops_median"] = round(statistics.median(rates), 1)
        headline["matmul_tokens"] = matmul["tokens"]
    if attention:
        headline["attention_tflops"] = {name: round(row["tflops"], 1) for name, row in attention["backends"].items()
                                        if "tflops" in row}
        headline["attention_chosen"] = attention.get("chosen")
    return headline


def environment(run: Run) -> dict:
    import torch

    from fluxserve import bench

    info = bench.environment(run.device)
    info["python"] = platform.python_version()
    info["versions"] = package_versions()
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        free, total = torch.cuda.mem_get_info(run.device)
        info.update(multiprocessors=props.multi_processor_count, free_gib=round(free / 2**30, 2),
                    total_gib=round(total / 2**30, 2), cudnn=torch.backends.cudnn.version())
    log(f"device: {run.device_name}; torch {info['torch']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
        f"diffusers {info.get('diffusers')}, transformers {info.get('transformers')}")
    return info


def package_versions() -> dict:
    """Versions of the packages the run imports (the ones carried as wheels to a machine without them too)."""
    from importlib import metadata

    names = ("torch", "triton", "diffusers", "transformers", "tokenizers", "huggingface-hub", "accelerate",
             "safetensors", "peft", "pydantic", "pydantic-core", "numpy", "pillow", "flash-attn", "flash-attn-3")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def dev_transformer_meta(run: Run):
    """The [dev] transformer on the meta device (no memory): its real shapes, or the tiny ones."""
    from fluxserve.engine import random_weights

    arch = random_weights.tiny_architecture("dev") if run.tiny else None
    return random_weights.build_transformer("dev", "meta", run.dtype, arch=arch)


def linear_shapes(run: Run) -> tuple[list[dict], int]:
    """The distinct (out, in) Linear shapes of the [dev] transformer blocks with the layers that have them, plus
    the fused Q/K/V of the double-stream blocks (3 x hidden by hidden); and the hidden size."""
    import re

    from torch import nn

    from fluxserve.engine import fp8

    transformer = dev_transformer_meta(run)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    shapes: dict[tuple[int, int], dict] = {}
    for name, module in transformer.named_modules():
        if type(module) is nn.Linear and fp8.transformer_block_filter(name, module):
            row = shapes.setdefault((module.out_features, module.in_features), {"layers": 0, "names": set()})
            row["layers"] += 1
            row["names"].add(re.sub(r"\.\d+\.", ".*.", name))
    fused = (3 * hidden, hidden)
    if fused not in shapes:
        shapes[fused] = {"layers": 0, "names": {"transformer_blocks.*.attn.to_qkv (fused Q/K/V, regular/high)"}}
    rows = [{"out": o, "in": i, "layers": r["layers"], "names": sorted(r["names"])}
            for (o, i), r in sorted(shapes.items())]
    return rows, hidden


def matmul_checks(run: Run, report: dict) -> dict:
    """bf16, FP8 ``_scaled_mm`` and ``FP8Linear`` w8a8 on each Linear shape of [dev]'s blocks, M tokens."""
    import torch

    from fluxserve.engine import fp8

    device, scale = run.device, run.scale
    tokens = (scale.width // 16) * (scale.height // 16) + scale.text_tokens
    rows, hidden = linear_shapes(run)
    fp8_ok = fp8.scaled_mm_supported(device)
    not_here = None if fp8_ok else (f"not supported on {device.type}: torch._scaled_mm FP8 needs CUDA with compute "
                                    "capability >= 8.9")
    result = {"tokens": tokens, "hidden": hidden, "dtype": "bf16", "granularity": fp8.default_granularity(device),
              "note": "M tokens = image + text at the run's resolution (in the double blocks the image and text "
                      "projections see 4096 and 512 of them); FLOPs 2*M*out*in; CUDA events, median",
              "shapes": rows}
    report["matmul"] = result
    generator = torch.Generator(device=device).manual_seed(0)
    for row in rows:
        matmul_row(run, row, tokens, generator, not_here)
        run.save("checks", report)
    return result


def matmul_row(run: Run, row: dict, tokens: int, generator, not_here: str | None) -> None:
    """One (out, in) shape: bf16 ``F.linear``, then the FP8 product alone and the whole FP8 layer."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fluxserve.engine import fp8

    device = run.device
    n, k = row["out"], row["in"]
    flops = 2 * tokens * n * k
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, generator=generator)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=generator) * k**-0.5
    ref = F.linear(x, w)
    ms = median(time_calls(lambda: F.linear(x, w), device, warmup=3, repeat=run.scale.kernel_repeat))
    row["bf16"] = {"ms": ms, "tflops": flops / (ms / 1000) / 1e12}
    if not_here:
        row["fp8_scaled_mm"] = {"skipped": not_here}
        row["fp8_linear_w8a8"] = {"skipped": not_here}
    else:
        row["fp8_scaled_mm"] = _scaled_mm_row(x, w, ref, flops, run)
        row["fp8_linear_w8a8"] = _fp8_linear_row(nn, fp8, x, w, ref, flops, run)
    log(f"matmul {tokens}x{n}x{k} (bf16 in) on {run.device_name}: bf16 {row['bf16']['tflops']:.1f} TFLOP/s; "
        f"FP8 _scaled_mm {_rate(row['fp8_scaled_mm'])}; FP8Linear w8a8 {_rate(row['fp8_linear_w8a8'])}")


def _rate(row: dict) -> str:
    return f"{row['tflops']:.1f} TFLOP/s" if "tflops" in row else row.get("skipped") or row.get("error", "?")


def _scaled_mm_row(x, w, ref, flops: float, run: Run) -> dict:
    """The FP8 matrix product alone: activations (M, 1) and weights (1, N) float32 row scales, bf16 out,
    mat_b column-major (the weight's transpose as stored)."""
    import torch

    from fluxserve.engine import fp8

    try:
        xq, x_scale = fp8.quantize_tensor(x, "row")
        wq, w_scale = fp8.quantize_tensor(w, "row")
        w_scale = w_scale.reshape(1, -1)

        def call():
            return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

        error = rel_error(call(), ref)
        ms = median(time_calls(call, run.device, warmup=3, repeat=run.scale.kernel_repeat))
        return {"ms": ms, "tflops": flops / (ms / 1000) / 1e12, "rel_error_vs_bf16": error}
    except Exception as exc:  # noqa: BLE001 - recorded per shape
        return error_record(exc)


def _fp8_linear_row(nn, fp8, x, w, ref, flops: float, run: Run) -> dict:
    """``FP8Linear`` in w8a8 mode, eager: the activation quantisation plus the matrix product."""
    try:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        linear.weight.data = w
        layer = fp8.FP8Linear(linear, granularity=fp8.default_granularity(run.device), mode="w8a8")
        error = rel_error(layer(x), ref)
        ms = median(time_calls(lambda: layer(x), run.device, warmup=3, repeat=run.scale.kernel_repeat))
        return {"ms": ms, "tflops": flops / (ms / 1000) / 1e12, "rel_error_vs_bf16": error, "mode": layer.mode}
    except Exception as exc:  # noqa: BLE001 - recorded per shape
        return error_record(exc)


def attention_backends(run: Run) -> dict[str, str | None]:
    """Backend name -> None to try it, or why it is not tried here."""
    import importlib.util

    from fluxserve.engine import accel

    if run.device.type != "cuda":
        reason = f"not supported on {run.device.type}"
        return {"native": None, "_native_cudnn": reason, "_flash_3": reason, "flash": reason}
    backends: dict[str, str | None] = {"native": None, "_native_cudnn": None, "_native_flash": None,
                                       "_native_efficient": None}
    backends["_flash_3"] = None if accel.diffusers_can_use_flash_attention_3() else (
        "diffusers cannot use FlashAttention-3 here (the flash_attn_3 package is not importable)")
    backends["flash"] = None if importlib.util.find_spec("flash_attn") else "flash_attn is not installed"
    return backends


def attention_checks(run: Run, report: dict) -> dict:
    """Each attention backend on [dev]'s attention shape (B, S, H, D) in bf16: time, TFLOP/s (4 S^2 H D) and
    the error against PyTorch's attention on the same inputs in float32; and what the engine chooses."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from fluxserve.engine import accel

    device, scale = run.device, run.scale
    meta = dev_transformer_meta(run)
    heads, dim = meta.config.num_attention_heads, meta.config.attention_head_dim
    tokens = (scale.width // 16) * (scale.height // 16) + scale.text_tokens
    flops = 4 * tokens * tokens * heads * dim
    generator = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, tokens, heads, dim, device=device, dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    ref = dispatch_attention_fn(q.float(), k.float(), v.float(), backend="native")
    chosen, notes = accel.choose_attention(device)
    result = {"shape": {"batch": 1, "tokens": tokens, "heads": heads, "head_dim": dim, "layout": "B,S,H,D",
                        "dtype": "bf16"},
              "flops": flops, "reference": "native (PyTorch SDPA) on the same inputs in float32",
              "chosen": chosen, "choice_notes": list(notes), "candidates": accel.attention_candidates(device),
              "flash_attention_3_usable_by_diffusers": accel.diffusers_can_use_flash_attention_3(),
              "backends": {}}
    report["attention"] = result
    for name, reason in attention_backends(run).items():
        if reason:
            result["backends"][name] = {"skipped": reason}
            continue
        try:
            out = dispatch_attention_fn(q, k, v, backend=name)
            error = rel_error(out, ref)
            ms = median(time_calls(lambda name=name: dispatch_attention_fn(q, k, v, backend=name), device,
                                   warmup=3, repeat=scale.kernel_repeat))
            result["backends"][name] = {"ms": ms, "tflops": flops / (ms / 1000) / 1e12, "rel_error_vs_fp32": error}
            log(f"attention {name} ({tokens} tokens, {heads} heads x {dim}, bf16) on {run.device_name}: "
                f"{ms:.3f} ms, {flops / (ms / 1000) / 1e12:.1f} TFLOP/s, error vs fp32 {error:.2e}")
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is recorded
            result["backends"][name] = error_record(exc)
            log(f"attention {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
        run.save("checks", report)
    log(f"attention chosen by the engine on {run.device_name}: {chosen}")
    return result


# ---- part 2: [klein] 4B through the engine -------------------------------------------------------------------------
def part_klein(run: Run, report: dict) -> dict:
    from fluxserve import bench
    from fluxserve.catalog import Catalog
    from fluxserve.config import Settings
    from fluxserve.engine import Engine, accel, random_weights
    from fluxserve.request import GenerationRequest

    model, scale, device = "klein-4b", run.scale, run.device
    settings = Settings(data_dir=run.work_dir / "data", device=str(device))
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
        build = run.step("klein", report, "build", lambda: bench.load_timed(
            engine, spec, random_weights=True, safety=False, arch=arch))
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
            "end_to_end": _ratio((baseline or {}).get("end_to_end_s"), timing["end_to_end_s"]),
            "per_step": _ratio((baseline or {}).get("step_ms"), timing["step_ms"]),
            "note": "stock diffusers time / fluxserve time (above 1: fluxserve is faster)",
        },
        "image_rel_error_vs_none": error,
        "image_std": float(image.std()),
        "image_note": "PNG decoded to floats, same prompt and seed as the none level; random weights: the image "
                      "is noise, so the error measures numerics only (image_std > 0: not a constant image)",
    }
    log(f"{result['what']}: {_num(result['step_ms'])} ms/step, end to end {_num(result['end_to_end_s'])} s, "
        f"cold first request {_num(result['cold_start_s'])} s, peak {_num(result['peak_memory_gib'])} GiB, MFU "
        f"{_pct(result['mfu']['value'])}, x diffusers {_num(result['vs_diffusers']['end_to_end'])} end to end, "
        f"image error vs none {_num(error)}")
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


def png_pixels(data: bytes):
    """PNG bytes -> float32 array (H, W, 3)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def close_engine(engine) -> None:
    """Release the engine's model, with the CUDA graphs recorded on its thread."""
    try:
        engine._runner.submit(release_compiled).result()
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"could not release the engine thread's graphs: {exc}")
    engine._runner.shutdown(wait=True)
    engine._models.clear()


# ---- part 3: the [dev] transformer ----------------------------------------------------------------------------------
class TransformerOnly:
    """What ``accel.apply_acceleration`` needs of a pipeline: the transformer, and an ``encode_prompt`` to wrap
    (never called: this part times the transformer alone)."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer

    def encode_prompt(self, prompt=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                      max_sequence_length=512, text_encoder_out_layers=None):
        raise NotImplementedError("the [dev] transformer benchmark has no text encoder")


def dev_inputs(config, run: Run) -> dict:
    """Random inputs of the shapes ``Flux2Pipeline`` gives the transformer at the run's resolution (the ids
    made by its own ``_prepare_latent_ids`` / ``_prepare_text_ids``)."""
    import torch
    from diffusers import Flux2Pipeline

    device, dtype, scale = run.device, run.dtype, run.scale
    h, w = scale.height // 16, scale.width // 16
    generator = torch.Generator(device=device).manual_seed(2)
    img_ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 1, h, w, device="meta"))
    txt_ids = Flux2Pipeline._prepare_text_ids(torch.empty(1, scale.text_tokens, 1, device="meta"))
    return {
        "hidden_states": torch.randn(1, h * w, config.in_channels, device=device, dtype=dtype, generator=generator),
        "encoder_hidden_states": torch.randn(1, scale.text_tokens, config.joint_attention_dim, device=device,
                                             dtype=dtype, generator=generator),
        "timestep": torch.full((1,), 0.75, device=device, dtype=dtype),  # t / 1000, as the pipeline passes it
        "guidance": torch.full((1,), 2.5, device=device, dtype=torch.float32),
        "img_ids": img_ids.to(device),
        "txt_ids": txt_ids.to(device),
        "return_dict": False,
    }


def part_dev(run: Run, report: dict) -> dict:
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
    import torch

    from fluxserve.engine import random_weights
    from fluxserve.engine.placement import place_module
    from fluxserve.engine.plan import headroom_bytes

    device = run.device
    transformer = dev_transformer_meta(run)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
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
    log(f"{result['what']}: {_num(step_ms)} ms/step ({_num(result['steps_28_s'])} s for 28 steps), first "
        f"forward {cold_s:.2f} s, peak {_num(result['peak_memory_gib'])} GiB, MFU {_pct(result['mfu']['value'])}, "
        f"error vs none {_num(result['rel_error_vs_none'])}")
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


# ---- part 4: profile ------------------------------------------------------------------------------------------------
def part_profile(run: Run, report: dict) -> dict:
    """The top kernels of one warm [dev] transformer step at the last level the dev part ran (``torch.profiler``;
    on the CPU the top operators)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fluxserve.engine import accel

    kept = run.handoff.get("dev")
    if not kept:
        raise RuntimeError("no [dev] transformer is resident: the dev part did not complete a level")
    pipe, inputs, level = kept["pipe"], kept["inputs"], kept["level"]
    device = run.device
    state = accel.apply_acceleration(pipe, level, device)

    def forward():
        with torch.no_grad():
            return pipe.transformer(**inputs)[0]

    for _ in range(2):
        forward()
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        forward()
        sync(device)
    step_ms = (time.perf_counter() - start) * 1000
    rows = top_kernels(prof, cuda, step_ms)
    precision = state.get("transformer_precision", "unknown")
    report.update(what=run.where("dev transformer", "one step (one forward)", precision, level),
                  level=level, precision=precision, activity="CUDA kernels" if cuda else "CPU operators",
                  step_ms_under_profiler=step_ms, kernels_seen=rows["count"],
                  kernel_ms_total=rows["total_ms"], top=rows["top"],
                  note="ms: the kernel's (CPU: the operator's own) time summed over its calls in one step; "
                       "pct_of_step: of the profiled step's wall time; pct_of_kernels: of all kernel time")
    if cuda and rows["total_ms"] < 0.5 * step_ms:
        report["warning"] = (f"the profiler saw kernels for {rows['total_ms']:.1f} of the step's {step_ms:.1f} ms "
                             "(kernels replayed inside CUDA graphs may be hidden from it)")
    for row in rows["top"][:10]:
        log(f"profile {level} ({precision}): {row['ms']:8.2f} ms {row['pct_of_step']:5.1f}% x{row['calls']:<4} "
            f"{row['name'][:90]}")
    return {"what": report["what"], "top5": [{k: r[k] for k in ("name", "ms", "pct_of_step")} for r in rows["top"][:5]]}


def top_kernels(prof, cuda: bool, step_ms: float, count: int = 30) -> dict:
    """The ``count`` kernels (CPU: operators) with the most total time in the profile."""
    import torch

    rows = []
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = event.self_cuda_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key[:300], "calls": event.count, "ms": us / 1000})
    rows.sort(key=lambda r: r["ms"], reverse=True)
    total = sum(r["ms"] for r in rows)
    for row in rows:
        row["pct_of_step"] = 100 * row["ms"] / step_ms if step_ms else None
        row["pct_of_kernels"] = 100 * row["ms"] / total if total else None
    return {"count": len(rows), "total_ms": total, "top": rows[:count]}


# ---- part 5: the VAE decoder ----------------------------------------------------------------------------------------
def part_vae(run: Run, report: dict) -> dict:
    """The FLUX.2 VAE decoder with random weights at the run's resolution: eager in channels-last layout (what the
    engine runs), then compiled (``torch.compile`` of the decoder; on the CPU with the eager backend, which checks
    the code path without minutes of C++ compilation): warm ms, first-call (compile) time, error against eager."""
    import torch

    from fluxserve.engine import random_weights
    from fluxserve.engine.placement import place_component
    from fluxserve.engine.plan import MemoryPlan

    device, scale = run.device, run.scale
    arch = random_weights.tiny_architecture("klein-4b") if run.tiny else None
    vae = random_weights.build_vae("meta", run.dtype, arch)
    place_component(vae, "vae", device, MemoryPlan("bf16", "resident"),
                    materialise=random_weights.random_init(0, "vae"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator(device=device).manual_seed(5)
    latents = torch.randn(1, vae.config.latent_channels, scale.height // factor, scale.width // factor,
                          device=device, dtype=run.dtype, generator=generator).contiguous(
                              memory_format=torch.channels_last)

    def decode():
        with torch.no_grad():
            return vae.decode(latents, return_dict=False)[0]

    memory_reset(device)
    eager = median(time_calls(decode, device, warmup=1, repeat=scale.repeat))
    reference = decode().float()
    backend = "eager" if run.tiny else "inductor"
    vae.decoder.compile(backend=backend)
    start = time.perf_counter()
    decode()
    sync(device)
    cold = time.perf_counter() - start
    compiled = median(time_calls(decode, device, warmup=1, repeat=scale.repeat))
    error = rel_error(decode().float(), reference)
    speedup = _ratio(eager, compiled)
    report.update(what=run.where("FLUX.2 VAE decoder", f"{scale.width}x{scale.height}",
                                 str(run.dtype).removeprefix("torch.")),
                  layout="channels_last", eager_ms=eager, compiled_ms=compiled, compile_backend=backend,
                  first_compiled_call_s=cold, speedup=speedup, rel_error_vs_eager=error,
                  peak_memory_gib=peak_gib(device),
                  note="compiling pays when the speed-up is well above 1 and the first call's cost is acceptable "
                       "at load time")
    log(f"{report['what']}: eager {_num(eager)} ms, compiled ({backend}) {_num(compiled)} ms, first compiled call "
        f"{cold:.1f} s, x{_num(speedup)}, error vs eager {_num(error)}")
    return {"what": report["what"], "eager_ms": eager, "compiled_ms": compiled, "speedup": speedup,
            "first_compiled_call_s": cold}


# ---- part 6: LoRA training steps ------------------------------------------------------------------------------------
TRAIN_RANK = 16
TRAIN_ROWS = (("klein-4b", "bf16"), ("dev", "fp8"))  # [klein] 4B base as any GPU holds it; [dev] as 80 GB does


def part_train(run: Run, report: dict) -> dict:
    """LoRA training steps (``trainer.train_cached``: the trainer's own step, on one cached example of random
    latents and caption embeddings of the real shapes) at the run's resolution: [klein] 4B base in bf16 and [dev]
    with its frozen transformer held in FP8. Seconds per step, peak memory, and the memory plan's estimate of
    the step's working memory against the measured peak less the resident weights."""
    scale = run.scale
    report.update(resolution=f"{scale.width}x{scale.height}", rank=TRAIN_RANK, device=run.device_name,
                  warmup_steps=scale.warmup + 1, measured_steps=scale.forward_repeat, rows={},
                  note="one example, batch 1, bf16 autocast with gradient checkpointing on CUDA, AdamW on the LoRA; "
                       "step time = wall time between steps (each ends with the loss read back, a sync)")
    for model, held in TRAIN_ROWS:
        row = run.step("train", report, model, lambda model=model, held=held: train_row(run, model, held))
        if row is not None:
            report["rows"][model] = row
            run.save("train", report)
    return {model: {key: row.get(key) for key in ("what", "step_s", "peak_memory_gib", "step_memory_gib",
                                                   "estimated_step_gib")}
            for model, row in report["rows"].items()}


def train_row(run: Run, model: str, held: str) -> dict:
    import torch
    from diffusers import Flux2Pipeline

    from fluxserve import bench
    from fluxserve.engine import accel, fp8, random_weights
    from fluxserve.engine.placement import place_module
    from fluxserve.training import trainer

    device, scale = run.device, run.scale
    arch = random_weights.tiny_architecture(model) if run.tiny else None
    transformer = random_weights.build_transformer(model, "meta", run.dtype, arch=arch)
    place_module(transformer, device, materialise=random_weights.random_init(0, "transformer"))
    if held == "fp8":
        accel.prepare_transformer(TransformerOnly(transformer), "fp8", device)
    precision = "fp8 weights (dequantised in training)" if fp8.has_fp8(transformer) else str(run.dtype).removeprefix(
        "torch.")
    config = transformer.config
    generator = torch.Generator(device=device).manual_seed(6)
    h, w = scale.height // 16, scale.width // 16
    embeds = torch.randn(1, scale.text_tokens, config.joint_attention_dim, device=device, dtype=run.dtype,
                         generator=generator)
    example = trainer.CachedExample(
        latents=torch.randn(1, config.in_channels, h, w, device=device, generator=generator),
        prompt_embeds=embeds, reference=None, reference_ids=None,
        text_ids=Flux2Pipeline._prepare_text_ids(torch.empty(1, scale.text_tokens, 1, device="meta")).to(device))
    sync(device)
    resident = allocated_gib(device)
    times: list[float] = []
    losses: list[float] = []
    mark = [time.perf_counter()]

    def on_progress(progress) -> None:
        now = time.perf_counter()
        times.append(now - mark[0])
        losses.append(progress.loss)
        mark[0] = now

    warmup = scale.warmup + 1
    memory_reset(device)
    mark[0] = time.perf_counter()
    trainer.train_cached(transformer, [example], steps=warmup + scale.forward_repeat, learning_rate=1e-4,
                         rank=TRAIN_RANK, seed=0, on_progress=on_progress)
    peak = peak_gib(device)
    step_s = median(times[warmup:])
    estimate = trainer.step_bytes(transformer, resolution=scale.width, rank=TRAIN_RANK) / 2**30
    flops = bench.config_flops(config, scale.width, scale.height, [])["forward"]
    row = {"what": run.where(f"{model} LoRA training", f"rank {TRAIN_RANK}, one step", precision),
           "held": held, "precision": precision, "step_s": step_s, "step_s_all": times,
           "first_step_s": times[0] if times else None, "losses": losses,
           "resident_gib": resident, "peak_memory_gib": peak,
           "step_memory_gib": round(peak - resident, 2) if peak is not None and resident is not None else None,
           "estimated_step_gib": round(estimate, 2), "estimated_step_bytes": round(estimate * 2**30),
           "mfu_3x_forward": mfu(3 * flops, step_s * 1000 if step_s else None, run.device_name, "bf16", device),
           "mfu_note": "3 x the forward's FLOPs (forward, its recomputation, the input gradients: the frozen "
                       "weights need no weight gradients) against the bf16 peak"}
    log(f"{row['what']}: {_num(step_s)} s/step, first step {_num(row['first_step_s'])} s, peak "
        f"{_num(peak)} GiB (resident {_num(resident)}, step {_num(row['step_memory_gib'])}, plan's estimate "
        f"{estimate:.2f}), MFU {_pct(row['mfu_3x_forward']['value'])}")
    del transformer, example
    free_memory(device)
    return row


# ---- the run ----------------------------------------------------------------------------------------------------
PART_FUNCTIONS: dict[str, Callable[[Run, dict], dict]] = {
    "checks": part_checks, "klein": part_klein, "dev": part_dev, "profile": part_profile, "vae": part_vae,
    "train": part_train,
}


def run_part(run: Run, name: str) -> None:
    """Run one part when its estimate fits: its JSON is written as it goes and when it ends, the summary before
    it starts (status running) and after; an error is recorded with its traceback and the run goes on."""
    entry: dict = {"file": f"{name}.json", "estimate_s": run.estimate(name)}
    run.summary["parts"][name] = entry
    reason = run.budget.shortfall(run.estimate(name))
    if reason:
        entry.update(status="skipped", skipped=reason, seconds=0.0, file=None)
        log(f"== {name}: skipped ({reason})")
        run.save_summary()
        return
    entry.update(status="running", started_at_s=round(run.budget.elapsed(), 1))
    run.save_summary()
    log(f"== {name}: start ({run.budget.left():.0f} s left)")
    report: dict = {"part": name, "status": "running"}
    start = time.perf_counter()
    try:
        entry["headline"] = PART_FUNCTIONS[name](run, report)
        failed = sorted(report.get("errors", {}))
        entry["status"] = "failed" if failed else "ok"
        if failed:
            entry["error"] = "; ".join(f"{step}: {report['errors'][step]['error'][:300]}" for step in failed)
    except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
        record = error_record(exc)
        report.update(record)
        entry.update(status="failed", error=record["error"][:500])
        log(f"== {name}: FAILED: {record['error'][:300]}")
    if report.get("skipped"):
        entry["skipped_steps"] = report["skipped"]
    entry["seconds"] = round(time.perf_counter() - start, 1)
    report["status"] = entry["status"]
    report["part_seconds"] = entry["seconds"]
    run.save(name, report)
    if name == "profile":
        run.handoff.clear()  # the [dev] transformer kept for it
    free_memory(run.device)
    entry["allocated_gib_after"] = allocated_gib(run.device)
    run.save_summary()
    log(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _estimate(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in GPU_ESTIMATES:
        raise argparse.ArgumentTypeError(f"--estimate {text!r}: unknown name {name!r}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--estimate {text!r}: expected NAME=SECONDS") from None


def _names(flag: str, allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """The argparse type of a comma-separated list of ``allowed`` names (``flag`` names it in errors)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        if not names or any(name not in allowed for name in names):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
        return names

    return parse


def prepare_environment() -> Path:
    """No network, and compiler caches outside OUT_DIR (only a few files come back from it). Set before torch,
    diffusers and transformers are imported."""
    work = Path(os.environ.get("FLUXSERVE_FIRST_RUN_WORK") or Path(tempfile.gettempdir()) / "fluxserve-first-run")
    work.mkdir(parents=True, exist_ok=True)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[key] = "1"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "torchinductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton"))
    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the JSON files go (created)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the same code paths, for CI")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run, start-up included (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--parts", type=_names("--parts", PARTS), default=PARTS, metavar="NAME,...",
                        help=f"which parts to run, in this order (default {','.join(PARTS)}; profile needs dev "
                             "before it)")
    parser.add_argument("--dev-levels", type=_names("--dev-levels", LEVELS), default=LEVELS, metavar="LEVEL,...",
                        help="the acceleration levels the dev part runs, in order (default none,regular,high; "
                             "none first: the others' error is against it)")
    parser.add_argument("--estimate", action="append", default=[], metavar="NAME=SECONDS", type=_estimate,
                        help="override the estimated cost of a part or sub-step (e.g. dev.high=150 on a slower "
                             f"GPU); names: {', '.join(GPU_ESTIMATES)}")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = prepare_environment()
    budget = Budget(args.budget, START)
    faulthandler.dump_traceback_later(args.budget + 30, exit=False)  # a hang shows its stacks in the log

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("fluxserve").setLevel(logging.INFO)
    import torch

    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        log("no CUDA device: run with --tiny for the CPU check, or on a GPU machine")
        return 2
    device = torch.device("cpu") if tiny else torch.device("cuda")
    dtype = torch.float32 if tiny else torch.bfloat16  # what the engine loads on each device
    name = "cpu (tiny models)" if tiny else torch.cuda.get_device_name(device)
    run = Run(out=out, tiny=tiny, budget=budget, scale=TINY_SCALE if tiny else GPU_SCALE, device=device,
              dtype=dtype, work_dir=work, device_name=name, estimates=dict(args.estimate), dev_levels=args.dev_levels)
    run.summary = {
        "run": {"mode": "tiny (CPU)" if tiny else "gpu", "device": name, "budget_s": args.budget,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
                "python": platform.python_version(), "work_dir": str(work),
                "resolution": f"{run.scale.width}x{run.scale.height}", "klein_steps": run.scale.klein_steps,
                "estimates_overridden": dict(args.estimate), "parts": list(args.parts),
                "dev_levels": list(args.dev_levels), "attention_override": os.environ.get("FLUXSERVE_ATTENTION")},
        "parts": {},
        "finished": False,
    }
    log(f"fluxserve first run on {name}: budget {args.budget:.0f} s, {budget.left():.0f} s left after start-up; "
        f"OUT_DIR {out}")

    def on_term(signum, _frame):
        run.summary["terminated"] = f"signal {signum} at +{budget.elapsed():.0f} s"
        run.save_summary()
        log(f"terminated by signal {signum}")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    for part in args.parts:
        run_part(run, part)
    run.handoff.clear()
    run.summary["finished"] = True
    run.save_summary()
    faulthandler.cancel_dump_traceback_later()
    statuses = {part: entry["status"] for part, entry in run.summary["parts"].items()}
    log(f"done in {budget.elapsed():.0f} s: {statuses}")
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
