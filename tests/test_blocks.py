"""fluxserve's block forwards (engine/blocks.py) on tiny FLUX.2 transformers, with the fused ops' torch
references (this process does not interpret Triton; test_kernels_interpreted.py runs the kernels)."""

from __future__ import annotations

import json

import pytest
import torch
from kernel_helpers import FluxserveOps, block_inputs, model_inputs, rel, tiny_transformer
from torch import nn

from fluxserve.engine import accel, blocks, fp8, split


class _Pipe:
    """What apply_acceleration touches: a transformer and encode_prompt."""

    def __init__(self, transformer):
        self.transformer = transformer

    def encode_prompt(self, prompt=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                      max_sequence_length=512, text_encoder_out_layers=None):
        raise AssertionError("not used")


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_COMPILE", "0")
    for name in ("FLUXSERVE_FUSED_KERNELS", "FLUXSERVE_SPLIT_PROJECTION", "FLUXSERVE_FP8_FAST_ACCUM"):
        monkeypatch.delenv(name, raising=False)


def _w8a8(transformer):
    """QKV fused and the blocks' Linears in FP8 with row scales, running FP8 matmuls (as on Hopper)."""
    with torch.no_grad():
        accel.fuse_qkv(transformer)
        accel.quantize_fused_transformer(transformer, granularity="row", mode="w8a8", keep_original=False)
    return transformer


@pytest.mark.parametrize("kernels", ["auto", "1"])
def test_regular_blocks_compute_what_stock_diffusers_does(monkeypatch, kernels):
    monkeypatch.setenv("FLUXSERVE_FUSED_KERNELS", kernels)
    pipe = _Pipe(tiny_transformer(torch.float32))
    kwargs = model_inputs(1)
    with torch.no_grad():
        none = accel.apply_acceleration(pipe, "none", "cpu")
        assert not blocks.installed(pipe.transformer) and none["block_forward"] == "diffusers"
        stock = pipe.transformer(**kwargs)[0]
        state = accel.apply_acceleration(pipe, "regular", "cpu")
        with FluxserveOps() as seen:
            ours = pipe.transformer(**kwargs)[0]
    assert state["block_forward"] == "fluxserve" and blocks.installed(pipe.transformer)
    assert state["fused_kernels"] is (kernels == "1")
    assert seen.counts["rms_norm_rope"] == (8 if kernels == "1" else 0)
    assert seen.counts["norm_quant"] == 0  # bf16/fp32 layers: nothing to quantise
    assert torch.equal(ours, stock)


def test_none_puts_the_stock_forwards_back():
    pipe = _Pipe(tiny_transformer(torch.float32))
    accel.apply_acceleration(pipe, "regular", "cpu")
    assert blocks.installed(pipe.transformer)
    accel.apply_acceleration(pipe, "none", "cpu")
    assert all("forward" not in block.__dict__ for block in blocks._blocks(pipe.transformer))
    fresh = tiny_transformer(torch.float32)
    kwargs = model_inputs(4)
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**kwargs)[0], fresh(**kwargs)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("split_in", [False, True])
def test_high_on_the_fused_ops_equals_the_unfused_w8a8_path(dtype, split_in):
    """The fused ops' references quantise exactly as FP8Linear does, so the whole model agrees bit for bit."""
    transformer = _w8a8(tiny_transformer(dtype))
    kwargs = model_inputs(2, dtype)
    with torch.no_grad():
        unfused = transformer(**kwargs)[0]
        blocks.install(transformer, blocks.BlockOptions("native", kernels=True, split=split_in))
        with FluxserveOps() as seen:
            fused = transformer(**kwargs)[0]
    assert seen.counts == {"norm_quant": 10, "swiglu_quant": 10, "rms_norm_rope": 8}
    assert torch.equal(fused, unfused)


def test_kernels_off_splits_on_the_stock_quantisation():
    transformer = _w8a8(tiny_transformer(torch.bfloat16))
    kwargs = model_inputs(3, torch.bfloat16)
    with torch.no_grad():
        unfused = transformer(**kwargs)[0]
        blocks.install(transformer, blocks.BlockOptions("native", kernels=False, split=True))
        with FluxserveOps() as seen:
            ours = transformer(**kwargs)[0]
    assert not seen.counts
    assert torch.equal(ours, unfused)


@pytest.mark.parametrize("which", ["double", "single"])
def test_a_block_on_the_fused_ops_compiles_with_no_graph_break(which):
    transformer = _w8a8(tiny_transformer(torch.bfloat16))
    blocks.install(transformer, blocks.BlockOptions("native", kernels=True, split=True))
    args, kwargs = block_inputs(transformer, model_inputs(5, torch.bfloat16))[which]
    block = transformer.transformer_blocks[0] if which == "double" else transformer.single_transformer_blocks[0]
    with torch.no_grad():
        want = block(*args, **kwargs)
        explained = torch._dynamo.explain(block)(*args, **kwargs)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
        assert {"fluxserve.norm_quant.default", "fluxserve.swiglu_quant.default",
                "fluxserve.rms_norm_rope.default"} <= targets
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
        got = compiled(*args, **kwargs)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)


def test_with_gradients_on_the_blocks_run_the_stock_forward():
    transformer = tiny_transformer(torch.float32)
    accel.fuse_qkv(transformer)
    for p in transformer.parameters():
        p.requires_grad_(True)
    blocks.install(transformer, blocks.BlockOptions("native", kernels=True, split=True))
    with FluxserveOps() as seen:
        out = transformer(**model_inputs(6))[0]
    assert not seen.counts
    out.square().mean().backward()
    assert transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight.grad is not None


