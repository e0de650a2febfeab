"""Acceleration levels and FP8 layers on CPU, on a small random FLUX.2 transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxserve.engine import accel, fp8
from fluxserve.engine.compile_errors import is_compile_failure


def _tiny_transformer(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    ).eval()


class _Pipe:
    """The parts of a pipeline that apply_acceleration touches: a transformer and encode_prompt."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.encoder_calls = 0

    def encode_prompt(
        self,
        prompt=None,
        device=None,
        num_images_per_prompt=1,
        prompt_embeds=None,
        max_sequence_length=512,
        text_encoder_out_layers=(9, 18, 27),
    ):
        self.encoder_calls += 1
        return torch.randn(num_images_per_prompt, 8, 32), torch.zeros(num_images_per_prompt, 8, 4)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    t = 6
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(t))
    return {
        "hidden_states": torch.randn(1, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, t, 32, generator=g),
        "timestep": torch.rand(1, generator=g),
        "guidance": torch.tensor([2.5]),
        "img_ids": img_ids.unsqueeze(0),
        "txt_ids": txt_ids.unsqueeze(0),
        "return_dict": False,
    }


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_COMPILE", "0")  # compiling a block on CPU takes ~2 minutes; see the docs


def test_regular_matches_none_on_the_same_weights():
    pipe = _Pipe(_tiny_transformer())
    for seed in (1, 2):
        kwargs = _inputs(seed)
        with torch.no_grad():
            none = accel.apply_acceleration(pipe, "none", "cpu")
            ref = pipe.transformer(**kwargs)[0]
            regular = accel.apply_acceleration(pipe, "regular", "cpu")
            out = pipe.transformer(**kwargs)[0]
        assert none["fused_qkv"] is False and none["prompt_cache"] is False
        assert regular["fused_qkv"] is True and regular["prompt_cache"] is True
        assert regular["compiled"] is False  # CPU default (FLUXSERVE_COMPILE=0 here too)
        assert _rel(out, ref) <= 1e-2
        assert _rel(out, ref) <= 1e-5  # fp32 on CPU: equal up to rounding


def test_fused_qkv_is_identical_and_shares_memory():
    transformer = _tiny_transformer()
    kwargs = _inputs(3)
    with torch.no_grad():
        ref = transformer(**kwargs)[0]
        params_before = sum(p.numel() for p in transformer.parameters())
        assert accel.fuse_qkv(transformer) == 2  # the two double-stream blocks
        attn = transformer.transformer_blocks[0].attn
        assert attn.fused_projections and attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
        fused = transformer(**kwargs)[0]
        assert accel.unfuse_qkv(transformer) == 2
        unfused = transformer(**kwargs)[0]
    assert torch.allclose(fused, ref, rtol=0, atol=1e-6)
    assert torch.equal(unfused, ref)
    # the fused projection is new, the per-projection weights are views: no second copy of Q/K/V
    storages = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    assert len(storages) < sum(1 for _ in transformer.parameters())
    assert params_before > 0


def test_prompt_cache_hit_returns_the_same_tensor_and_skips_the_encoder():
    pipe = _Pipe(_tiny_transformer())
    cache = accel.PromptCache(max_entries=2, max_bytes=10**9)
    accel.apply_acceleration(pipe, "regular", "cpu")
    accel.install_prompt_cache(pipe, cache)
    first = pipe.encode_prompt(prompt="a red fox", device="cpu", num_images_per_prompt=1)
    second = pipe.encode_prompt(prompt="a red fox", device="cpu", num_images_per_prompt=1)
    assert pipe.encoder_calls == 1
    assert second[0] is first[0]
    pipe.encode_prompt(prompt="a red fox", device="cpu", max_sequence_length=256)
    pipe.encode_prompt(prompt="a blue fox", device="cpu")
    assert pipe.encoder_calls == 3
    assert len(cache) == 2  # bounded: the oldest entry went
    pipe.encode_prompt(prompt="a red fox", device="cpu")  # evicted -> encoded again
    assert pipe.encoder_calls == 4
    accel.apply_acceleration(pipe, "none", "cpu")  # the reference level never uses the cache
    pipe.encode_prompt(prompt="a blue fox", device="cpu")
    assert pipe.encoder_calls == 5
    accel.apply_acceleration(pipe, "regular", "cpu")
    accel.invalidate_prompt_cache(pipe)
    pipe.encode_prompt(prompt="a blue fox", device="cpu")
    assert pipe.encoder_calls == 6
    assert cache.stats()["hits"] >= 1


