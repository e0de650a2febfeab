"""Attention for the FLUX.2 blocks: one entry point, ``attend(query, key, value, backend)``, for every kernel
fluxserve can run, and the processors that put a backend into diffusers' FLUX.2 attention modules.

Inputs are (batch, seq, heads, head_dim) exactly as the FLUX.2 blocks pass them: in the single-stream blocks q
and k come out of RMSNorm + RoPE and v is a strided view of the fused projection's output; in the double-stream
blocks all three are text + image concatenations. The output is (batch, seq, heads, head_dim), possibly a
transposed view. Every backend traces under ``torch.compile(fullgraph=True)``: no graph breaks.

Backends:

* diffusers' names (``native``, ``_native_cudnn``, ``_flash_3``, ...) go through ``dispatch_attention_fn``.
  ``native`` is PyTorch's SDPA dispatch on transposed views; ``_native_cudnn`` copies q/k/v to contiguous first.
* ``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_math``: PyTorch SDPA on ``transpose(1, 2)`` views (no
  copies) with that kernel forced (``torch.nn.attention.sdpa_kernel``).
* ``fa3``: FlashAttention-3 through its own torch custom op (which has a fake implementation, so it compiles),
  from PyPI's forward-only ``fa3-fwd`` build (``fa3_fwd_interface``) or the official ``flash_attn_interface``;
  loaded by ``load_fa3()`` before any tracing.
* ``fa3_fp8`` (lossy): FlashAttention-3's FP8 path: q/k/v quantised here to float8_e4m3fn with one scale per
  (batch, head) (``quantize_per_head``), the kernel descales them and returns bf16.
* ``fp8_emulated`` (lossy): the same quantisation dequantised and run through fp32 SDPA; runs anywhere. It proves
  the scale math on the CPU and, on a GPU, separates the quantisation's error from the kernel's.

Which backend runs is decided by measurement (``fluxserve.engine.attention_choice``).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

SDPA_KERNELS: dict[str, SDPBackend] = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
FA3_BACKENDS = ("fa3", "fa3_fp8")
LOSSY_BACKENDS = ("fa3_fp8", "fp8_emulated")
OWN_BACKENDS = (*SDPA_KERNELS, *FA3_BACKENDS, "fp8_emulated")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
AMAX_FLOOR = 1e-12  # an all-zero head gets a tiny scale instead of a division by zero


def diffusers_backends() -> tuple[str, ...]:
    """diffusers' attention backend names. (diffusers is imported where it is used: importing its attention and
    FLUX.2 modules takes seconds, which commands that never run a model should not pay.)"""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(m.value for m in AttentionBackendName)


def known_backend(name: str) -> bool:
    return name in OWN_BACKENDS or name in diffusers_backends()


def dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' ``dispatch_attention_fn`` with a backend named as a string (looked up as a member, which every
    supported PyTorch traces, rather than through the Enum constructor)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    member = getattr(AttentionBackendName, backend.upper(), None)
    if member is None:
        raise ValueError(f"unknown attention backend {backend!r}")
    return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=member)


# ---- FlashAttention-3 -------------------------------------------------------------------------------------------
# (module to import, torch.ops namespace its custom op registers under); the first that loads is used.
FA3_MODULES = (("fa3_fwd_interface", "fa3_fwd"), ("flash_attn_interface", "flash_attn_3"))
_fa3_op: Any = None  # torch.ops.<namespace>._flash_attn_forward once loaded
_fa3_source: str | None = None  # the module it came from
_fa3_failure: str | None = None  # why no FlashAttention-3 loaded, once tried


def load_fa3() -> str | None:
    """Import a FlashAttention-3 build whose forward is a torch custom op (so it traces without graph breaks).
    Returns None when one is loaded, else why not (tried once; later calls return the same answer)."""
    global _fa3_op, _fa3_source, _fa3_failure
    if _fa3_op is not None or _fa3_failure is not None:
        return _fa3_failure
    reasons = []
    for module, namespace in FA3_MODULES:
        try:
            importlib.import_module(module)
            op = getattr(torch.ops, namespace)._flash_attn_forward
        except Exception as exc:  # noqa: BLE001 - not installed, no CUDA driver, an older build without the op
            reasons.append(f"{module}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        _fa3_op, _fa3_source = op, module
        log.info("FlashAttention-3 loaded from %s", module)
        return None
    _fa3_failure = "; ".join(reasons)
    return _fa3_failure


def fa3_source() -> str | None:
    """The module FlashAttention-3 was loaded from (after ``load_fa3``), or None."""
    return _fa3_source


def _fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor | None = None,
         k_descale: torch.Tensor | None = None, v_descale: torch.Tensor | None = None) -> torch.Tensor:
    if _fa3_op is None:
        raise RuntimeError(f"FlashAttention-3 is not loaded: {_fa3_failure or 'call load_fa3() first'}")
    out = _fa3_op(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                  softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=False)
    return out[0]


# ---- FP8 --------------------------------------------------------------------------------------------------------
def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, descale)`` for x (batch, seq, heads, dim): x8 in float8_e4m3fn with each (batch, head)'s largest |x|
    mapped to 448, and the float32 (batch, heads) factor that undoes it: x ~= x8.float() * descale[:, None, :, None]
    (the layout of FlashAttention-3's q/k/v_descale). Each element keeps e4m3's 3 mantissa bits relative to itself
    (rel. error <= 2^-4) unless it is below 2^-6 x (head amax / 448), the smallest normal value."""
    descale = x.abs().amax(dim=(1, 3)).float().clamp(min=AMAX_FLOOR) / FP8_MAX
    x8 = (x.float() / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, descale


FP8Kernel = Callable[..., torch.Tensor]  # (q8, k8, v8, q_descale, k_descale, v_descale) -> (B, S, H, D) output


def attend_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: FP8Kernel) -> torch.Tensor:
    """Attention with q/k/v quantised per (batch, head) and handed with their descale factors to ``kernel``;
    the result in q's dtype. Under ``torch.compile`` inductor fuses each quantisation into one pass."""
    (q8, q_descale), (k8, k_descale), (v8, v_descale) = (quantize_per_head(x) for x in (q, k, v))
    return kernel(q8, k8, v8, q_descale, k_descale, v_descale).to(q.dtype)


