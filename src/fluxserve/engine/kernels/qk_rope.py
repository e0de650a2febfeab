"""Per-head RMSNorm + rotary embedding for q or k, read from the QKV projection's output where it is.

The blocks take q and k as (B, S, H, D) views of the projection output (strided: every token's row holds q, k,
v and, in the single-stream blocks, the MLP input), normalise each head (``torch.nn.RMSNorm(D)`` with its
weight), and rotate interleaved pairs with the (S, D) float32 cos/sin tables (diffusers' ``apply_rotary_emb``,
``use_real=True, use_real_unbind_dim=-1``). The double-stream blocks first concatenate the text tokens (normed
with ``norm_added_q``/``norm_added_k``) before the image tokens. The kernel does the norm, the optional text
segment and the rotation in one pass and writes a contiguous (B, S_text + S, H, D) tensor.

Rounding: as the stock operations, the normalised value is rounded to the activation dtype once (RMSNorm's
weight is applied in float32 first) and the rotation is computed in float32 from it and rounded once.

FP8 output (for FP8 attention): with ``fp8_scale`` given the output is ``clamp(rotated / fp8_scale)`` in
float8_e4m3fn instead. ``fp8_scale_bound`` gives a fixed scale that never clips: after RMSNorm a head's
squared values sum to at most ``D * max(w)^2`` (the normalised row has mean square <= 1), and the rotation
keeps each pair's norm, so ``|out| <= sqrt(D) * max|w|``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fluxserve.engine.fp8 import FP8_DTYPE, FP8_MAX
from fluxserve.engine.kernels.runtime import TORCH, Numerics, jit, next_power_of_2, rounded, tl


@jit
def _rms_rope_kernel(
    x_ptr, x_sb, x_ss, x_sh, x_sd,
    w_ptr, cos_ptr, sin_ptr, cs_ss, cs_sd,
    out_ptr, fp8_scale_ptr,
    S, S_total, seq_offset, H, D, eps,
    HEADS: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    d = tl.arange(0, BLOCK_D)
    partner = d ^ 1  # the other element of d's rotation pair
    mask = (h[:, None] < H) & (d[None, :] < D)
    base = x_ptr + b * x_sb + s * x_ss + h[:, None] * x_sh
    x = tl.load(base + d[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    wp = tl.load(w_ptr + partner, mask=d < D, other=0.0).to(tl.float32)[None, :]
    dtype = x_ptr.dtype.element_ty
    y = (x * inv_rms * w).to(dtype).to(tl.float32)
    yp = (xp * inv_rms * wp).to(dtype).to(tl.float32)
    t = seq_offset + s
    cos = tl.load(cos_ptr + t * cs_ss + d * cs_sd, mask=d < D, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * cs_ss + d * cs_sd, mask=d < D, other=0.0)[None, :]
    rotated = tl.where((d % 2 == 0)[None, :], -yp, yp)
    out = y * cos + rotated * sin
    offsets = ((b * S_total + t) * H + h[:, None]) * D + d[None, :]
    if FP8:
        out = tl.minimum(tl.maximum(tl.math.div_rn(out, tl.load(fp8_scale_ptr)), -448.0), 448.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def output_shape(x: torch.Tensor, context: torch.Tensor | None) -> tuple[int, int, int, int]:
    B, S, H, D = x.shape
    return B, S + (0 if context is None else context.shape[1]), H, D


def launch(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
           context: torch.Tensor | None = None, context_weight: torch.Tensor | None = None,
           fp8_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Run the Triton kernel: rotate(rms_norm(cat([context, x], 1))) as a contiguous (B, S_total, H, D)
    tensor (in x's dtype, or float8_e4m3fn divided by ``fp8_scale``)."""
    shape = output_shape(x, context)
    B, S_total, H, D = shape
    out = torch.empty(shape, dtype=FP8_DTYPE if fp8_scale is not None else x.dtype, device=x.device)
    heads = min(next_power_of_2(H), max(1, 2048 // next_power_of_2(D)))
    segments = [(x, weight, S_total - x.shape[1])]
    if context is not None:
        segments.insert(0, (context, context_weight, 0))
    scale = fp8_scale if fp8_scale is not None else cos
    for part, w, offset in segments:
        if part.shape[1] == 0 or B == 0:
            continue
        _rms_rope_kernel[(B * part.shape[1], -(-H // heads))](
            part, *part.stride(), w, cos, sin, *cos.stride(), out, scale,
            part.shape[1], S_total, offset, H, D, float(eps),
            HEADS=heads, BLOCK_D=next_power_of_2(D), FP8=fp8_scale is not None, num_warps=4,
        )
    return out


def reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
              context: torch.Tensor | None = None, context_weight: torch.Tensor | None = None,
              fp8_scale: torch.Tensor | None = None, numerics: Numerics = TORCH) -> torch.Tensor:
    """What the kernel computes, in torch (the CPU path; with torch's numerics it equals diffusers'
    ``apply_rotary_emb(cat([norm_added(context), norm(x)], 1), (cos, sin), sequence_dim=1)``)."""
    dtype = x.dtype
    parts = [rounded(F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps), dtype, numerics)]
    if context is not None:
        parts.insert(0, rounded(F.rms_norm(context.float(), (x.shape[-1],), context_weight.float(), eps),
                                dtype, numerics))
    y = torch.cat(parts, dim=1)
    real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    out = y * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    if fp8_scale is not None:
        return numerics.cast((out / fp8_scale).clamp(-FP8_MAX, FP8_MAX), FP8_DTYPE)
    return numerics.cast(out, dtype) if dtype != torch.float32 else out


def fp8_scale_bound(*weights: torch.Tensor) -> torch.Tensor:
    """A float32 scale for FP8 q or k that never clips: ``sqrt(D) * max|w| / 448`` over the RMSNorm weights
    the tensor's tokens went through (the image's and, in the double-stream blocks, the text's)."""
    head_dim = weights[0].shape[-1]
    top = torch.stack([w.detach().abs().max().float() for w in weights]).max()
    return (top * math.sqrt(head_dim) / FP8_MAX).reshape(())


def bytes_moved(x: torch.Tensor, context: torch.Tensor | None, out_dtype: torch.dtype) -> int:
    """Bytes read and written once each (for a GB/s figure): q or k, the cos/sin rows, the output."""
    B, S_total, H, D = output_shape(x, context)
    read = B * S_total * H * D * x.element_size() + 2 * S_total * D * 4
    return read + B * S_total * H * D * torch.empty((), dtype=out_dtype).element_size()
