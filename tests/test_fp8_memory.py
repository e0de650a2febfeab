"""Memory while a model is converted to FP8: each full-precision weight must be released as soon as its FP8
copy exists, so loading a model that only fits in FP8 never needs the bf16 and FP8 copies side by side.

The tests keep weak references to the storages of the Linear weights and, from the conversion's ``on_layer``
callback, add up the bytes of the weights already converted that are still alive."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from fluxserve.engine import accel, fp8


class LiveWeights:
    """Weak references to the storages of the ``nn.Linear`` weights under a module (no strong references are
    kept), with the names of the layers that use each storage (a fused QKV weight and its per-projection
    views share one)."""

    def __init__(self, root: nn.Module) -> None:
        self.storages: dict[StorageWeakRef, tuple[int, set[str]]] = {}
        for name, module in root.named_modules():
            if type(module) is nn.Linear:
                storage = module.weight.untyped_storage()
                ref = StorageWeakRef(storage)
                self.storages.setdefault(ref, (storage.nbytes(), set()))[1].add(name)
        self.converted: set[str] = set()
        self.peak = 0  # the most bytes of converted layers' weights seen alive at one callback

    def largest(self) -> int:
        return max(nbytes for nbytes, _ in self.storages.values())

    def alive_after_conversion(self) -> int:
        return sum(
            nbytes
            for ref, (nbytes, names) in self.storages.items()
            if names & self.converted and not ref.expired()
        )

    def on_layer(self, name: str) -> None:
        self.converted.add(name)
        self.peak = max(self.peak, self.alive_after_conversion())


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    sizes = (64, 128, 128, 96, 64, 64)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    return nn.Sequential(*layers).to(torch.bfloat16)


def _tiny_transformer() -> nn.Module:
    from test_accel import _tiny_transformer as tiny

    return tiny(0).to(torch.bfloat16)


@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_quantize_linears_releases_each_weight_as_it_goes(granularity):
    model = _stack()
    live = LiveWeights(model)
    count = fp8.quantize_linears(model, granularity=granularity, on_layer=live.on_layer)
    assert count == len(model) == len(live.converted)
    assert live.peak <= live.largest(), f"{live.peak} bytes of converted bf16 weights alive at once"
    assert live.alive_after_conversion() == 0
    assert all(isinstance(layer, fp8.FP8Linear) for layer in model)


def test_quantize_linears_keeps_the_weight_when_asked():
    model = _stack()
    live = LiveWeights(model)
    fp8.quantize_linears(model, keep_original=True, on_layer=live.on_layer)
    assert live.alive_after_conversion() == sum(nbytes for nbytes, _ in live.storages.values())


def test_fused_transformer_releases_the_fused_bf16_weights_as_it_goes():
    transformer = _tiny_transformer()
    assert accel.fuse_qkv(transformer) == 2
    live = LiveWeights(transformer)
    with torch.no_grad():
        count = accel.quantize_fused_transformer(
            transformer, granularity="row", mode="weight_only", keep_original=False, on_layer=live.on_layer
        )
    assert count == len(live.converted) > 0
    assert "transformer_blocks.0.attn.to_qkv" in live.converted
    assert live.peak <= live.largest(), f"{live.peak} bytes of converted bf16 weights alive at once"
    assert live.alive_after_conversion() == 0
    attn = transformer.transformer_blocks[0].attn
    assert isinstance(attn.to_q, fp8.FP8Linear) and isinstance(attn.add_v_proj, fp8.FP8Linear)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
@pytest.mark.parametrize(("rows", "cols", "dtype"), [(37, 19, torch.bfloat16), (256, 64, torch.float32),
                                                    (5, 1000, torch.bfloat16), (130, 48, torch.float16)])
def test_quantize_weight_in_blocks_is_bit_identical(granularity, rows, cols, dtype):
    torch.manual_seed(rows)
    w = (torch.randn(rows, cols) * torch.logspace(-3, 2, rows).unsqueeze(1)).to(dtype)
    w[rows // 2] = 0  # an all-zero row takes the scale floor
    w[1, 3] = 1e4  # an outlier sets the per-tensor scale
    before = w.clone()
    ref_q, ref_scale = fp8.quantize_tensor(w, granularity)
    for chunk_bytes in (1, cols * 4 * 3, cols * 4 * 7 + 5, fp8.QUANTIZE_CHUNK_BYTES):  # 1 row .. one block
        q, scale = fp8.quantize_weight(w, granularity, chunk_bytes=chunk_bytes)
        assert q.dtype == fp8.FP8_DTYPE and q.shape == ref_q.shape
        assert torch.equal(_bits(q), _bits(ref_q))
        assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
        assert torch.equal(scale, ref_scale)
    assert torch.equal(w, before)  # the weight is not modified (a float32 block is a view of it)
