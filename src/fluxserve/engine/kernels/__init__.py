"""Fused Triton kernels for the FLUX.2 blocks, one module per kernel (the kernel, its launcher, a torch reference
that computes the same function), registered as torch custom ops in ``ops`` (``torch.ops.fluxserve.*``):

* ``swiglu_quant``: SwiGLU + concat with the attention output + per-row FP8 quantisation (out-projections);
* ``norm_quant``: LayerNorm + modulation + per-row FP8 quantisation (in-projections);
* ``qk_rope``: per-head RMSNorm of q/k + RoPE, text and image tokens in one output, optionally FP8.

``runtime`` says where the kernels run (CUDA, or the CPU under ``TRITON_INTERPRET=1``); ``bench`` measures them.
"""