def test_prompt_cache_bytes_bound():
    cache = accel.PromptCache(max_entries=100, max_bytes=3 * 4 * 10)
    for i in range(5):
        cache.put((i,), torch.zeros(10))
    assert len(cache) == 3 and cache.bytes == 120
    assert cache.get((0,)) is None and cache.get((4,)) is not None


def test_fp8_weight_only_round_trip_and_module_is_used():
    torch.manual_seed(4)
    linear = nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 7, 64)
    ref = linear(x)
    model = nn.Sequential(linear)
    assert fp8.quantize_linears(model, mode="weight_only") == 1
    layer = model[0]
    assert isinstance(layer, fp8.FP8Linear) and layer.weight_fp8.dtype == torch.float8_e4m3fn
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(x)
    assert calls == [1]
    err = _rel(out, ref)
    assert 0 < err <= 5e-2  # quantised (not bit-exact) but within e4m3 error
    q, scale = fp8.quantize_tensor(linear.weight.detach(), "row")
    w = fp8.dequantize_tensor(q, scale, torch.float32)
    assert _rel(w, linear.weight.detach()) <= 5e-2


def test_fp8_w8a8_scaled_mm_convention_matches_reference():
    """The CUDA path's torch._scaled_mm call (row-wise and per-tensor scales) also runs on CPU: check it."""
    torch.manual_seed(5)
    for granularity in ("row", "tensor"):
        linear = nn.Linear(64, 48, bias=False)
        x = torch.randn(3, 5, 64)
        ref = linear(x)
        layer = fp8.FP8Linear(linear, granularity=granularity, mode="w8a8", keep_original=True)
        assert layer.mode == "w8a8"
        with torch.no_grad():
            assert _rel(layer(x), ref) <= 8e-2
            layer.set_mode("original")
            assert torch.equal(layer(x), ref)


def test_fp8_fused_transformer_slices_share_storage_and_stay_close():
    transformer = _tiny_transformer()
    kwargs = _inputs(6)
    with torch.no_grad():
        ref = transformer(**kwargs)[0]
        accel.fuse_qkv(transformer)
        count = accel.quantize_fused_transformer(
            transformer, granularity="row", mode="w8a8", keep_original=False
        )
        assert count > 0
        attn = transformer.transformer_blocks[0].attn
        assert isinstance(attn.to_q, fp8.FP8Linear)
        assert (
            attn.to_q.weight_fp8.untyped_storage().data_ptr()
            == attn.to_qkv.weight_fp8.untyped_storage().data_ptr()
        )
        assert not isinstance(transformer.x_embedder, fp8.FP8Linear)  # embedders stay in full precision
        w8a8 = transformer(**kwargs)[0]
        fp8.set_fp8_mode(transformer, "weight_only")
        weight_only = transformer(**kwargs)[0]
        accel.unfuse_qkv(transformer)
        unfused = transformer(**kwargs)[0]
    assert _rel(w8a8, ref) <= 5e-2
    assert _rel(weight_only, ref) <= 5e-2
    assert torch.allclose(unfused, weight_only, atol=1e-5)


def _fp8_held(keep_original: bool = False):
    """A tiny transformer held in FP8 with row-wise scales and QKV unfused, as a memory plan leaves it."""
    transformer = _tiny_transformer()
    with torch.no_grad():
        accel.quantize_fused_transformer(
            transformer, granularity="row", mode="weight_only", keep_original=keep_original
        )
    return transformer


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _inside(part: torch.Tensor, whole: torch.Tensor) -> bool:
    (start, stop), (lo, hi) = _storage_span(part), _storage_span(whole)
    return lo <= start and stop <= hi


