"""Measurements of the fused kernels for a GPU run: each kernel against what inductor makes of the same torch code,
and the error of ``_scaled_mm``'s fast accumulation.

``benchmark_kernels(device)`` runs every fused op on FLUX.2 [dev]'s real shapes on CUDA (4096 image + 512 text
tokens, hidden 6144, 48 heads of 128, MLP 18432), tiny shapes elsewhere, and returns a JSON-able dict: per case
the fused op's and the compiled stock code's median ms and GB/s (bytes read and written counted once), and how
their outputs compare with eager PyTorch's (``match``: the fraction of bit-equal float8 values / bf16 values and
scales, and the largest difference of the dequantised values). ``fast_accum_error(device)`` compares
``_scaled_mm`` with and without ``use_fast_accum`` on [dev]'s FP8 GEMM shapes against the float32 product of
the same FP8 operands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fluxserve.engine import fp8
from fluxserve.engine.kernels import norm_quant, ops, qk_rope, runtime, swiglu_quant
from fluxserve.engine.split import time_ms


@dataclass(frozen=True)
class Shapes:
    image_tokens: int
    text_tokens: int
    hidden: int
    heads: int
    head_dim: int
    mlp: int

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


DEV = Shapes(image_tokens=4096, text_tokens=512, hidden=6144, heads=48, head_dim=128, mlp=18432)
TINY = Shapes(image_tokens=36, text_tokens=5, hidden=64, heads=4, head_dim=16, mlp=96)


def shapes_for(device: torch.device) -> Shapes:
    return DEV if device.type == "cuda" else TINY


# ---- comparing outputs --------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(view)


def _match(got, want) -> dict:
    """How ``got`` compares with ``want``: (q, scale) pairs or plain tensors."""
    if isinstance(got, tuple):
        (q, scale), (ref_q, ref_scale) = got, want
        deq = q.float() * scale
        ref = ref_q.float() * ref_scale
        return {
            "fp8_equal": float((_bits(q) == _bits(ref_q)).float().mean()),
            "scale_equal": float((scale == ref_scale).float().mean()),
            "scale_max_rel_diff": float(((scale - ref_scale).abs() / ref_scale).max()),
            "max_abs_diff": float((deq - ref).abs().max()),
            "exact": bool(torch.equal(_bits(q), _bits(ref_q)) and torch.equal(scale, ref_scale)),
        }
    return {
        "equal": float((_bits(got) == _bits(want)).float().mean()),
        "max_abs_diff": float((got.float() - want.float()).abs().max()),
        "exact": bool(torch.equal(_bits(got), _bits(want))),
    }


# ---- the cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    fused: Callable[[], object]  # the fluxserve op
    stock: Callable[..., object]  # the torch code the blocks run without the kernels
    inputs: tuple
    bytes_moved: int
    same_math: bool = True  # False: the fused op rounds once where the stock code rounds twice


def _rotary(tokens: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    side = max(1, int(math.sqrt(tokens)))
    t = torch.arange(tokens, device=device)
    ids = torch.stack([torch.zeros_like(t), t // side, t % side, torch.zeros_like(t)], dim=-1)
    return Flux2PosEmbed(theta=2000, axes_dim=[head_dim // 4] * 4)(ids)


def _stock_swiglu_quant(attn, mlp):
    parts = [] if attn is None else [attn.flatten(2, 3)]
    if mlp is not None:
        gate, up = mlp.chunk(2, dim=-1)
        parts.append(F.silu(gate) * up)
    x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return fp8.quantize_tensor(x.reshape(-1, x.shape[-1]), "row")


def _stock_norm_quant(x, shift, scale):
    y = (1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=1e-6) + shift
    return fp8.quantize_tensor(y.reshape(-1, y.shape[-1]), "row")


def _stock_rope(q, weight, cos, sin, context=None, context_weight=None, fp8_scale=None):
    """The stock q/k path; with ``fp8_scale``, its bf16 output quantised (the fused op quantises the float32
    value before that rounding, so the two differ by the bf16 rounding)."""
    from diffusers.models.embeddings import apply_rotary_emb

    normed = F.rms_norm(q, (q.shape[-1],), weight, 1e-6)
    if context is not None:
        normed = torch.cat([F.rms_norm(context, (q.shape[-1],), context_weight, 1e-6), normed], dim=1)
    out = apply_rotary_emb(normed, (cos, sin), sequence_dim=1)
    if fp8_scale is not None:
        return (out.float() / fp8_scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE)
    return out


def cases(device: torch.device, shapes: Shapes) -> list[Case]:
    """The fused ops on the views the blocks pass them, with [dev]'s sizes (``shapes``)."""
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    T, C, H, D, M = shapes.tokens, shapes.hidden, shapes.heads, shapes.head_dim, shapes.mlp

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=g) * scale).to(bf16)

    single_proj = randn(1, T, 3 * C + 2 * M, scale=2.0)  # to_qkv_mlp_proj's output
    attended = randn(1, T, H, D)  # attention's output
    mlp = single_proj[..., 3 * C:]
    ff_hidden = randn(1, shapes.image_tokens, 2 * M, scale=2.0)  # a double block's ff.linear_in output
    image_attended = attended[:, shapes.text_tokens:]
    x = randn(1, T, C, scale=2.0)
    temb = randn(1, 1, 3 * C)
    shift, scale = temb[..., :C], temb[..., C : 2 * C]
    weight = (torch.rand(D, device=device, generator=g) + 0.5).to(bf16)
    context_weight = (torch.rand(D, device=device, generator=g) + 0.5).to(bf16)
    cos, sin = _rotary(T, D, device)
    q = single_proj[..., :C].unflatten(-1, (-1, D))
    image_qkv = randn(1, shapes.image_tokens, 3 * C, scale=2.0)
    text_qkv = randn(1, shapes.text_tokens, 3 * C, scale=2.0)
    image_q, text_q = image_qkv[..., :C].unflatten(-1, (-1, D)), text_qkv[..., :C].unflatten(-1, (-1, D))
    q_scale = qk_rope.fp8_scale_bound(weight, context_weight)
    return [
        Case("single_block_out_quant (a)", lambda: ops.swiglu_quant_rows(attended, mlp), _stock_swiglu_quant,
             (attended, mlp), swiglu_quant.bytes_moved(attended, mlp)),
        Case("double_block_ff_out_quant (a, SwiGLU only)", lambda: ops.swiglu_quant_rows(None, ff_hidden),
             _stock_swiglu_quant, (None, ff_hidden), swiglu_quant.bytes_moved(None, ff_hidden)),
        Case("double_block_attn_out_quant (a, attention only)", lambda: ops.swiglu_quant_rows(image_attended, None),
             _stock_swiglu_quant, (image_attended, None), swiglu_quant.bytes_moved(image_attended, None)),
        Case("layernorm_modulation_quant (b)", lambda: ops.norm_quant_rows(x, shift, scale, 1e-6), _stock_norm_quant,
             (x, shift, scale), norm_quant.bytes_moved(x, shift, scale)),
        Case("single_block_qk_rmsnorm_rope (c)", lambda: ops.rms_norm_rope(q, weight, cos, sin, 1e-6), _stock_rope,
             (q, weight, cos, sin), qk_rope.bytes_moved(q, None, bf16)),
        Case("double_block_qk_rmsnorm_rope (c, text + image)",
             lambda: ops.rms_norm_rope(image_q, weight, cos, sin, 1e-6, text_q, context_weight), _stock_rope,
             (image_q, weight, cos, sin, text_q, context_weight), qk_rope.bytes_moved(image_q, text_q, bf16)),
        Case("double_block_qk_rmsnorm_rope_fp8 (c, FP8 out)",
             lambda: ops.rms_norm_rope(image_q, weight, cos, sin, 1e-6, text_q, context_weight, q_scale),
             _stock_rope, (image_q, weight, cos, sin, text_q, context_weight, q_scale),
             qk_rope.bytes_moved(image_q, text_q, fp8.FP8_DTYPE), same_math=False),
    ]


