"""The lossless savings of ``engine/lossless.py`` on CPU: each identical to the stock code, on only at ``regular`` and
``high``, switchable by its environment variable, and recorded in the acceleration state."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

from fluxserve.engine import accel, lossless, random_weights
from fluxserve.engine.text_encoder import encoding_only

SWITCHES = ("FLUXSERVE_ROPE_CACHE", "FLUXSERVE_TEXT_ENCODER_COMPILE", "FLUXSERVE_DEVICE_POSTPROCESS",
            "FLUXSERVE_VAE_CUDNN_BENCHMARK")


@pytest.fixture(autouse=True)
def _no_block_compile(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_COMPILE", "0")  # compiling the transformer blocks on CPU takes minutes
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)


def _klein(seed: int = 0):
    torch.manual_seed(seed)
    return random_weights.build_random_pipeline("klein-4b", "cpu", torch.float32,
                                                arch=random_weights.tiny_architecture("klein-4b"))


def _latent_ids(h: int, w: int) -> torch.Tensor:
    """The image ids ``Flux2Pipeline._prepare_latent_ids`` makes for an h x w latent grid (batch of one)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_latent_ids(torch.empty(1, 1, h, w))


def _transformer_inputs(pipe, h: int, w: int, text: int = 8, seed: int = 0) -> dict:
    from diffusers import Flux2Pipeline

    config = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, h * w, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=g),
        "timestep": torch.full((1,), 0.7),
        "guidance": None,
        "img_ids": _latent_ids(h, w),
        "txt_ids": Flux2Pipeline._prepare_text_ids(torch.empty(1, text, 1)),
        "return_dict": False,
    }


# ---- 1. RoPE tables kept per ids tensor -----------------------------------------------------------------------------
def test_rope_cache_is_bit_exact_and_never_mixes_grids_of_the_same_length():
    stock = Flux2PosEmbed(theta=2000, axes_dim=[4, 4, 4, 4])
    transformer = torch.nn.Module()
    transformer.pos_embed = Flux2PosEmbed(theta=2000, axes_dim=[4, 4, 4, 4])
    assert lossless.set_rope_cache(transformer, True)
    cache = lossless.rope_cache_of(transformer)
    wide, tall = _latent_ids(4, 8), _latent_ids(8, 4)  # a 1024x512 and a 512x1024 image: same length, other grid
    assert wide.shape == tall.shape and not torch.equal(wide, tall)
    for batched in (wide, tall, wide, tall):
        ids = batched[0]  # the transformer's own view of the batched ids, a new tensor object at every step
        cos, sin = transformer.pos_embed(ids)
        want_cos, want_sin = stock(ids)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        assert cos.dtype == want_cos.dtype == torch.float32
    assert (cache.misses, cache.hits) == (2, 2)

    wide[0, 3, 1] += 5  # an in-place change of the ids: computed again
    assert torch.equal(transformer.pos_embed(wide[0])[0], stock(wide[0])[0])
    assert cache.misses == 3

    for side in range(1, 9):  # bounded
        transformer.pos_embed(_latent_ids(side, 3)[0])
    assert len(cache) == lossless.ROPE_CACHE_ENTRIES

    assert not lossless.set_rope_cache(transformer, False)  # off: the stock computation, the tables let go
    assert len(cache) == 0
    transformer.pos_embed(tall[0])
    assert len(cache) == 0


def test_rope_cache_never_serves_a_freed_grid_to_a_new_one():
    """A request's ids go, the next request's ids (same length, another grid) may land at the same address: the
    entry keeps its ids alive, so the new ids are other memory and get their own tables."""
    stock = Flux2PosEmbed(theta=2000, axes_dim=[4, 4, 4, 4])
    transformer = torch.nn.Module()
    transformer.pos_embed = Flux2PosEmbed(theta=2000, axes_dim=[4, 4, 4, 4])
    lossless.set_rope_cache(transformer, True)
    for h, w in ((4, 8), (8, 4), (2, 16), (16, 2), (4, 8)):
        ids = _latent_ids(h, w)[0].clone()
        assert torch.equal(transformer.pos_embed(ids)[1], stock(ids)[1])
        del ids


