"""Which attention kernel runs: chosen by measurement, once per GPU and attention geometry.

Each candidate that can run on the device is timed on the model's own attention geometry (heads x head_dim, on a
sequence representative of 1024x1024: 4096 image + 512 text tokens) with inputs laid out as the blocks pass them
(the single-stream blocks' strided v and the double-stream blocks' concatenations), and its output is compared with
a float64 reference. Candidates whose error is above the tolerance, or that raise, are dropped with the reason; the
fastest of the rest wins. The figures (ms per layout, TFLOP/s, error, why others were dropped) are kept in the
process, keyed by device and geometry (a second model with the same heads and head_dim reuses them), and are
reported in the acceleration state. Measurement is bounded (a few calls each, a total time budget) and never
raises: on any failure the choice is ``native``. On the CPU nothing is measured: ``native``.

FP8 attention (``fa3_fp8``, lossy) runs only at ``high``, where FlashAttention-3 loads on a Hopper GPU, its error
is within the FP8 tolerance and (unless forced on) it is faster than the exact choice.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fluxserve.engine import attention as kernels

log = logging.getLogger(__name__)

# A bf16 result carries its own rounding: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), so rounding
# the output alone costs ~2.3e-3 relative RMS, which is what PyTorch SDPA, cuDNN, FlashAttention-2 and the
# memory-efficient kernel measured against fp32 on an H200. 1e-2 leaves room for a kernel that also rounds its
# probabilities to bf16, is far below what a wrong result gives (a mishandled layout or scale: 0.1 to 1), and
# below FP8's error, so a lossy kernel never passes as exact.
EXACT_TOLERANCE = 1e-2
# e4m3 keeps 4 significant bits (unit roundoff 2^-4 = 6.3e-2); q, k, v (and, inside the kernel, the probabilities)
# are each rounded once and the errors average over the dot products: a few 1e-2. 0.1 accepts that and rejects a
# kernel that computes something else (a wrong descale or layout: order 1).
FP8_TOLERANCE = 1e-1
MEASURE_BUDGET_S = 20.0  # all candidates together, at load time
REFERENCE_CHUNK_BYTES = 512 * 1024**2  # float64 scores of the heads the reference computes at once

# Tried in this order (the order only breaks ties); each is dropped where it cannot run.
CANDIDATES = ("native", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "_native_cudnn", "fa3", "_flash_3")
# What the GPU benchmark's table shows: the candidates, diffusers' other SDPA and FlashAttention-2 backends, FP8.
TABLE_BACKENDS = (*CANDIDATES, "_native_flash", "_native_efficient", "flash", "fa3_fp8", "fp8_emulated")
_RUN_ANYWHERE = ("native", "sdpa_math", "fp8_emulated")
_NEED_AMPERE = ("sdpa_cudnn", "_native_cudnn", "sdpa_flash", "_native_flash", "flash")


@dataclass(frozen=True)
class AttentionGeometry:
    """The attention a model runs: heads x head_dim on ``image_tokens + text_tokens`` tokens, in
    ``double_blocks`` double-stream and ``single_blocks`` single-stream blocks; the single-stream blocks' v is a view
    of a fused projection ``3 x inner + 2 x mlp_ratio x inner`` wide."""

    heads: int
    head_dim: int
    image_tokens: int = 4096  # 1024x1024 at 16 pixels a token
    text_tokens: int = 512
    double_blocks: int = 1
    single_blocks: int = 1
    mlp_ratio: float = 3.0
    batch: int = 1

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def fused_width(self) -> int:
        inner = self.heads * self.head_dim
        return 3 * inner + 2 * int(inner * self.mlp_ratio)

    @property
    def flops(self) -> int:
        """One attention call: QK^T and PV, 2 x 2 x tokens^2 x head_dim per head."""
        return 4 * self.batch * self.tokens**2 * self.heads * self.head_dim

    def key(self, device: torch.device) -> str:
        return f"{device} {self.heads}x{self.head_dim}"


def geometry_of(transformer: nn.Module, **tokens: int) -> AttentionGeometry:
    """A FLUX.2 transformer's attention geometry from its config (``image_tokens``/``text_tokens`` override)."""
    config = transformer.config
    return AttentionGeometry(heads=config.num_attention_heads, head_dim=config.attention_head_dim,
                             double_blocks=config.num_layers, single_blocks=config.num_single_layers,
                             mlp_ratio=getattr(config, "mlp_ratio", 3.0), **tokens)