def test_fuse_fp8_qkv_is_identical_and_shares_storage():
    pipe = _Pipe(_tiny_transformer())
    transformer = pipe.transformer
    kwargs = _inputs(8)
    with torch.no_grad():
        assert accel.prepare_transformer(pipe, "fp8", "cpu") == "fp8"
        fp8.set_fp8_mode(transformer, "weight_only")
        ref = transformer(**kwargs)[0]
        assert accel.fuse_fp8_qkv(transformer) == 2
        assert accel.is_fused(transformer)
        attn = transformer.transformer_blocks[0].attn
        for fused_name, part_names in accel.QKV_GROUPS:
            whole = getattr(attn, fused_name)
            assert isinstance(whole, fp8.FP8Linear)
            for name in part_names:
                part = getattr(attn, name)
                assert isinstance(part, fp8.FP8Linear)
                assert _inside(part.weight_fp8, whole.weight_fp8)  # a view, not a second copy
        fused = transformer(**kwargs)[0]
        assert accel.fuse_fp8_qkv(transformer) == 0  # already fused
        fused_ptr = attn.to_qkv.weight_fp8.data_ptr()

        assert accel.unfuse_qkv(transformer) == 2
        assert not accel.is_fused(transformer) and not hasattr(attn, "to_qkv")
        unfused = transformer(**kwargs)[0]

        assert accel.fuse_fp8_qkv(transformer) == 2  # fusing the slices again reuses their storage
        assert attn.to_qkv.weight_fp8.data_ptr() == fused_ptr
        refused = transformer(**kwargs)[0]
    assert torch.equal(fused, ref)
    assert torch.equal(unfused, ref)
    assert torch.equal(refused, ref)


def test_fuse_fp8_qkv_keeps_the_original_weights_exact():
    transformer = _fp8_held(keep_original=True)
    kwargs = _inputs(9)
    with torch.no_grad():
        fp8.set_fp8_mode(transformer, "original")
        ref = transformer(**kwargs)[0]
        assert accel.fuse_fp8_qkv(transformer) == 2
        attn = transformer.transformer_blocks[1].attn
        assert attn.to_added_qkv.mode == "original" and _inside(attn.add_k_proj.original, attn.to_added_qkv.original)
        fused = transformer(**kwargs)[0]
    assert torch.equal(fused, ref)


def test_fuse_fp8_qkv_leaves_per_tensor_scales_and_bf16_unfused():
    transformer = _tiny_transformer()
    with torch.no_grad():
        assert accel.fuse_fp8_qkv(transformer) == 0  # bf16: that is fuse_qkv's job
        accel.quantize_fused_transformer(transformer, granularity="tensor", mode="weight_only", keep_original=False)
    assert accel.fuse_fp8_qkv(transformer) == 0  # one scale per projection: a fused layer could not keep them
    assert not accel.is_fused(transformer)
    assert not hasattr(transformer.transformer_blocks[0].attn, "to_qkv")


def test_high_on_cpu_runs_regular_with_a_notice():
    pipe = _Pipe(_tiny_transformer())
    state = accel.apply_acceleration(pipe, "high", "cpu")
    assert state["requested"] == "high" and state["level"] == "regular"
    assert any("high" in note for note in state["notes"])
    assert not fp8.has_fp8(pipe.transformer)
    assert accel.acceleration_state(pipe)["level"] == "regular"


def test_prepare_transformer_fp8_held_runs_weight_only_for_lossless_levels():
    pipe = _Pipe(_tiny_transformer())
    kwargs = _inputs(7)
    with torch.no_grad():
        ref = pipe.transformer(**kwargs)[0]
        assert accel.prepare_transformer(pipe, "fp8", "cpu") == "fp8"
        state = accel.apply_acceleration(pipe, "regular", "cpu")
        out = pipe.transformer(**kwargs)[0]
    assert state["transformer_precision"] == "fp8-weight-only"
    assert any("FP8" in note for note in state["notes"])
    assert _rel(out, ref) <= 5e-2