def test_rope_cache_keeps_the_transformer_bit_exact_and_follows_the_level(monkeypatch):
    pipe = _klein()
    steps = [_transformer_inputs(pipe, 4, 8, seed=s) for s in range(3)]
    for step in steps[1:]:  # one request: the same ids at every step
        step["img_ids"], step["txt_ids"] = steps[0]["img_ids"], steps[0]["txt_ids"]
    assert not accel.apply_acceleration(pipe, "none", "cpu")["lossless"]["rope_cache"]
    with torch.no_grad():
        stock = [pipe.transformer(**step)[0] for step in steps]
    assert accel.apply_acceleration(pipe, "regular", "cpu")["lossless"]["rope_cache"]
    with torch.no_grad():
        cached = [pipe.transformer(**step)[0] for step in steps]
    monkeypatch.setenv("FLUXSERVE_ROPE_CACHE", "0")
    assert not accel.apply_acceleration(pipe, "regular", "cpu")["lossless"]["rope_cache"]
    with torch.no_grad():
        uncached = [pipe.transformer(**step)[0] for step in steps]
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))  # regular with and without: bit-identical
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cached, stock))  # fused QKV rounds differently


# ---- 2. the text encoder compiled for prompt encoding ---------------------------------------------------------------
def _encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad(), encoding_only(pipe):
        return pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1)[0]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_text_encoder_compiled_matches_eager_and_reuses_its_graph(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_TEXT_ENCODER_COMPILE", "1")  # on the CPU too (auto: where the blocks compile)
    pipe = _klein()
    decoder = lossless.text_decoder(pipe.text_encoder)
    state = accel.apply_acceleration(pipe, "none", "cpu")
    assert not state["lossless"]["text_encoder_compiled"]
    prompts = ("a red fox in the snow", "a lighthouse at dusk, oil painting", "")
    eager = {prompt: _encode(pipe, prompt) for prompt in prompts}

    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["lossless"]["text_encoder_compiled"]
    before = _graphs()
    first = _encode(pipe, prompts[0])  # compiles: one graph for the whole decoder
    assert _graphs() == before + 1
    later = {prompt: _encode(pipe, prompt) for prompt in prompts[1:]}
    assert _graphs() == before + 1  # other prompts (the empty negative prompt too) reuse it: no recompile
    assert decoder._compiled_call_impl is None  # only inside encoding calls
    for prompt, value in ((prompts[0], first), *later.items()):
        assert value.shape == eager[prompt].shape == (1, 512, 48)
        assert torch.allclose(value, eager[prompt], rtol=1e-5, atol=1e-5)  # fp32: equal up to rounding order

    with torch.no_grad():  # a generation call (prompt expansion) runs eager
        ids = pipe.tokenizer("a fox", return_tensors="pt").input_ids
        out = pipe.text_encoder(input_ids=ids, use_cache=True)
    assert out.logits.shape[:2] == ids.shape and _graphs() == before + 1

    from fluxserve.engine.lossless_checks import measure_text_encoder_compile

    report = measure_text_encoder_compile(pipe, "cpu", repeat=1)  # what the GPU benchmark runs; compiled already
    assert report["compiled"] and report["graphs_compiled"] == 0 and report["recompiles_for_later_prompts"] == 0
    assert report["rel_error"] < 1e-5 and report["shape"] == [1, 512, 48] and report["compile_failed"] is None
    assert lossless.state_of(pipe).text_encoder_compiled  # put back as it was

    assert not accel.apply_acceleration(pipe, "none", "cpu")["lossless"]["text_encoder_compiled"]
    assert torch.equal(_encode(pipe, prompts[0]), eager[prompts[0]])  # none: eager again


def test_text_encoder_compile_failure_falls_back_to_eager_for_good(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    monkeypatch.setenv("FLUXSERVE_TEXT_ENCODER_COMPILE", "1")
    pipe = _klein(1)
    accel.apply_acceleration(pipe, "none", "cpu")
    eager = _encode(pipe, "a tin robot")
    accel.apply_acceleration(pipe, "regular", "cpu")
    decoder = lossless.text_decoder(pipe.text_encoder)

    def broken(*args, **kwargs):  # what a compiler error on the first compiled call looks like
        raise TorchDynamoException("no kernel")

    decoder._fluxserve_compiled = broken
    assert torch.equal(_encode(pipe, "a tin robot"), eager)
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert not state["lossless"]["text_encoder_compiled"]
    assert "no kernel" in state["lossless"]["text_encoder_compile_failed"]
    assert any(note.startswith(lossless.TEXT_ENCODER_COMPILE_FAILED) for note in state["notes"])


def test_text_encoder_is_not_compiled_where_it_is_held_in_fp8_or_streamed(monkeypatch):
    from fluxserve.engine import fp8
    from fluxserve.engine.placement import stream_module, text_encoder_filter

    monkeypatch.setenv("FLUXSERVE_TEXT_ENCODER_COMPILE", "1")
    held = _klein()
    fp8.quantize_linears(held.text_encoder, include=text_encoder_filter, granularity="row", mode="weight_only",
                         keep_original=False)
    state = accel.apply_acceleration(held, "regular", "cpu")
    assert not state["lossless"]["text_encoder_compiled"]
    assert "the text encoder is held in FP8: not compiled" in state["notes"]
    streamed = _klein()
    stream_module(streamed.text_encoder, "text_encoder", torch.device("cpu"))
    state = accel.apply_acceleration(streamed, "regular", "cpu")
    assert not state["lossless"]["text_encoder_compiled"]
    assert any("streamed" in note and "not compiled" in note for note in state["notes"])
    monkeypatch.setenv("FLUXSERVE_TEXT_ENCODER_COMPILE", "auto")  # auto follows the blocks: off on this CPU
    assert not accel.apply_acceleration(_klein(), "regular", "cpu")["lossless"]["text_encoder_compiled"]


# ---- 3. post-processing on the device, bit-identical ----------------------------------------------------------------
def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def _same_pixels(processor, image: torch.Tensor) -> None:
    stock = processor.postprocess(image, output_type="pil")
    ours = lossless.to_pil(processor, image)
    assert [i.mode for i in ours] == [i.mode for i in stock] and [i.size for i in ours] == [i.size for i in stock]
    for a, b in zip(_pixels(ours), _pixels(stock)):
        assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)


def test_device_postprocess_is_bit_identical_in_bf16_and_fp32():
    from fluxserve.engine.lossless_checks import postprocess_probe

    processor = Flux2ImageProcessor(vae_scale_factor=16)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        # at and next to every .5 rounding boundary, beyond [-1, 1], inf, NaN; for bf16 every value in [-2, 2]
        _same_pixels(processor, postprocess_probe(dtype))
        _same_pixels(processor, (torch.randn(2, 3, 48, 40, generator=g) * 1.5).to(dtype))
        _same_pixels(processor, torch.randn(1, 1, 16, 24, generator=g).to(dtype))  # grayscale: an "L" image


def test_device_postprocess_follows_the_level_and_its_switch(monkeypatch):
    pipe = _klein()
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert not accel.apply_acceleration(pipe, "none", "cpu")["lossless"]["device_postprocess"]
    stock = _pixels(lossless.postprocess(pipe, image))
    assert accel.apply_acceleration(pipe, "regular", "cpu")["lossless"]["device_postprocess"]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(lossless.postprocess(pipe, image)), stock))
    monkeypatch.setenv("FLUXSERVE_DEVICE_POSTPROCESS", "0")
    assert not accel.apply_acceleration(pipe, "regular", "cpu")["lossless"]["device_postprocess"]


