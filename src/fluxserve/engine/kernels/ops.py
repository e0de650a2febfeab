"""The fused kernels as torch custom ops (``torch.ops.fluxserve.*``), so ``torch.compile`` and CUDA graphs treat
each as one opaque call (no graph break) and the fake implementations give the output shapes to the tracer.

Each op runs its Triton kernel where Triton runs for the tensors' device (CUDA; the CPU under
``TRITON_INTERPRET=1``), else the kernel module's torch reference, which computes the same function with
PyTorch's own rounding (also after a kernel failed to compile or launch here: ``runtime.record_failure``). None of
them has a backward: the blocks call them only with gradients off.
"""


import torch

from fluxserve.engine.fp8 import FP8_DTYPE
from fluxserve.engine.kernels import norm_quant, qk_rope, runtime, swiglu_quant

Tensor = torch.Tensor


@torch.library.custom_op("fluxserve::swiglu_quant", mutates_args=())
def swiglu_quant_op(attn: Tensor | None, mlp: Tensor | None) -> tuple[Tensor, Tensor]:
    """(q, row_scale) of ``cat([attn.flatten(2), silu(gate) * up], -1)`` per row, ``gate, up = mlp.chunk(2)``;
    ``attn`` is (B, S, H, D) or (B, S, C), ``mlp`` (B, S, 2M), either may be None; any strides."""
    device = (attn if attn is not None else mlp).device
    if runtime.triton_runs_on(device):
        try:
            return swiglu_quant.launch(attn, mlp)
        except Exception as exc:  # noqa: BLE001 - see runtime.record_failure
            runtime.record_failure(exc)
    return swiglu_quant.reference(attn, mlp)


@swiglu_quant_op.register_fake
def _(attn: Tensor | None, mlp: Tensor | None) -> tuple[Tensor, Tensor]:
    ref = attn if attn is not None else mlp
    rows, width = swiglu_quant.output_shape(attn, mlp)
    return ref.new_empty((rows, width), dtype=FP8_DTYPE), ref.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("fluxserve::norm_quant", mutates_args=())
def norm_quant_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(q, row_scale) of ``(1 + scale) * layer_norm(x, eps) + shift`` for ``x`` (B, S, C); ``shift`` and
    ``scale`` broadcast to it ((B, 1, C) per batch or (B, S, C) per token)."""
    if runtime.triton_runs_on(x.device):
        try:
            return norm_quant.launch(x, shift, scale, eps)
        except Exception as exc:  # noqa: BLE001 - see runtime.record_failure
            runtime.record_failure(exc)
    return norm_quant.reference(x, shift, scale, eps)


@norm_quant_op.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    rows = x.shape[0] * x.shape[1]
    return x.new_empty((rows, x.shape[2]), dtype=FP8_DTYPE), x.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("fluxserve::rms_norm_rope", mutates_args=())
def rms_norm_rope_op(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float,
                     context: Tensor | None = None, context_weight: Tensor | None = None,
                     fp8_scale: Tensor | None = None) -> Tensor:
    """``apply_rotary_emb(cat([rms_norm(context), rms_norm(x)], 1), (cos, sin))`` for (B, S, H, D) views,
    contiguous; float8_e4m3fn divided by ``fp8_scale`` when it is given."""
    if runtime.triton_runs_on(x.device):
        try:
            return qk_rope.launch(x, weight, cos, sin, eps, context, context_weight, fp8_scale)
        except Exception as exc:  # noqa: BLE001 - see runtime.record_failure
            runtime.record_failure(exc)
    return qk_rope.reference(x, weight, cos, sin, eps, context, context_weight, fp8_scale).contiguous()


@rms_norm_rope_op.register_fake
def _(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float, context: Tensor | None = None,
      context_weight: Tensor | None = None, fp8_scale: Tensor | None = None) -> Tensor:
    dtype = FP8_DTYPE if fp8_scale is not None else x.dtype
    return x.new_empty(qk_rope.output_shape(x, context), dtype=dtype)


def swiglu_quant_rows(attn: Tensor | None, mlp: Tensor | None) -> tuple[Tensor, Tensor]:
    return swiglu_quant_op(attn, mlp)


def norm_quant_rows(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return norm_quant_op(x, shift, scale, float(eps))


def rms_norm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float,
                  context: Tensor | None = None, context_weight: Tensor | None = None,
                  fp8_scale: Tensor | None = None) -> Tensor:
    return rms_norm_rope_op(x, weight, cos, sin, float(eps), context, context_weight, fp8_scale)