# ---- what can run where -----------------------------------------------------------------------------------------
def diffusers_can_use_flash_attention_3() -> bool:
    """diffusers' own test for FlashAttention-3 (the ``flash_attn_3`` package, imported by it), which is what
    its ``_flash_3`` backend needs; an importable ``flash_attn_interface`` alone is not enough."""
    from diffusers.models import attention_dispatch

    return bool(getattr(attention_dispatch, "_CAN_USE_FLASH_ATTN_3", False))


def unavailable(name: str, device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """None when backend ``name`` may run on ``device`` (whether it does is for measurement to find), else why not."""
    if name in _RUN_ANYWHERE or (name == "sdpa_flash" and device.type == "cpu"):  # PyTorch has a CPU flash kernel
        return None
    if not kernels.known_backend(name):
        return f"unknown backend {name!r}"
    if device.type != "cuda":
        return f"not supported on {device.type}"
    major, minor = capability or torch.cuda.get_device_capability(device)
    if name in _NEED_AMPERE and major < 8:
        return f"needs compute capability >= 8.0 (this GPU: {major}.{minor})"
    if name in (*kernels.FA3_BACKENDS, "_flash_3"):
        if major != 9:
            return f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x); this one is {major}.{minor}"
        if name == "_flash_3":
            return None if diffusers_can_use_flash_attention_3() else (
                "diffusers cannot use FlashAttention-3 here (its flash_attn_3 package is not importable)")
        failure = kernels.load_fa3()
        return f"no FlashAttention-3 build loads ({failure})" if failure else None
    if name == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn (FlashAttention-2) is not installed"
    return None


def attention_candidates(device: torch.device, capability: tuple[int, int] | None = None) -> list[str]:
    """The exact kernels worth measuring on ``device``; just ``native`` on the CPU (nothing is measured there)."""
    if device.type != "cuda":
        return ["native"]
    return [name for name in CANDIDATES if unavailable(name, device, capability) is None]


def tolerance(name: str) -> float:
    return FP8_TOLERANCE if name in kernels.LOSSY_BACKENDS else EXACT_TOLERANCE


# ---- measuring --------------------------------------------------------------------------------------------------
Layouts = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]