def test_boundary_probe_catches_a_different_rounding():
    """The probe's values tell apart roundings that random values would not: half away from zero (fp32; from a
    bf16 image the two never differ), and the same arithmetic in float64."""
    from fluxserve.engine.lossless_checks import postprocess_probe

    for dtype in (torch.bfloat16, torch.float32):
        probe = postprocess_probe(dtype)
        finite = probe.isfinite()
        scaled = (probe * 0.5 + 0.5).clamp(0, 1).float() * 255
        stock = scaled.round()
        assert ((scaled - scaled.floor()) == 0.5)[finite].sum() > 50  # exactly on a boundary
        assert (torch.floor(scaled + 0.5) != stock)[finite].any() == (dtype == torch.float32)
        assert (((probe.double() * 0.5 + 0.5).clamp(0, 1) * 255).round() != stock)[finite].any()


# ---- 4. cudnn.benchmark while the VAE decodes ------------------------------------------------------------------------
def test_cudnn_benchmark_is_set_inside_and_restored_after_the_last_user():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        inside, release = threading.Event(), threading.Event()
        seen = {}

        def other_engine():
            with lossless.cudnn_benchmark():
                inside.set()
                release.wait(10)

        thread = threading.Thread(target=other_engine)
        thread.start()
        inside.wait(10)
        with pytest.raises(RuntimeError), lossless.cudnn_benchmark():
            seen["mine"] = torch.backends.cudnn.benchmark
            raise RuntimeError("a decode that fails")
        seen["other still decoding"] = torch.backends.cudnn.benchmark
        release.set()
        thread.join()
        assert seen == {"mine": True, "other still decoding": True}
        assert torch.backends.cudnn.benchmark is False
        with lossless.cudnn_benchmark(False):
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