def test_levels_and_go_fast():
    assert accel.normalise_level(None) == "regular"
    assert accel.normalise_level("HIGH") == "high"
    assert accel.normalise_level(True) == "high" and accel.normalise_level(False) == "regular"
    assert accel.level_from_go_fast(True) == "high"
    with pytest.raises(ValueError, match="acceleration"):
        accel.normalise_level("turbo")


# ---- attention in the state (the choice itself: tests/test_attention.py) ------------------------------------------
def test_cpu_attention_is_native_and_reported_in_the_state():
    pipe = _Pipe(_tiny_transformer())
    for level in ("regular", "high", "none"):
        state = accel.apply_acceleration(pipe, level, "cpu")
        assert state["attention"] == "native" and state["fp8_attention"] is False
        assert state["attention_why"] and state["fp8_attention_why"]
    assert "none" in state["attention_why"]


def test_forced_attention_backend_runs_our_processors_and_matches_none(monkeypatch):
    pipe = _Pipe(_tiny_transformer())
    kwargs = _inputs(3)
    with torch.no_grad():
        accel.apply_acceleration(pipe, "none", "cpu")
        ref = pipe.transformer(**kwargs)[0]
        monkeypatch.setenv("FLUXSERVE_ATTENTION", "sdpa_math")
        state = accel.apply_acceleration(pipe, "regular", "cpu")
        out = pipe.transformer(**kwargs)[0]
    assert state["attention"] == "sdpa_math" and "forced" in state["attention_why"]
    processors = {type(m.processor).__name__ for m in pipe.transformer.modules() if hasattr(m, "set_processor")}
    assert processors == {"DoubleStreamAttention", "SingleStreamAttention"}
    assert _rel(out, ref) <= 1e-5
    monkeypatch.delenv("FLUXSERVE_ATTENTION")
    state = accel.apply_acceleration(pipe, "none", "cpu")
    processors = {type(m.processor).__name__ for m in pipe.transformer.modules() if hasattr(m, "set_processor")}
    assert state["attention"] == "native" and processors == {"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"}


# ---- CUDA graphs: a bounded number of captured shapes ----------------------------------------------------------
def test_cuda_graphs_are_kept_for_at_most_the_cap_of_shapes():
    transformer = _tiny_transformer()
    state = accel.AccelState(cuda_graph_cap=2, cuda_graph_shapes=["1x4096x128 1x512x15360"])
    assert accel._graphs_for(state, transformer, "1x4096x128 1x512x15360")
    state.cuda_graph_shapes.append("1x3072x128 1x512x15360")
    assert not accel._graphs_for(state, transformer, "1x2048x128 1x512x15360")  # a third shape: no graphs
    assert accel._graphs_for(state, transformer, "1x3072x128 1x512x15360")  # a captured one keeps them
    args, kwargs = (), {"hidden_states": torch.zeros(1, 64, 16), "encoder_hidden_states": torch.zeros(1, 6, 32)}
    assert accel._shape_key(args, kwargs) == "1x64x16 1x6x32"
    assert accel.AccelOptions.from_env().cuda_graph_shapes >= 1


def test_cuda_graph_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_CUDA_GRAPH_SHAPES", "6")
    assert accel.AccelOptions.from_env().cuda_graph_shapes == 6


# ---- a transformer held in FP8 or streamed -----------------------------------------------------------------------
def test_fp8_held_transformer_fuses_qkv_in_fp8_for_the_lossless_levels():
    pipe = _Pipe(_tiny_transformer())
    accel.prepare_transformer(pipe, "fp8", "cpu")
    kwargs = _inputs(3)
    with torch.no_grad():
        unfused = pipe.transformer(**kwargs)[0]
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["fused_qkv"] and state["transformer_precision"] == "fp8-weight-only"  # no FP8 matmuls on a CPU
    assert any("every level dequantises" in note for note in state["notes"])
    with torch.no_grad():
        fused = pipe.transformer(**kwargs)[0]
    assert torch.equal(fused, unfused)
    assert not accel.apply_acceleration(pipe, "none", "cpu")["fused_qkv"]