def model_layouts(geometry: AttentionGeometry, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0) -> Layouts:
    """q, k, v as the blocks pass them: ``single``: q and k fresh (RMSNorm + RoPE outputs), v a strided view of
    the fused QKV + MLP projection; ``double``: text + image concatenations (fresh, contiguous)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (geometry.batch, geometry.tokens, geometry.heads, geometry.head_dim)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    inner = geometry.heads * geometry.head_dim
    fused = normal(geometry.batch, geometry.tokens, geometry.fused_width)
    value = fused[..., 2 * inner: 3 * inner].unflatten(-1, (geometry.heads, geometry.head_dim))
    return {"single": (normal(*shape), normal(*shape), value),
            "double": (normal(*shape), normal(*shape), normal(*shape))}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64 with plain matrix products (no attention kernel), a few heads at a
    time so the scores stay within ``REFERENCE_CHUNK_BYTES``; returned in float32, (batch, seq, heads, dim)."""
    batch, tokens, heads, dim = q.shape
    step = max(1, REFERENCE_CHUNK_BYTES // (8 * batch * tokens * k.shape[1]))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(0, heads, step):
        qh, kh, vh = (x[:, :, h: h + step].transpose(1, 2).double() for x in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dim), dim=-1)
        out[:, :, h: h + step] = (weights @ vh).transpose(1, 2).float()
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32; inf for a non-finite output."""
    error = float((out.float() - ref.float()).norm() / ref.float().norm())
    return error if math.isfinite(error) else math.inf


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _failure(exc: BaseException) -> str:
    return f"raised {type(exc).__name__}: {str(exc).strip()[:300]}"


def _measure_one(name: str, run: Run, layouts: Layouts, references: dict[str, dict[str, torch.Tensor]],
                 geometry: AttentionGeometry, *, warmup: int, calls: int, clock: Callable[[], float],
                 sync: Callable[[], None]) -> dict:
    per_layout = {}
    for layout, (q, k, v) in layouts.items():
        out = run(q, k, v, name)
        if tuple(out.shape) != tuple(q.shape):
            raise ValueError(f"returned shape {tuple(out.shape)}, not {tuple(q.shape)}")
        errors = {f"rel_error_vs_{kind}": rel_error(out, refs[layout]) for kind, refs in references.items()}
        del out
        for _ in range(warmup - 1):
            run(q, k, v, name)
        sync()
        begin = clock()
        for _ in range(calls):
            run(q, k, v, name)
        sync()
        ms = (clock() - begin) * 1000 / calls
        per_layout[layout] = {"ms": ms, "tflops": geometry.flops / ms / 1e9 if ms > 0 else None, **errors}
    forward_ms = (geometry.double_blocks * per_layout["double"]["ms"]
                  + geometry.single_blocks * per_layout["single"]["ms"])
    calls_per_forward = geometry.double_blocks + geometry.single_blocks
    entry: dict = {"ms_per_forward": forward_ms,
                   "tflops": calls_per_forward * geometry.flops / forward_ms / 1e9 if forward_ms > 0 else None}
    for kind in references:
        worst = max(row[f"rel_error_vs_{kind}"] for row in per_layout.values())
        entry[f"rel_error_vs_{kind}"] = worst if math.isfinite(worst) else None
    entry["layouts"] = per_layout
    error, limit = entry["rel_error_vs_fp32"], tolerance(name)
    if error is None:
        entry["dropped"] = "non-finite output"
    elif error > limit:
        entry["dropped"] = f"error {error:.2e} against fp32 is above the {limit:g} tolerance"
    return entry


def measure_attention(device: torch.device, geometry: AttentionGeometry, names: Sequence[str], *,
                      run: Run = kernels.attend, clock: Callable[[], float] = time.perf_counter, warmup: int = 2,
                      calls: int = 5, budget_s: float = MEASURE_BUDGET_S, bf16_reference: bool = False,
                      seed: int = 0) -> dict[str, dict]:
    """Time and check each backend in ``names`` on ``geometry``'s two layouts: name -> {"ms_per_forward" (double
    blocks x double-layout ms + single blocks x single-layout ms), "tflops", "rel_error_vs_fp32" (the worse
    layout), "layouts": {layout: {ms, tflops, rel_error_vs_fp32}}, and "dropped": why, when above its tolerance},
    or {"skipped": why} when it raised or the ``budget_s`` was spent. ``bf16_reference`` adds errors against
    PyTorch's SDPA in bf16 (``native``). Raises only when the inputs or references cannot be built."""
    sync = _synchronizer(device)
    table: dict[str, dict] = {}
    with torch.inference_mode():
        layouts = model_layouts(geometry, device, seed=seed)
        references = {"fp32": {layout: reference(*qkv) for layout, qkv in layouts.items()}}
        if bf16_reference:
            references["bf16"] = {layout: kernels.attend(*qkv, "native") for layout, qkv in layouts.items()}
        start = clock()
        for name in names:
            if clock() - start > budget_s:
                table[name] = {"skipped": f"not measured: the {budget_s:g} s measurement budget was spent"}
                continue
            try:
                table[name] = _measure_one(name, run, layouts, references, geometry, warmup=warmup, calls=calls,
                                           clock=clock, sync=sync)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run these inputs is dropped
                table[name] = {"skipped": _failure(exc)}
    return table


# ---- the choice, remembered per process -------------------------------------------------------------------------
_tables: dict[str, dict[str, dict]] = {}  # geometry key -> backend -> figures, measured once
_lock = threading.Lock()


def measured(device: torch.device, geometry: AttentionGeometry, names: Sequence[str], **measure) -> dict[str, dict]:
    """The figures of ``names`` on ``device`` and ``geometry``: measured the first time each is asked for, then
    remembered for the process."""
    key = geometry.key(device)
    with _lock:
        table = _tables.setdefault(key, {})
        missing = [name for name in names if name not in table]
        if missing:
            table.update(measure_attention(device, geometry, missing, **measure))
            log.info("attention on %s: %s", key, "; ".join(f"{n} {_summary(table[n])}" for n in missing))
        return {name: table[name] for name in names}