def test_vae_cudnn_benchmark_is_on_for_cuda_at_regular_only(monkeypatch):
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        pipe = _klein()
        assert not accel.apply_acceleration(pipe, "regular", "cpu")["lossless"]["vae_cudnn_benchmark"]
        with lossless.vae_decoding(pipe, torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
        # The state as it is on a GPU (the flag is process-wide; nothing runs on CUDA here)
        lossless.state_of(pipe).vae_cudnn_benchmark = True
        with lossless.vae_decoding(pipe, torch.device("cuda")):
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
        with lossless.vae_decoding(pipe, torch.device("cpu")):
            assert torch.backends.cudnn.benchmark is False
        state = accel.AccelState()
        options = lossless.LosslessOptions()
        lossless.apply(pipe, state.lossless, "regular", torch.device("cuda"), options, compile_default=False,
                       notes=[])
        assert state.lossless.vae_cudnn_benchmark
        lossless.apply(pipe, state.lossless, "none", torch.device("cuda"), options, compile_default=False, notes=[])
        assert not state.lossless.vae_cudnn_benchmark
        monkeypatch.setenv("FLUXSERVE_VAE_CUDNN_BENCHMARK", "0")
        lossless.apply(pipe, state.lossless, "regular", torch.device("cuda"), lossless.LosslessOptions.from_env(),
                       compile_default=False, notes=[])
        assert not state.lossless.vae_cudnn_benchmark
    finally:
        torch.backends.cudnn.benchmark = saved


def test_none_has_every_saving_off_and_the_state_is_json():
    import json

    pipe = _klein()
    state = accel.apply_acceleration(pipe, "none", "cpu")
    assert not any(value for key, value in state["lossless"].items() if key != "text_encoder_compile_failed")
    assert json.loads(json.dumps(state)) == state


# ---- 5. graph partitions: one graph per block class -----------------------------------------------------------------
def test_each_block_class_compiles_to_one_graph_without_breaks():
    """What makes a compiled forward one CUDA graph per block (the partition count measure_graph_partitions
    reports): dynamo captures each block class whole, and every block of a class reuses its graph."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    pipe = _klein()
    transformer = pipe.transformer
    accel.fuse_qkv(transformer)
    counter = CompileCounter()
    blocks = [m for m in transformer.modules() if type(m).__name__ in transformer._repeated_blocks]
    for block in blocks:
        block.compile(backend=counter, dynamic=True)
    breaks = sum(counters["graph_break"].values())
    with torch.no_grad():
        for h, w in ((4, 8), (8, 8)):
            transformer(**_transformer_inputs(pipe, h, w))
    assert {type(b).__name__ for b in blocks} == {"Flux2TransformerBlock", "Flux2SingleTransformerBlock"}
    assert counter.frame_count == 2  # one graph per block class, for both resolutions
    assert sum(counters["graph_break"].values()) == breaks


# ---- the measurements the GPU benchmark runs, on the tiny models --------------------------------------------------
def test_measurements_run_on_the_cpu_and_report_exactness():
    import json

    from fluxserve.engine import lossless_checks as checks

    pipe = _klein()
    accel.apply_acceleration(pipe, "regular", "cpu")
    inputs = checks.transformer_inputs(pipe.transformer, 64, 32, text_tokens=8, dtype=torch.float32)
    rope = checks.measure_rope_cache(pipe.transformer, inputs, "cpu", repeat=2, warmup=1)
    assert rope["bit_identical"] and rope["off_is_deterministic"] and rope["max_abs_diff"] == 0
    assert rope["off"]["tables_aten_ops"] >= 20 and rope["on"]["tables_aten_ops"] == 0  # kept: nothing to run
    assert rope["tokens"] == {"image": 8, "text": 8}
    assert lossless.state_of(pipe).rope_cache and pipe.transformer.pos_embed._fluxserve_rope_cache_on  # put back

    post = checks.measure_postprocess(pipe.image_processor, "cpu", width=64, height=48, repeat=1)
    assert post["bit_identical"] and post["bit_identical_at_boundaries"] and post["boundary_values"] > 30000
    assert post["bytes_to_host"] == {"off": 2 * 3 * 64 * 48, "on": 3 * 64 * 48}

    vae = checks.measure_vae_cudnn_benchmark(pipe, "cpu", width=64, height=64, repeat=1)
    assert not vae["applies"] and vae["bit_identical"] and vae["rel_error"] == 0

    partitions = checks.measure_graph_partitions(pipe.transformer, inputs, "cpu")
    assert partitions["blocks"] == 2 and partitions["compiled_regions_per_forward"] == 0  # not compiled on a CPU
    assert partitions["cuda_graph_replays_per_forward"] == 0 and partitions["eager_aten_ops_per_forward"] > 50
    assert partitions["synchronised_forward"]["host_ms"] > 0
    for report in (rope, post, vae, partitions):
        json.dumps(report)