def test_lora_layers_run_through_the_stock_paths():
    from peft import LoraConfig

    transformer = tiny_transformer(torch.float32)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_qkv_mlp_proj", "to_out.0"]))
    pipe = _Pipe(transformer)
    kwargs = model_inputs(7)
    with torch.no_grad():
        accel.apply_acceleration(pipe, "none", "cpu")
        stock = transformer(**kwargs)[0]
        state = accel.apply_acceleration(pipe, "regular", "cpu", accel.AccelOptions(fused_kernels=True,
                                                                                    split_projection=True))
        ours = transformer(**kwargs)[0]
        transformer.disable_adapters()
        without = transformer(**kwargs)[0]
    assert any("LoRA active" in note for note in state["notes"]) and not state["fused_qkv"]
    assert state["split_projection"] is False  # a wrapped projection has no weight rows to view
    assert rel(ours, stock) <= 1e-6 and rel(without, stock) > 1e-3


def test_a_streamed_transformer_keeps_the_stock_forwards():
    from fluxserve.engine.placement import stream_module

    pipe = _Pipe(tiny_transformer(torch.float32))
    stream_module(pipe.transformer, "transformer", torch.device("cpu"))
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["block_forward"] == "diffusers" and not blocks.installed(pipe.transformer)


def test_switches_are_recorded_in_the_state(monkeypatch):
    pipe = _Pipe(tiny_transformer(torch.float32))
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["fused_kernels"] is False and state["split_projection"] is False
    assert state["split_measurement"] is None  # nothing is timed on a CPU
    assert any(note.startswith("fused kernels off: not CUDA") for note in state["notes"])
    monkeypatch.setenv("FLUXSERVE_FUSED_KERNELS", "0")
    monkeypatch.setenv("FLUXSERVE_SPLIT_PROJECTION", "1")
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["split_projection"] is True and state["fused_kernels"] is False
    assert "fused kernels off: FLUXSERVE_FUSED_KERNELS=0" in state["notes"]
    assert pipe.transformer.single_transformer_blocks[0]._fluxserve_options.split
    json.dumps(state)


def test_fast_accumulation_only_ever_at_high():
    pipe = _Pipe(_w8a8(tiny_transformer(torch.bfloat16)))
    state = accel._state(pipe, "cpu")
    options = accel.AccelOptions(fp8_fast_accum=True)
    layers = list(fp8.fp8_layers(pipe.transformer))
    accel.set_block_forwards(pipe.transformer, state, "high", torch.device("cpu"), options, [], False)
    assert state.fp8_fast_accum and all(layer.fast_accum for layer in layers)
    accel.set_block_forwards(pipe.transformer, state, "regular", torch.device("cpu"), options, [], False)
    assert not state.fp8_fast_accum and not any(layer.fast_accum for layer in layers)
    state = accel.apply_acceleration(pipe, "high", "cpu", options)  # no FP8 matmuls on a CPU: regular
    assert state["level"] == "regular" and state["fp8_fast_accum"] is False


@pytest.mark.parametrize("bias", [False, True])
def test_forward_quantized_is_forward_on_a_quantised_input(bias):
    torch.manual_seed(8)
    layer = fp8.FP8Linear(nn.Linear(64, 96, bias=bias).to(torch.bfloat16), mode="w8a8")
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    q, scale = fp8.quantize_tensor(x.reshape(-1, 64), "row")
    with torch.no_grad():
        full = layer(x)
        assert torch.equal(layer.forward_quantized(q, scale, x.shape[:-1], x.dtype), full)
        part = layer.forward_quantized(q, scale, x.shape[:-1], x.dtype, rows=(32, 80))
    assert torch.equal(part, full[..., 32:80])


def test_split_measurement_reports_both_ways():
    """The timing itself runs on any device (no assertion on the figures: they depend on the machine)."""
    transformer = _w8a8(tiny_transformer(torch.bfloat16))
    layer, qkv = split.single_in_projection(transformer)
    figures = split.measure_split(layer, qkv, tokens=64, warmup=1, repeats=2)
    assert figures["precision"] == "fp8-w8a8" and figures["qkv_rows"] == qkv == 3 * 32
    assert figures["fused_ms"] > 0 and figures["split_ms"] > 0 and isinstance(figures["split"], bool)
    bf16 = tiny_transformer(torch.bfloat16)
    assert split.measure_split(*split.single_in_projection(bf16), tokens=64, warmup=1, repeats=2)["precision"] \
        == "bfloat16"
    assert split.choose_split(bf16, torch.device("cpu")) == (False, None)  # not measured on a CPU: fused
    assert split.choose_split(bf16, torch.device("cpu"), forced=True) == (True, None)


def test_attention_runs_on_the_backend_the_state_chose(monkeypatch):
    """A fluxserve attention backend (its processors installed by attention.set_attention_backend): the block
    forwards still apply and call ``attention.attend`` with it."""
    from fluxserve.engine import attention

    pipe = _Pipe(tiny_transformer(torch.float32))
    kwargs = model_inputs(9)
    with torch.no_grad():
        accel.apply_acceleration(pipe, "none", "cpu")
        stock = pipe.transformer(**kwargs)[0]
        state = accel.apply_acceleration(pipe, "regular", "cpu", accel.AccelOptions(attention="sdpa_math"))
        assert state["attention"] == "sdpa_math" and state["block_forward"] == "fluxserve"
        used = []
        real = attention.attend
        monkeypatch.setattr(attention, "attend", lambda q, k, v, backend: used.append(backend) or real(q, k, v,
                                                                                                      backend))
        ours = pipe.transformer(**kwargs)[0]
    assert used == ["sdpa_math"] * 4
    assert rel(ours, stock) <= 1e-5
