"""fluxserve's own forwards for FLUX.2's two transformer block classes (``regular`` and ``high``).

``install(transformer, options)`` gives every ``Flux2TransformerBlock`` and ``Flux2SingleTransformerBlock`` an
instance ``forward`` that computes the same function as diffusers' (``use_stock`` removes it again: level
``none`` runs diffusers' own code). What differs is how:

* q and k are normalised and rotated by one fused op (``fluxserve::rms_norm_rope``) reading them where the
  projection wrote them (lossless: the same roundings as the stock operations);
* attention goes through ``attention.attend`` with the backend the acceleration state chose;
* where a Linear runs FP8 matmuls with row-wise scales (``FP8Linear`` in mode ``w8a8``), its input is quantised
  by the fused op that computes it (``fluxserve::norm_quant`` after LayerNorm + modulation,
  ``fluxserve::swiglu_quant`` for SwiGLU + concat), and the product runs on that (``forward_quantized``): the
  FP8 values and scales ``FP8Linear.forward`` computes (float32 rounding order in LayerNorm's sums and in
  ``exp`` aside), without the bf16 tensor written and read back;
* the single blocks' fused in-projection can run as two GEMMs on views of its weight rows (QKV rows, MLP rows)
  where ``split.py`` measured that faster.

The stock forward runs instead wherever this one cannot apply: with gradients on (training), with diffusers'
KV-cache processors or context parallelism, attention kwargs, a double block with unfused QKV (LoRA adapters),
or no rotary tables.
With ``options.kernels`` off, every step is the stock torch operation (the fused ops are not called).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fluxserve.engine import attention
from fluxserve.engine.fp8 import FP8Linear, quantize_tensor
from fluxserve.engine.kernels import ops

SINGLE = "Flux2SingleTransformerBlock"
DOUBLE = "Flux2TransformerBlock"


@dataclass(frozen=True)
class BlockOptions:
    """How the fluxserve forwards run: the attention backend (a name ``attention.attend`` knows: diffusers' or
    fluxserve's), the fused kernels on or off, the single blocks' in-projection split in two or fused."""

    attention: str = "native"
    kernels: bool = False
    split: bool = False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Attention over (batch, seq, heads, head_dim) tensors, returning the same layout (maybe a strided view)."""
    return attention.attend(q, k, v, backend)


# ---- installing -------------------------------------------------------------------------------------
def _blocks(transformer: nn.Module) -> list[nn.Module]:
    return [m for m in transformer.modules() if type(m).__name__ in (SINGLE, DOUBLE)]


def install(transformer: nn.Module, options: BlockOptions) -> int:
    """Give the blocks fluxserve's forwards with ``options`` (idempotent); returns the number of blocks. A block
    whose forward something else replaced (diffusers' hooks) is left alone."""
    count = 0
    for block in _blocks(transformer):
        if "forward" in block.__dict__ and not _is_ours(block):
            continue
        if not _is_ours(block):
            function = _single_forward if type(block).__name__ == SINGLE else _double_forward
            block.forward = types.MethodType(function, block)
        if block.__dict__.get("_fluxserve_options") != options:
            block._fluxserve_options = options
        count += 1
    return count


def use_stock(transformer: nn.Module) -> None:
    """Put diffusers' own forwards back (level ``none``)."""
    for block in _blocks(transformer):
        if _is_ours(block):
            del block.forward


def installed(transformer: nn.Module) -> bool:
    return any(_is_ours(b) for b in _blocks(transformer))


def _is_ours(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ in (_single_forward, _double_forward)


# ---- projections ------------------------------------------------------------------------------------
class Quantised(NamedTuple):
    """A Linear's input quantised per row: q (tokens, in) float8_e4m3fn, scale (tokens, 1) float32, the
    leading shape and dtype of the activation it stands for."""

    q: torch.Tensor
    scale: torch.Tensor
    lead_shape: tuple
    dtype: torch.dtype


def takes_quantised(layer: nn.Module) -> bool:
    """True for a Linear whose FP8 matmul takes a row-quantised input (``FP8Linear``, mode w8a8, row scales)."""
    return isinstance(layer, FP8Linear) and layer.mode == "w8a8" and layer.granularity == "row"


def splittable(layer: nn.Module) -> bool:
    """True where a projection can run on views of its weight rows: a plain Linear or a row-wise w8a8 FP8Linear."""
    return type(layer) is nn.Linear or takes_quantised(layer)


def project(layer: nn.Module, x: torch.Tensor | Quantised, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``layer(x)`` (only output features ``rows`` when given, on views of the weight rows); ``x`` quantised
    already goes straight to the FP8 matmul."""
    if isinstance(x, Quantised):
        return layer.forward_quantized(x.q, x.scale, x.lead_shape, x.dtype, rows)
    if rows is None:
        return layer(x)
    if takes_quantised(layer):
        return project(layer, quantise(x), rows)
    start, stop = rows
    return F.linear(x, layer.weight[start:stop], None if layer.bias is None else layer.bias[start:stop])


def quantise(x: torch.Tensor) -> Quantised:
    """``x`` quantised per row as ``FP8Linear`` does it (for a split projection without the fused kernels)."""
    q, scale = quantize_tensor(x.reshape(-1, x.shape[-1]), "row")
    return Quantised(q, scale, tuple(x.shape[:-1]), x.dtype)


def _norm_input(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, layer: nn.Module,
                kernels: bool) -> torch.Tensor | Quantised:
    """``(1 + scale) * norm(x) + shift``, quantised by the fused op when ``layer`` takes a quantised input."""
    if kernels and takes_quantised(layer):
        q, row_scale = ops.norm_quant_rows(x, shift, scale, norm.eps)
        return Quantised(q, row_scale, tuple(x.shape[:-1]), x.dtype)
    return (1 + scale) * norm(x) + shift


def _rope(x: torch.Tensor, norm: nn.Module, rotary: tuple[torch.Tensor, torch.Tensor], kernels: bool,
          context: torch.Tensor | None = None, context_norm: nn.Module | None = None) -> torch.Tensor:
    """RoPE(RMSNorm(cat([context, x], seq))) as diffusers computes it, by the fused op when kernels are on."""
    cos, sin = rotary
    if kernels:
        return ops.rms_norm_rope(x, norm.weight, cos, sin, _eps(norm, x), context,
                                 None if context_norm is None else context_norm.weight)
    from diffusers.models.embeddings import apply_rotary_emb

    y = norm(x) if context is None else torch.cat([context_norm(context), norm(x)], dim=1)
    return apply_rotary_emb(y, rotary, sequence_dim=1)


def _eps(norm: nn.Module, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


def _out_input(attn_out: torch.Tensor | None, mlp: torch.Tensor | None, layer: nn.Module, act: nn.Module | None,
               kernels: bool) -> torch.Tensor | Quantised:
    """The input of an output projection: ``cat([attn_out.flatten(2), act(mlp)])`` (either part optional),
    quantised by the fused op when ``layer`` takes a quantised input."""
    ref = attn_out if attn_out is not None else mlp
    if kernels and takes_quantised(layer):
        q, scale = ops.swiglu_quant_rows(attn_out, mlp)
        return Quantised(q, scale, tuple(ref.shape[:2]), ref.dtype)
    parts = []
    if attn_out is not None:
        parts.append(attn_out.flatten(2, 3))
    if mlp is not None:
        parts.append(act(mlp))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


# ---- applicability ----------------------------------------------------------------------------------
# diffusers' stock processors and fluxserve's (engine/attention.py), which compute the same with another kernel
SINGLE_PROCESSORS = ("Flux2ParallelSelfAttnProcessor", "SingleStreamAttention")
DOUBLE_PROCESSORS = ("Flux2AttnProcessor", "DoubleStreamAttention")


def _plain_processor(attn: nn.Module, names: tuple[str, ...]) -> bool:
    processor = getattr(attn, "processor", None)
    return type(processor).__name__ in names and getattr(processor, "_parallel_config", None) is None


def _has_weights(*norms: nn.Module) -> bool:
    return all(getattr(norm, "weight", None) is not None for norm in norms)


def _applies(rotary: Any, kwargs: dict | None) -> bool:
    return (not torch.is_grad_enabled() and not kwargs and isinstance(rotary, (tuple, list))
            and len(rotary) == 2)


def single_applies(block: nn.Module, rotary: Any, kwargs: dict | None) -> bool:
    attn = block.attn
    return (_applies(rotary, kwargs) and _plain_processor(attn, SINGLE_PROCESSORS)
            and _has_weights(attn.norm_q, attn.norm_k))


def double_applies(block: nn.Module, rotary: Any, kwargs: dict | None) -> bool:
    attn = block.attn
    return (_applies(rotary, kwargs) and _plain_processor(attn, DOUBLE_PROCESSORS)
            and getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv")
            and _has_weights(attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k))


# ---- the forwards -----------------------------------------------------------------------------------
def _single_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    temb_mod: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    split_hidden_states: bool = False,
    text_seq_len: int | None = None,
):
    """``Flux2SingleTransformerBlock.forward``, computed as the module docstring says."""
    if not single_applies(self, image_rotary_emb, joint_attention_kwargs):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb,
                                  joint_attention_kwargs, split_hidden_states, text_seq_len)
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    options: BlockOptions = self._fluxserve_options
    kernels = options.kernels
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = Flux2Modulation.split(temb_mod, 1)[0]
    attn = self.attn
    proj_in = attn.to_qkv_mlp_proj
    x = _norm_input(self.norm, hidden_states, shift, scale, proj_in, kernels)

    inner = attn.inner_dim
    qkv_width = 3 * inner
    if options.split and splittable(proj_in):
        if isinstance(x, torch.Tensor) and takes_quantised(proj_in):
            x = quantise(x)  # one quantisation for both halves
        qkv = project(proj_in, x, (0, qkv_width))
        mlp = project(proj_in, x, (qkv_width, proj_in.out_features))
    else:
        projected = project(proj_in, x)
        qkv, mlp = projected[..., :qkv_width], projected[..., qkv_width:]
    head_dim = attn.head_dim
    query = qkv[..., :inner].unflatten(-1, (-1, head_dim))
    key = qkv[..., inner : 2 * inner].unflatten(-1, (-1, head_dim))
    value = qkv[..., 2 * inner :].unflatten(-1, (-1, head_dim))
    query = _rope(query, attn.norm_q, image_rotary_emb, kernels)
    key = _rope(key, attn.norm_k, image_rotary_emb, kernels)
    attended = attend(query, key, value, options.attention).to(query.dtype)

    out = project(attn.to_out, _out_input(attended, mlp, attn.to_out, attn.mlp_act_fn, kernels))
    hidden_states = hidden_states + gate * out
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    if split_hidden_states:
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return hidden_states


def _double_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb_mod_img: torch.Tensor,
    temb_mod_txt: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
):
    """``Flux2TransformerBlock.forward``, computed as the module docstring says."""
    if not double_applies(self, image_rotary_emb, joint_attention_kwargs):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                                  image_rotary_emb, joint_attention_kwargs)
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    options: BlockOptions = self._fluxserve_options
    kernels = options.kernels
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(temb_mod_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = Flux2Modulation.split(
        temb_mod_txt, 2
    )
    attn = self.attn
    head_dim = attn.head_dim
    x = _norm_input(self.norm1, hidden_states, shift_msa, scale_msa, attn.to_qkv, kernels)
    c = _norm_input(self.norm1_context, encoder_hidden_states, c_shift_msa, c_scale_msa, attn.to_added_qkv,
                    kernels)
    query, key, value = (t.unflatten(-1, (-1, head_dim)) for t in project(attn.to_qkv, x).chunk(3, dim=-1))
    c_query, c_key, c_value = (
        t.unflatten(-1, (-1, head_dim)) for t in project(attn.to_added_qkv, c).chunk(3, dim=-1)
    )
    query = _rope(query, attn.norm_q, image_rotary_emb, kernels, c_query, attn.norm_added_q)
    key = _rope(key, attn.norm_k, image_rotary_emb, kernels, c_key, attn.norm_added_k)
    value = torch.cat([c_value, value], dim=1)
    attended = attend(query, key, value, options.attention).to(query.dtype)

    text_len = encoder_hidden_states.shape[1]
    context_attended, attended = attended[:, :text_len], attended[:, text_len:]
    attn_output = attn.to_out[1](project(attn.to_out[0], _out_input(attended, None, attn.to_out[0], None, kernels)))
    context_attn_output = project(attn.to_add_out, _out_input(context_attended, None, attn.to_add_out, None, kernels))

    hidden_states = hidden_states + gate_msa * attn_output
    hidden_states = hidden_states + gate_mlp * _feed_forward(
        self.ff, _norm_input(self.norm2, hidden_states, shift_mlp, scale_mlp, self.ff.linear_in, kernels), kernels)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_output
    c_ff_input = _norm_input(self.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                             self.ff_context.linear_in, kernels)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp * _feed_forward(self.ff_context, c_ff_input, kernels)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _feed_forward(ff: nn.Module, x: torch.Tensor | Quantised, kernels: bool) -> torch.Tensor:
    """``Flux2FeedForward`` on ``x``: linear_in, SwiGLU, linear_out (SwiGLU + quantisation fused for FP8)."""
    hidden = project(ff.linear_in, x)
    return project(ff.linear_out, _out_input(None, hidden, ff.linear_out, ff.act_fn, kernels))