def _summary(entry: dict) -> str:
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    text = f"{entry['ms_per_forward']:.3f} ms/forward, error {entry['rel_error_vs_fp32']}"
    return f"{text}, dropped ({entry['dropped']})" if "dropped" in entry else text


def usable(entry: dict) -> bool:
    return "ms_per_forward" in entry and "dropped" not in entry


def choose_attention(device: torch.device, geometry: AttentionGeometry, candidates: Sequence[str] | None = None,
                     **measure) -> tuple[str, str, dict[str, dict]]:
    """(backend, why, figures): the fastest candidate within tolerance on ``device`` and ``geometry``, measured
    once per process (``measured``); ``native`` when only it is a candidate (the CPU) or none passed."""
    names = list(candidates) if candidates is not None else attention_candidates(device)
    if len(names) == 1:
        return names[0], f"the only candidate on {device.type}: not measured", {}
    figures = measured(device, geometry, names, **measure)
    fine = [name for name in names if usable(figures[name])]
    if not fine:
        return "native", f"no candidate of {len(names)} ran within tolerance: native", figures
    best = min(fine, key=lambda name: figures[name]["ms_per_forward"])
    why = (f"fastest of {len(fine)} exact kernels measured ({len(names) - len(fine)} dropped) on "
           f"{geometry.heads}x{geometry.head_dim} heads, {geometry.tokens} tokens: "
           f"{figures[best]['ms_per_forward']:.2f} ms of attention per forward")
    return best, why, figures


@dataclass(frozen=True)
class AttentionDecision:
    """What runs (``backend``) and why; whether FP8 attention is on and why (or why not); the figures."""

    backend: str
    why: str
    fp8: bool = False
    fp8_why: str = ""
    figures: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _fp8_blocked(device: torch.device, level: str, switch: bool | None) -> str | None:
    if switch is False:
        return "switched off (FLUXSERVE_FP8_ATTENTION=0)"
    if level != "high":
        return f"lossy: off at {level}"
    reason = unavailable("fa3_fp8", device)
    return f"not available: {reason}" if reason else None


def fp8_verdict(figures: dict[str, dict], exact: str, switch: bool | None) -> tuple[bool, str]:
    """(on, why) for FP8 attention from the measured figures of ``fa3_fp8`` and of the ``exact`` choice: on when
    it ran within its tolerance and, unless ``switch`` forces it (True), is faster than the exact kernel."""
    entry = figures["fa3_fp8"]
    if "skipped" in entry:
        return False, f"fa3_fp8 did not run: {entry['skipped']}"
    if "dropped" in entry:
        return False, f"fa3_fp8 {entry['dropped']}"
    ms, error = entry["ms_per_forward"], entry["rel_error_vs_fp32"]
    versus = figures.get(exact, {})
    compared = f" against {versus['ms_per_forward']:.2f} ms with {exact}" if usable(versus) else ""
    if switch is None and usable(versus) and versus["ms_per_forward"] <= ms:
        return False, f"slower than the exact choice: {ms:.2f} ms of attention per forward{compared}"
    how = "FLUXSERVE_FP8_ATTENTION=1" if switch else "auto at high"
    return True, f"on ({how}): error {error:.2e} against fp32, {ms:.2f} ms of attention per forward{compared}"


def decide(device: torch.device, geometry: AttentionGeometry, level: str, *, forced: str | None = None,
           fp8: bool | None = None, candidates: Sequence[str] | None = None, **measure) -> AttentionDecision:
    """The attention for a model at ``level`` on ``device``: stock ``native`` at ``none``; else ``forced`` (an
    exact backend name, from FLUXSERVE_ATTENTION) or the measured choice; at ``high``, ``fa3_fp8`` instead where
    it passes (``fp8``: None = auto, True = whenever it runs within tolerance, False = never). ``candidates`` and
    ``measure`` (``measure_attention``'s keywords) are for tests and benchmarks. Never raises."""
    if level == "none":
        return AttentionDecision("native", "level none: diffusers' stock attention (PyTorch's SDPA dispatch)",
                                 False, "off at none")
    fp8_blocked = _fp8_blocked(device, level, fp8)
    try:
        if forced and kernels.known_backend(forced) and forced not in kernels.LOSSY_BACKENDS:
            exact, why, figures = forced, f"forced (FLUXSERVE_ATTENTION={forced})", {}
        else:
            exact, why, figures = choose_attention(device, geometry, candidates, **measure)
            if forced:
                why = f"FLUXSERVE_ATTENTION={forced!r} is not an exact backend, ignored; {why}"
        if fp8_blocked is None:
            figures = {**figures, **measured(device, geometry, ["fa3_fp8"], **measure)}
    except Exception as exc:  # noqa: BLE001 - the load goes on with the default kernel
        log.warning("attention measurement failed on %s (%s); using native", device, exc)
        return AttentionDecision("native", f"measurement failed ({_failure(exc)}): native", False,
                                 fp8_blocked or "measurement failed")
    if fp8_blocked is not None:
        return AttentionDecision(exact, why, False, fp8_blocked, figures)
    on, fp8_why = fp8_verdict(figures, exact, fp8)
    if on:
        return AttentionDecision("fa3_fp8", f"FP8 attention at high; the exact choice: {exact}, {why}", True,
                                 fp8_why, figures)
    return AttentionDecision(exact, why, False, fp8_why, figures)


