"""The fused kernels' torch side, in this process (no interpreter): the references are the stock computation bit
for bit, the custom ops trace without graph breaks, and the fake implementations give the real shapes.
The Triton kernels themselves are tested under the interpreter in test_kernels_interpreted.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import assert_same_rows, bits

from fluxserve.engine import fp8
from fluxserve.engine.kernels import norm_quant, ops, qk_rope, runtime, swiglu_quant

DTYPES = (torch.bfloat16, torch.float32)


def _rotary(tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2's own RoPE tables (Flux2PosEmbed) for ``tokens`` positions."""
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 7, torch.arange(tokens) % 7,
                       torch.arange(tokens) % 3], dim=-1)
    return Flux2PosEmbed(theta=2000, axes_dim=[head_dim // 4] * 4)(ids)


def _single_block_views(dtype, batch=2, tokens=13, heads=3, head_dim=16, mlp=40, seed=0):
    """What a single block's processor holds: the fused projection output and the attention output, as views."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * head_dim
    proj = (torch.randn(batch, tokens, 3 * inner + 2 * mlp, generator=g) * 3).to(dtype)
    attn = torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype).transpose(1, 2)  # non-contiguous
    return proj, attn, proj[..., 3 * inner:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", ["both", "attention", "mlp"])
def test_swiglu_quant_reference_is_the_stock_computation(dtype, parts):
    _, attn, mlp = _single_block_views(dtype)
    attn = attn if parts != "mlp" else None
    mlp = mlp if parts != "attention" else None
    stock = []
    if attn is not None:
        stock.append(attn.flatten(2, 3))
    if mlp is not None:
        gate, up = mlp.chunk(2, dim=-1)
        stock.append(F.silu(gate) * up)
    want = fp8.quantize_tensor(torch.cat(stock, dim=-1).reshape(-1, sum(t.shape[-1] for t in stock)), "row")
    assert_same_rows(swiglu_quant.reference(attn, mlp), want)
    assert_same_rows(ops.swiglu_quant_rows(attn, mlp), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_norm_quant_reference_is_the_stock_computation(dtype, per_token):
    g = torch.Generator().manual_seed(1)
    batch, tokens, width = 2, 11, 48
    wide = (torch.randn(batch, tokens, width + 8, generator=g) * 2 + 0.3).to(dtype)
    x = wide[..., 4 : 4 + width]  # a non-contiguous view
    mod_tokens = tokens if per_token else 1
    temb = torch.randn(batch, mod_tokens, 3 * width, generator=g).to(dtype)
    shift, scale, _ = temb.chunk(3, dim=-1)
    stock = (1 + scale) * F.layer_norm(x, (width,), eps=1e-6) + shift
    want = fp8.quantize_tensor(stock.reshape(-1, width), "row")
    assert_same_rows(norm_quant.reference(x, shift, scale, 1e-6), want)
    assert_same_rows(ops.norm_quant_rows(x, shift, scale, 1e-6), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_context", [False, True])
def test_rms_norm_rope_reference_is_diffusers(dtype, with_context):
    from diffusers.models.embeddings import apply_rotary_emb

    heads, head_dim, text = 3, 16, 4
    proj, _, _ = _single_block_views(dtype, heads=heads, head_dim=head_dim)
    context_proj, _, _ = _single_block_views(dtype, tokens=text, heads=heads, head_dim=head_dim, seed=5)
    inner = heads * head_dim
    q = proj[..., :inner].unflatten(-1, (-1, head_dim))
    c_q = context_proj[..., inner : 2 * inner].unflatten(-1, (-1, head_dim))
    norm, c_norm = (torch.nn.RMSNorm(head_dim, eps=1e-6).to(dtype) for _ in range(2))
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, head_dim))
        c_norm.weight.copy_(torch.linspace(1.2, 0.7, head_dim))
    total = q.shape[1] + (text if with_context else 0)
    cos, sin = _rotary(total, head_dim)
    with torch.no_grad():
        normed = norm(q) if not with_context else torch.cat([c_norm(c_q), norm(q)], dim=1)
        want = apply_rotary_emb(normed, (cos, sin), sequence_dim=1)
    context = (c_q, c_norm.weight) if with_context else (None, None)
    got = ops.rms_norm_rope(q, norm.weight, cos, sin, 1e-6, *context)
    assert got.is_contiguous() and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def test_fp8_qk_scale_bound_never_clips():
    """The fixed FP8 scale for q/k: sqrt(D) * max|w| bounds every RMSNorm'd and rotated value."""
    heads, head_dim, tokens = 4, 32, 40
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, tokens, heads, head_dim, generator=g)
    x[:, :, 0, 0] = 1e3  # one dominant element per head: the normalised value approaches sqrt(D)
    weight = torch.rand(head_dim, generator=g) + 0.5
    cos, sin = _rotary(tokens, head_dim)
    scale = qk_rope.fp8_scale_bound(weight)
    assert math.isclose(float(scale), math.sqrt(head_dim) * float(weight.max()) / fp8.FP8_MAX, rel_tol=1e-6)
    exact = qk_rope.reference(x, weight, cos, sin, 1e-6)
    assert float(exact.abs().max() / scale) <= fp8.FP8_MAX
    assert float(exact.abs().max() / scale) > fp8.FP8_MAX / 4  # the bound is reached within a small factor
    q8 = ops.rms_norm_rope(x, weight, cos, sin, 1e-6, fp8_scale=scale)
    assert q8.dtype == torch.float8_e4m3fn
    assert fp8.dequantize_tensor(q8, scale, torch.float32).sub(exact).abs().max() <= float(exact.abs().max()) / 8


def test_the_ops_trace_with_no_graph_break_and_fake_shapes():
    proj, attn, mlp = _single_block_views(torch.bfloat16)
    heads, head_dim = attn.shape[2], attn.shape[3]
    inner = heads * head_dim
    x = torch.randn(2, proj.shape[1], inner, dtype=torch.bfloat16)
    temb = torch.randn(2, 1, 3 * inner, dtype=torch.bfloat16)
    weight = torch.ones(head_dim, dtype=torch.bfloat16)
    cos, sin = _rotary(proj.shape[1], head_dim)

    def block_like(proj, attn, x, temb):
        shift, scale, _ = temb.chunk(3, dim=-1)
        q, row_scale = ops.norm_quant_rows(x, shift, scale, 1e-6)
        rotated = ops.rms_norm_rope(proj[..., :inner].unflatten(-1, (-1, head_dim)), weight, cos, sin, 1e-6)
        out_q, out_scale = ops.swiglu_quant_rows(attn, proj[..., 3 * inner:])
        return q.float() * row_scale, rotated, out_q.float() * out_scale

    explained = torch._dynamo.explain(block_like)(proj, attn, x, temb)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert {"fluxserve.norm_quant.default", "fluxserve.rms_norm_rope.default",
            "fluxserve.swiglu_quant.default"} <= targets
    compiled = torch.compile(block_like, fullgraph=True, backend="aot_eager", dynamic=True)
    for got, want in zip(compiled(proj, attn, x, temb), block_like(proj, attn, x, temb)):
        assert torch.equal(got, want)
    torch.library.opcheck(ops.swiglu_quant_op, (attn, mlp))
    torch.library.opcheck(ops.norm_quant_op, (x, temb[..., :inner], temb[..., inner : 2 * inner], 1e-6))
    torch.library.opcheck(ops.rms_norm_rope_op, (proj[..., :inner].unflatten(-1, (-1, head_dim)), weight, cos, sin,
                                                 1e-6))


def test_this_process_runs_the_torch_references_on_the_cpu():
    assert not runtime.INTERPRETED
    assert not runtime.triton_runs_on(torch.device("cpu"))
    assert runtime.unavailable_reason(torch.device("cpu")).startswith(("not CUDA", "Triton not importable"))