def benchmark_kernels(device: torch.device | str | None = None, *, shapes: Shapes | None = None,
                      warmup: int = 5, repeats: int = 20, compile_backend: str | None = None,
                      only: tuple[str, ...] = ()) -> dict:
    """Each fused op against the stock torch code compiled by ``torch.compile`` (inductor on CUDA; on the CPU
    ``aot_eager`` by default, which keeps a test quick): median ms, GB/s, and the match of both with eager
    PyTorch. ``only`` keeps the cases whose name contains one of its strings (each case compiles one graph).
    JSON-able."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes or shapes_for(device)
    backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "compiled_with": backend, "shapes": asdict(shapes), "cases": {},
    }
    with torch.no_grad():
        for case in cases(device, shapes):
            if only and not any(part in case.name for part in only):
                continue
            compiled = torch.compile(case.stock, backend=backend, dynamic=False)
            eager = case.stock(*case.inputs)
            fused_out = case.fused()
            compiled_out = compiled(*case.inputs)
            fused_ms = time_ms(case.fused, device, warmup, repeats)
            compiled_ms = time_ms(lambda c=compiled, i=case.inputs: c(*i), device, warmup, repeats)
            report["cases"][case.name] = {
                "bytes": case.bytes_moved, "same_math": case.same_math,
                "fused_ms": round(fused_ms, 4), "fused_gbps": round(case.bytes_moved / fused_ms / 1e6, 1),
                "compiled_ms": round(compiled_ms, 4),
                "compiled_gbps": round(case.bytes_moved / compiled_ms / 1e6, 1),
                "speedup": round(compiled_ms / fused_ms, 2),
                "fused_vs_eager": _match(fused_out, eager),
                "compiled_vs_eager": _match(compiled_out, eager),
                "fused_vs_compiled": _match(fused_out, compiled_out),
            }
    # after the runs: a kernel that failed to compile or launch fell back to its torch reference
    report["triton"] = runtime.unavailable_reason(device) or "ran the Triton kernels"
    return report


# ---- fast accumulation --------------------------------------------------------------------------------
def gemm_shapes(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """(in, out) of each FP8 Linear in the blocks."""
    C, M = shapes.hidden, shapes.mlp
    return {"single_in (qkv+mlp)": (C, 3 * C + 2 * M), "single_out": (C + M, C), "double_qkv": (C, 3 * C),
            "double_attn_out": (C, C), "double_ff_in": (C, 2 * M), "double_ff_out": (M, C)}


def fast_accum_error(device: torch.device | str | None = None, *, shapes: Shapes | None = None,
                     tokens: int | None = None, warmup: int = 3, repeats: int = 10) -> dict:
    """``_scaled_mm`` with ``use_fast_accum`` off and on, per [dev] GEMM shape, on random row-quantised operands
    (activations N(0, 1), weights N(0, 0.02), as the random-weight models): each one's relative L2 and max
    error against the float32 product of the same FP8 values, their difference, and ms each. JSON-able."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes or shapes_for(device)
    tokens = tokens or shapes.tokens
    g = torch.Generator(device=device).manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                    "tokens": tokens, "gemms": {}}
    with torch.no_grad():
        for name, (fan_in, fan_out) in gemm_shapes(shapes).items():
            x = torch.randn(tokens, fan_in, device=device, generator=g).to(torch.bfloat16)
            w = (torch.randn(fan_out, fan_in, device=device, generator=g) * 0.02).to(torch.bfloat16)
            xq, xs = fp8.quantize_tensor(x, "row")
            wq, ws = fp8.quantize_tensor(w, "row")
            del x, w
            exact = (xq.float() * xs) @ (wq.float() * ws).t()

            def product(fast: bool, xq=xq, xs=xs, wq=wq, ws=ws):
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1),
                                        out_dtype=torch.bfloat16, use_fast_accum=fast)

            default, fast = product(False), product(True)
            norm = exact.norm()
            report["gemms"][name] = {
                "in": fan_in, "out": fan_out,
                "default_rel_error": float((default.float() - exact).norm() / norm),
                "fast_rel_error": float((fast.float() - exact).norm() / norm),
                "default_max_abs_error": float((default.float() - exact).abs().max()),
                "fast_max_abs_error": float((fast.float() - exact).abs().max()),
                "fast_vs_default_rel": float((fast.float() - default.float()).norm() / default.float().norm()),
                "default_ms": round(time_ms(lambda: product(False), device, warmup, repeats), 4),
                "fast_ms": round(time_ms(lambda: product(True), device, warmup, repeats), 4),
            }
            del exact, default, fast
    return report
