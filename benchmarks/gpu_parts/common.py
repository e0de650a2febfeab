"""What every part of ``benchmarks/gpu_run.py`` shares: the run's sizes, its clock and budget, the log, the JSON
files, and small measuring tools (CUDA-event timing, errors, memory, MFU).

A part is a module of this package with ``ESTIMATES`` (``{"gpu": {...}, "tiny": {...}}``: generous seconds for the
part and each of its sub-steps, first compile included) and ``part(run, report) -> dict`` (its headline numbers),
which records into ``report`` as it goes and runs each sub-step through ``run.step`` so that what does not fit the
budget is skipped and what fails is recorded with its traceback while the run goes on.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEVELS = ("none", "regular", "high")


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
    defaults: dict[str, float] = field(default_factory=dict)  # every part's estimates for this mode
    estimates: dict[str, float] = field(default_factory=dict)  # --estimate overrides
    bundle: Path | None = None  # --bundle: every JSON file of the run in one, kept current
    bundled: dict = field(default_factory=dict)
    dev_levels: tuple[str, ...] = LEVELS  # the levels (and high's variants) the dev part runs

    def estimate(self, name: str) -> float:
        if name in self.estimates:
            return self.estimates[name]
        return float(self.defaults[name])

    def save(self, part: str, report: dict) -> None:
        self._write(f"{part}.json", report)

    def save_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.budget.elapsed(), 1)
        self._write("summary.json", self.summary)

    def _write(self, name: str, data: dict) -> None:
        """One JSON file in OUT_DIR, and the bundle (every file so far in one, rewritten each time) if asked."""
        write_json(self.out / name, data)
        if self.bundle is not None:
            self.bundled[name] = _clean(data)
            write_json(self.bundle, {"files": self.bundled})

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
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded, and the run goes on
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


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


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


def dev_transformer_meta(run: Run):
    """The [dev] transformer on the meta device (no memory): its real shapes, or the tiny ones."""
    from fluxserve.engine import random_weights

    arch = random_weights.tiny_architecture("dev") if run.tiny else None
    return random_weights.build_transformer("dev", "meta", run.dtype, arch=arch)