# ---- for the GPU benchmark --------------------------------------------------------------------------------------
def graph_breaks(device: torch.device, names: Sequence[str], geometry: AttentionGeometry | None = None) -> dict:
    """name -> "none" when ``attend(..., name)`` traces whole under ``torch.compile(fullgraph=True)`` (the
    ``aot_eager`` backend: dynamo and AOT autograd, no code generation) on the single-stream layout, else the
    error. Small shapes: this checks tracing, not speed."""
    geometry = geometry or AttentionGeometry(heads=2, head_dim=64, image_tokens=48, text_tokens=16)
    q, k, v = model_layouts(geometry, device)["single"]
    result = {}
    limit = max(64, torch._dynamo.config.cache_size_limit)
    with torch._dynamo.config.patch(cache_size_limit=limit), torch.inference_mode():
        for name in names:
            try:
                torch.compile(kernels.attend, fullgraph=True, backend="aot_eager")(q, k, v, name)
                result[name] = "none"
            except Exception as exc:  # noqa: BLE001 - recorded per backend
                result[name] = _failure(exc)
    return result


def attention_table(device: torch.device, geometry: AttentionGeometry, backends: Sequence[str] = TABLE_BACKENDS, *,
                    warmup: int = 3, calls: int = 10, budget_s: float = 120.0, compile_check: bool = False) -> dict:
    """Every backend in ``backends`` on ``device`` and ``geometry``, JSON-able: per backend the figures of
    ``measure_attention`` (ms and TFLOP/s per layout, errors against fp32 and against bf16 SDPA) or
    {"skipped": why it did not run}; with ``compile_check``, whether each traces without graph breaks."""
    runnable = [name for name in backends if unavailable(name, device) is None]
    figures = measure_attention(device, geometry, runnable, warmup=warmup, calls=calls, budget_s=budget_s,
                                bf16_reference=True)
    rows = {name: figures.get(name) or {"skipped": unavailable(name, device)} for name in backends}
    if compile_check:
        for name, outcome in graph_breaks(device, [n for n in runnable if "skipped" not in rows[n]]).items():
            rows[name]["graph_breaks"] = outcome
    return {"device": str(device), "geometry": asdict(geometry), "tokens": geometry.tokens,
            "flops_per_call": geometry.flops, "layouts": ["single: v a strided view of the fused projection",
                                                          "double: text + image concatenations"],
            "reference": "float64 softmax(q k^T / sqrt(d)) v on the same bf16 inputs",
            "tolerance": {"exact": EXACT_TOLERANCE, "fp8": FP8_TOLERANCE},
            "candidates": attention_candidates(device), "fa3_source": kernels.fa3_source(), "backends": rows}


def fp8_attention_report(device: torch.device, geometry: AttentionGeometry, **table) -> dict:
    """FP8 attention against bf16 and fp32 on ``geometry``: FlashAttention-3 FP8 (``fa3_fp8``), the same
    quantisation run in fp32 (``fp8_emulated``: the quantisation's share of the error), and the bf16 kernels
    it replaces (``fa3``, ``native``); plus what ``high`` would decide here."""
    report = attention_table(device, geometry, ("fa3_fp8", "fp8_emulated", "fa3", "native"), **table)
    report["decision_at_high"] = decide(device, geometry, "high").as_dict()
    return report