def test_streamed_transformer_is_neither_fused_nor_compiled(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_COMPILE", "1")
    from fluxserve.engine.placement import stream_module

    pipe = _Pipe(_tiny_transformer())
    kwargs = _inputs(4)
    with torch.no_grad():
        expected = pipe.transformer(**kwargs)[0]
    stream_module(pipe.transformer, "transformer", torch.device("cpu"))
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["streamed"] and not state["fused_qkv"] and not state["compiled"]
    assert any("streamed" in note for note in state["notes"])
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**kwargs)[0], expected)


# ---- compiler errors, CUDA graph threads, the compiled VAE decoder -------------------------------------------------
def _raised_in(path: str, exc: Exception) -> Exception:
    """``exc`` raised from code whose file is ``path`` (how an error from inside the compiler looks)."""
    code = compile("raise exc", path, "exec")
    try:
        exec(code, {"exc": exc})  # noqa: S102 - a fixed one-line raise, given a file name
    except Exception as raised:  # noqa: BLE001
        return raised
    raise AssertionError("not raised")


def test_an_error_from_inside_the_compiler_counts_as_a_compile_failure():
    # PyTorch 2.11's CUDA graph trees fail a bare assertion on a thread that did not import them
    inside = _raised_in("/site-packages/torch/_inductor/cudagraph_trees.py", AssertionError())
    assert is_compile_failure(inside)
    assert not is_compile_failure(_raised_in("/site-packages/diffusers/models/x.py", AssertionError()))
    assert not is_compile_failure(ValueError("bad width"))


def test_each_thread_gets_its_own_cuda_graph_state():
    import threading

    from torch._inductor import cudagraph_trees as trees

    seen = {}

    def fresh_thread():
        seen["before"] = hasattr(trees.local, "tree_manager_containers")
        accel.ensure_cudagraph_thread()
        seen["after"] = hasattr(trees.local, "tree_manager_containers")
        seen["in_tls"] = torch._C._is_key_in_tls("tree_manager_containers")
        seen["container"] = trees.get_container(0).device_index

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert seen == {"before": False, "after": True, "in_tls": True, "container": 0}


class _VaePipe(_Pipe):
    def __init__(self, transformer):
        from fluxserve.engine import random_weights

        super().__init__(transformer)
        torch.manual_seed(0)
        self.vae = random_weights.build_vae("cpu", torch.float32, random_weights.tiny_architecture("klein-4b"))


def test_vae_decoder_is_compiled_with_the_transformer_and_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_COMPILE", "1")
    monkeypatch.setenv("FLUXSERVE_CUDA_GRAPHS", "0")
    pipe = _VaePipe(_tiny_transformer())
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        eager = pipe.vae.decode(latents, return_dict=False)[0]
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert state["vae_compiled"] and pipe.vae.decoder._compiled_call_impl is not None
    assert not accel.apply_acceleration(pipe, "none", "cpu")["vae_compiled"]
    assert pipe.vae.decoder._compiled_call_impl is None

    def broken(*args, **kwargs):  # what a compiler error in the decoder's first call looks like
        raise _raised_in("/site-packages/torch/_inductor/compile_fx.py", RuntimeError("no kernel"))

    pipe.vae.decoder._fluxserve_compiled = broken
    assert accel.apply_acceleration(pipe, "regular", "cpu")["vae_compiled"]
    with torch.no_grad():
        decoded = pipe.vae.decode(latents, return_dict=False)[0]
    assert torch.equal(decoded, eager)
    state = accel.apply_acceleration(pipe, "regular", "cpu")
    assert not state["vae_compiled"] and "no kernel" in state["vae_compile_failed"]
    assert any("VAE decoder failed" in note for note in state["notes"])
