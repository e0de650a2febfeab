"""LayerNorm (no affine) + modulation + per-row FP8 quantisation: the input of an FP8 in-projection in one pass.

Before each FP8 in-projection (the single-stream blocks' fused QKV + MLP projection, the double-stream blocks'
fused QKV, added QKV and feed-forward ``linear_in``) the blocks compute ``(1 + scale) * layer_norm(x) + shift``
with ``shift``/``scale`` one vector per batch (or per token); ``FP8Linear`` then quantises that per row. The
kernel keeps each row in registers: it reads ``x`` once and writes ``q`` (float8_e4m3fn) and the float32 row
scale ``max(amax / 448, 1e-12)``, what ``fp8.quantize_tensor(modulated, "row")`` writes.

Rounding: like the stock operations, the normalised row, ``1 + scale``, the product and the sum are each
rounded to the activation dtype (eager PyTorch writes each as a bf16 tensor); the mean and variance are
float32 sums, whose order may differ from PyTorch's (an occasional last-bit difference of a bf16 value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluxserve.engine.kernels.runtime import (
    FP8_DTYPE,
    TORCH,
    Numerics,
    jit,
    next_power_of_2,
    quantize_rows,
    rounded,
    tl,
)


@jit
def _norm_quant_kernel(
    x_ptr, x_sb, x_ss, x_sc,
    shift_ptr, shift_sb, shift_ss, shift_sc,
    scale_ptr, scale_sb, scale_ss, scale_sc,
    q_ptr, row_scale_ptr,
    S, C, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    c = tl.arange(0, BLOCK)
    mask = c < C
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + b * x_sb + s * x_ss + c * x_sc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / C
    normed = (centred * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    shift = tl.load(shift_ptr + b * shift_sb + s * shift_ss + c * shift_sc, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * scale_sb + s * scale_ss + c * scale_sc, mask=mask, other=0.0).to(tl.float32)
    gain = (1.0 + scale).to(dtype).to(tl.float32)
    y = ((gain * normed).to(dtype).to(tl.float32) + shift).to(dtype).to(tl.float32)
    y = tl.where(mask, y, 0.0)
    row_scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=0), 448.0), 1e-12)
    tl.store(row_scale_ptr + row, row_scale)
    q = tl.minimum(tl.maximum(tl.math.div_rn(y, row_scale), -448.0), 448.0)
    tl.store(q_ptr + row * C + c, q.to(q_ptr.dtype.element_ty), mask=mask)


def _expanded(mod: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A modulation vector (B or 1, 1 or S, C) as a (B, S, C) view (stride 0 where it is broadcast)."""
    return mod.expand(x.shape)


def launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel on ``x`` (B, S, C): ``(q, row_scale)`` of ``(1 + scale) * layer_norm(x) + shift``."""
    B, S, C = x.shape
    q = torch.empty((B * S, C), dtype=FP8_DTYPE, device=x.device)
    row_scale = torch.empty((B * S, 1), dtype=torch.float32, device=x.device)
    if B * S == 0:
        return q, row_scale
    shift, scale = _expanded(shift, x), _expanded(scale, x)
    block = next_power_of_2(max(C, 16))
    _norm_quant_kernel[(B * S,)](
        x, *x.stride(), shift, *shift.stride(), scale, *scale.stride(), q, row_scale, S, C, float(eps),
        BLOCK=block, num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4,
    )
    return q, row_scale


def modulated(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
              numerics: Numerics = TORCH) -> torch.Tensor:
    """``(1 + scale) * layer_norm(x) + shift`` as float32 holding values of ``x.dtype``, rounded where the
    stock operations round (with torch's numerics: the stock result, upcast)."""
    dtype = x.dtype
    normed = rounded(F.layer_norm(x.float(), (x.shape[-1],), eps=eps), dtype, numerics)
    gain = rounded(1.0 + scale.float(), dtype, numerics)
    return rounded(rounded(gain * normed, dtype, numerics) + shift.float(), dtype, numerics)


def reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
              numerics: Numerics = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in torch (the CPU path)."""
    y = modulated(x, shift, scale, eps, numerics)
    return quantize_rows(y.reshape(-1, x.shape[-1]), numerics)


def bytes_moved(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> int:
    """Bytes read and written once each (for a GB/s figure): x, the modulation vectors, q and the scales."""
    rows = x.numel() // x.shape[-1]
    return (x.numel() * x.element_size() + (shift.numel() + scale.numel()) * shift.element_size()
            + x.numel() + rows * 4)
