"""Split or fused: the single-stream blocks' in-projection as one GEMM or two, chosen by timing.

FLUX.2's single blocks project each token once to Q, K, V and the MLP input (``to_qkv_mlp_proj``: [dev] 6144 ->
3 x 6144 + 2 x 18432 = 55296 outputs). cuBLAS does not run every shape at the same rate: on an H200 the fused
GEMM ran at 690 TFLOP/s and the QKV and MLP halves alone at 702-721. ``measure_split`` times both ways on the
model's own shapes (the same weight: the halves are views of its rows, so no memory is added) and
``choose_split`` keeps the faster, once per device, precision and shape. Without a CUDA device nothing is
measured and the projection stays fused.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time

import torch
from torch import nn

from fluxserve.engine.blocks import SINGLE, Quantised, project, quantise, splittable, takes_quantised

log = logging.getLogger(__name__)

SPLIT_TOKENS = 4096 + 512  # [dev] and klein at 1024x1024: image tokens + text tokens
SPLIT_MARGIN = 0.01  # split only when it is faster by more than this fraction (timing noise stays fused)

_choices: dict[tuple, dict] = {}
_lock = threading.Lock()


def single_in_projection(transformer: nn.Module) -> tuple[nn.Module, int] | None:
    """(the first single block's in-projection, its QKV width), or None without single blocks."""
    for module in transformer.modules():
        if type(module).__name__ == SINGLE:
            return module.attn.to_qkv_mlp_proj, 3 * module.attn.inner_dim
    return None


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def measure_split(layer: nn.Module, qkv_width: int, tokens: int = SPLIT_TOKENS, *, warmup: int = 3,
                  repeats: int = 10) -> dict:
    """Time ``layer`` (a bf16 Linear or a row-wise w8a8 FP8Linear) on ``tokens`` rows of random input,
    fused and as two GEMMs (rows ``[0, qkv_width)`` and the rest). Returns the figures: ms and TFLOP/s each
    way, and ``split`` (True when splitting is faster by more than ``SPLIT_MARGIN``)."""
    if not splittable(layer):
        raise ValueError(f"{type(layer).__name__} cannot run as row views")
    device = layer.weight_fp8.device if takes_quantised(layer) else layer.weight.device
    dtype = layer.compute_dtype if takes_quantised(layer) else layer.weight.dtype
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, layer.in_features, device=device, dtype=dtype, generator=generator)
    rows_in: torch.Tensor | Quantised = quantise(x) if takes_quantised(layer) else x
    out = layer.out_features
    with torch.no_grad():
        fused_ms = time_ms(lambda: project(layer, rows_in), device, warmup, repeats)
        split_ms = time_ms(lambda: (project(layer, rows_in, (0, qkv_width)),
                                     project(layer, rows_in, (qkv_width, out))), device, warmup, repeats)
    flop = 2.0 * tokens * layer.in_features * out
    return {
        "tokens": tokens, "in_features": layer.in_features, "out_features": out, "qkv_rows": qkv_width,
        "precision": "fp8-w8a8" if takes_quantised(layer) else str(dtype).replace("torch.", ""),
        "fused_ms": round(fused_ms, 4), "split_ms": round(split_ms, 4),
        "fused_tflops": round(flop / fused_ms / 1e9, 1), "split_tflops": round(flop / split_ms / 1e9, 1),
        "split": split_ms < fused_ms * (1 - SPLIT_MARGIN),
    }


def choose_split(transformer: nn.Module, device: torch.device, forced: bool | None = None) -> tuple[bool, dict | None]:
    """(split, figures): ``forced`` when given; else on CUDA the measured choice for this device, precision
    and shape (measured once, remembered), else fused. A measurement that fails keeps the projection fused
    and says why in the figures (``error``)."""
    found = single_in_projection(transformer)
    if found is None or not splittable(found[0]):
        return False, None
    layer, qkv_width = found
    if forced is not None:
        return forced, None
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, None
    key = (str(device), type(layer).__name__, layer.in_features, layer.out_features, qkv_width)
    with _lock:
        if key not in _choices:
            try:
                _choices[key] = measure_split(layer, qkv_width)
            except Exception as exc:  # noqa: BLE001 - out of memory, an unsupported shape: stay fused
                log.warning("timing the split in-projection failed (%s); keeping it fused", exc)
                _choices[key] = {"split": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            log.info("single-block in-projection on %s: %s", device, _choices[key])
        figures = _choices[key]
    return bool(figures["split"]), figures
