"""Shared by the fused-kernel tests: tiny FLUX.2 transformers, their inputs, the inputs one block receives, a
counter of the fluxserve ops a forward calls, and comparisons of quantised rows."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def tiny_transformer(dtype: torch.dtype = torch.float32, seed: int = 0, heads: int = 2, head_dim: int = 16):
    """Two double and two single blocks of hidden ``heads * head_dim`` (real FLUX.2 module classes)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(head_dim // 4,) * 4,
    ).eval()
    return model.to(dtype)


def model_inputs(seed: int, dtype: torch.dtype = torch.float32, batch: int = 2, side: int = 6, text: int = 5) -> dict:
    """A batch for ``tiny_transformer``: ``side``^2 image tokens and ``text`` text tokens (odd counts)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    return {
        "hidden_states": torch.randn(batch, side * side, 16, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g).to(dtype),
        "timestep": torch.rand(batch, generator=g).to(dtype),
        "guidance": torch.full((batch,), 2.5).to(dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "return_dict": False,
    }


def block_inputs(transformer, kwargs: dict) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) the first double and the first single block receive in a forward with ``kwargs``."""
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, block in (("double", transformer.transformer_blocks[0]), ("single", transformer.single_transformer_blocks[0])):
        def hook(module, args, block_kwargs, name=name):
            seen.setdefault(name, (args, dict(block_kwargs)))
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            transformer(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


class FluxserveOps(TorchDispatchMode):
    """Counts the ``fluxserve::`` custom ops called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fluxserve":
            self.counts[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out.float()).all()
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float8 / bf16 / fp32 tensor as integers (for exact comparisons)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(view).to(torch.int64)


def assert_same_rows(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Quantised rows equal bit for bit: the float8 values and the float32 scales."""
    (q, scale), (ref_q, ref_scale) = got, want
    assert q.dtype == ref_q.dtype == torch.float8_e4m3fn and q.shape == ref_q.shape
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape == (q.shape[0], 1)
    differing = int((bits(q) != bits(ref_q)).sum())
    assert differing == 0, f"{differing} of {q.numel()} float8 values differ"
    assert torch.equal(scale, ref_scale), f"{int((scale != ref_scale).sum())} of {scale.numel()} scales differ"
