"""SwiGLU + concat + per-row FP8 quantisation: the input of an FP8 output projection in one pass.

The single-stream blocks feed their output projection ``torch.cat([attn, silu(gate) * up], -1)`` where ``attn``
is the attention output (B, S, H, D) and ``gate``/``up`` are the two halves of the MLP part of the fused
in-projection's output; the double-stream blocks feed ``to_out``/``to_add_out`` the attention output alone and
``ff.linear_out`` the SwiGLU alone. The kernel reads those views where they are (any strides), computes the
row, and writes what ``fp8.quantize_tensor(row, "row")`` writes: ``q`` (float8_e4m3fn, rows x width) and the
float32 row scale ``max(amax / 448, 1e-12)`` (rows x 1). The concatenated bf16 row never exists in memory.

Rounding: like the stock operations, ``silu(gate)`` and the product are rounded to the activation dtype
before the row's amax is taken (eager PyTorch writes both as bf16 tensors).
"""

from __future__ import annotations

import torch

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
def _swiglu_quant_kernel(
    a_ptr, a_sb, a_ss, a_sh, a_sd,
    m_ptr, m_sb, m_ss, m_sc,
    q_ptr, scale_ptr,
    S, H, D, M,
    HAS_A: tl.constexpr, HAS_M: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    width = H * D + M
    a_row = a_ptr + b * a_sb + s * a_ss
    m_row = m_ptr + b * m_sb + s * m_ss
    q_row = q_ptr + row * width
    lanes = tl.arange(0, BLOCK)
    top = tl.zeros([BLOCK], dtype=tl.float32)
    # pass 1: the row's amax
    if HAS_A:
        for start in range(0, H * D, BLOCK):
            c = start + lanes
            mask = c < H * D
            v = tl.load(a_row + (c // D) * a_sh + (c % D) * a_sd, mask=mask, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.abs(v))
    if HAS_M:
        for start in range(0, M, BLOCK):
            c = start + lanes
            mask = c < M
            g = tl.load(m_row + c * m_sc, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(m_row + (c + M) * m_sc, mask=mask, other=0.0).to(tl.float32)
            act = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(m_ptr.dtype.element_ty).to(tl.float32)
            v = (act * u).to(m_ptr.dtype.element_ty).to(tl.float32)
            top = tl.maximum(top, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(top, axis=0), 448.0), 1e-12)
    tl.store(scale_ptr + row, scale)
    # pass 2: the same values again (from L2), quantised
    if HAS_A:
        for start in range(0, H * D, BLOCK):
            c = start + lanes
            mask = c < H * D
            v = tl.load(a_row + (c // D) * a_sh + (c % D) * a_sd, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
            tl.store(q_row + c, q.to(q_ptr.dtype.element_ty), mask=mask)
    if HAS_M:
        for start in range(0, M, BLOCK):
            c = start + lanes
            mask = c < M
            g = tl.load(m_row + c * m_sc, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(m_row + (c + M) * m_sc, mask=mask, other=0.0).to(tl.float32)
            act = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(m_ptr.dtype.element_ty).to(tl.float32)
            v = (act * u).to(m_ptr.dtype.element_ty).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
            tl.store(q_row + H * D + c, q.to(q_ptr.dtype.element_ty), mask=mask)


def _heads(attn: torch.Tensor) -> torch.Tensor:
    """The attention part as (B, S, H, D) (a (B, S, C) tensor is one head of C)."""
    return attn if attn.dim() == 4 else attn.unsqueeze(2)


def output_shape(attn: torch.Tensor | None, mlp: torch.Tensor | None) -> tuple[int, int]:
    """(rows, width) of the quantised row block."""
    ref = attn if attn is not None else mlp
    if ref is None:
        raise ValueError("swiglu_quant needs an attention part, an MLP part or both")
    rows = ref.shape[0] * ref.shape[1]
    width = (0 if attn is None else _heads(attn).shape[2] * _heads(attn).shape[3])
    return rows, width + (0 if mlp is None else mlp.shape[-1] // 2)


def launch(attn: torch.Tensor | None, mlp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel: ``(q, scale)`` for ``concat([attn, silu(gate) * up])`` (either part optional)."""
    rows, width = output_shape(attn, mlp)
    ref = attn if attn is not None else mlp
    q = torch.empty((rows, width), dtype=FP8_DTYPE, device=ref.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=ref.device)
    if rows == 0:
        return q, scale
    a = _heads(attn) if attn is not None else ref.new_empty((1, 1, 1, 1))
    m = mlp if mlp is not None else ref.new_empty((1, 1, 2))
    H, D = (a.shape[2], a.shape[3]) if attn is not None else (0, 1)
    M = m.shape[-1] // 2 if mlp is not None else 0
    block = min(2048, next_power_of_2(max(H * D, M, 16)))
    _swiglu_quant_kernel[(rows,)](
        a, *a.stride(), m, *m.stride(), q, scale, ref.shape[1], H, D, M,
        HAS_A=attn is not None, HAS_M=mlp is not None, BLOCK=block, num_warps=8 if block >= 1024 else 4,
    )
    return q, scale


def reference(attn: torch.Tensor | None, mlp: torch.Tensor | None,
              numerics: Numerics = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in torch (the CPU path; with torch's numerics it equals
    ``quantize_tensor(cat([attn, F.silu(gate) * up]))``, rounding as eager PyTorch does)."""
    rows, _ = output_shape(attn, mlp)
    parts = []
    if attn is not None:
        parts.append(attn.reshape(rows, -1).float())
    if mlp is not None:
        gate, up = mlp.reshape(rows, -1).float().chunk(2, dim=-1)
        act = rounded(gate / (1.0 + numerics.exp(-gate)), mlp.dtype, numerics)
        parts.append(rounded(act * up, mlp.dtype, numerics))
    return quantize_rows(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], numerics)


def bytes_moved(attn: torch.Tensor | None, mlp: torch.Tensor | None) -> int:
    """Bytes read and written once each (for a GB/s figure)."""
    rows, width = output_shape(attn, mlp)
    read = sum(t.numel() * t.element_size() for t in (attn, mlp) if t is not None)
    return read + rows * width + rows * 4