def dequantized_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                     k_descale: torch.Tensor, v_descale: torch.Tensor) -> torch.Tensor:
    """The FP8 kernel's contract in plain torch: dequantise, fp32 SDPA, bf16 out (FlashAttention-3 FP8 returns bf16)."""
    q, k, v = (x.float() * d[:, None, :, None] for x, d in ((q8, q_descale), (k8, k_descale), (v8, v_descale)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).to(torch.bfloat16)


# ---- the entry point --------------------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: SDPBackend) -> torch.Tensor:
    with sdpa_kernel(kernel):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """Full (unmasked, non-causal) attention of (batch, seq, heads, head_dim) inputs with ``backend``; the output
    has the same shape (possibly a transposed view). Raises when the backend cannot run on these inputs."""
    if backend in SDPA_KERNELS:
        return _sdpa(query, key, value, SDPA_KERNELS[backend])
    if backend == "fa3":
        return _fa3(query, key, value)
    if backend == "fa3_fp8":
        return attend_fp8(query, key, value, _fa3)
    if backend == "fp8_emulated":
        return attend_fp8(query, key, value, dequantized_sdpa)
    return dispatch(query, key, value, backend)


def _attend_masked(query, key, value, mask: torch.Tensor | None, backend: str) -> torch.Tensor:
    if mask is None:
        return attend(query, key, value, backend)
    return dispatch(query, key, value, "native", mask)


# ---- processors: our backends inside diffusers' FLUX.2 attention modules ---------------------------------------
class DoubleStreamAttention:
    """``Flux2AttnProcessor``'s computation (projections, QK norms, text + image concatenation, RoPE, output
    projections), with the attention itself by ``attend(..., backend)``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str) -> None:
        from diffusers.models.transformers import transformer_flux2

        self.backend = backend
        self._flux2 = transformer_flux2

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        query, key, value, encoder_query, encoder_key, encoder_value = self._flux2._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = self._flux2.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = self._flux2.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = _attend_masked(query, key, value, attention_mask, self.backend)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text, hidden_states.shape[1] - text], dim=1)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SingleStreamAttention:
    """``Flux2ParallelSelfAttnProcessor``'s computation (the fused QKV + MLP projection, QK norms, RoPE, the
    parallel MLP and the fused output projection), with the attention itself by ``attend(..., backend)``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str) -> None:
        from diffusers.models.transformers import transformer_flux2

        self.backend = backend
        self._flux2 = transformer_flux2

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = self._flux2.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = self._flux2.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = _attend_masked(query, key, value, attention_mask, self.backend)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = torch.cat([hidden_states, attn.mlp_act_fn(mlp_hidden_states)], dim=-1)
        return attn.to_out(hidden_states)


# the stock processor (by name, in diffusers' FLUX.2 module) -> ours
PROCESSORS: dict[str, type] = {
    "Flux2AttnProcessor": DoubleStreamAttention,
    "Flux2ParallelSelfAttnProcessor": SingleStreamAttention,
}
FLUX2_MODULE = "diffusers.models.transformers.transformer_flux2"
_STOCK = "_fluxserve_stock_processor"  # attribute of a module whose stock processor was replaced


def _attention_modules(transformer: nn.Module) -> list[nn.Module]:
    return [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


def install_processors(transformer: nn.Module, backend: str) -> int:
    """Give every FLUX.2 attention module with a stock processor (or one of ours) our processor for ``backend``:
    one shared instance per processor class, so a compiled block graph serves every block. Other processors
    (diffusers' KV-cache ones) get diffusers' ``native``. Returns the number of modules now on ``backend``."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    shared: dict[type, Any] = {}
    count = 0
    for module in _attention_modules(transformer):
        stock = getattr(module, _STOCK, module.processor)
        ours = PROCESSORS.get(type(stock).__name__) if type(stock).__module__ == FLUX2_MODULE else None
        if ours is None:
            if hasattr(module.processor, "_attention_backend"):
                module.processor._attention_backend = AttentionBackendName.NATIVE
            continue
        setattr(module, _STOCK, stock)
        module.set_processor(shared.setdefault(ours, ours(backend)))
        count += 1
    return count


def restore_processors(transformer: nn.Module) -> None:
    """Put back the stock processors ``install_processors`` replaced."""
    for module in _attention_modules(transformer):
        stock = module.__dict__.pop(_STOCK, None)
        if stock is not None:
            module.set_processor(stock)


def set_attention_backend(transformer: nn.Module, backend: str) -> str:
    """Run ``transformer``'s attention with ``backend``; returns the backend set. Diffusers' names go on its stock
    processors (``set_attention_backend``); ours install ``DoubleStreamAttention`` / ``SingleStreamAttention``.
    Falls back to ``native`` (and says so in the log) when the backend cannot be set."""
    if backend in OWN_BACKENDS:
        reason = load_fa3() if backend in FA3_BACKENDS else None
        if reason is None and install_processors(transformer, backend):
            return backend
        log.warning("attention backend %s cannot be set (%s); using native", backend,
                    reason or "no FLUX.2 attention processors")
        backend = "native"
    restore_processors(transformer)
    if not hasattr(transformer, "set_attention_backend"):
        return "native"
    try:
        transformer.set_attention_backend(backend)
        return backend
    except Exception as exc:  # noqa: BLE001 - unmet requirements
        log.warning("attention backend %s could not be set (%s); using native", backend, exc)
        transformer.set_attention_backend("native")
        return "native"


def backend_of(transformer: nn.Module) -> str | None:
    """The backend our processors run, or None when the stock ones are in place."""
    for module in _attention_modules(transformer):
        if isinstance(module.processor, (DoubleStreamAttention, SingleStreamAttention)):
            return module.processor.backend
    return None
