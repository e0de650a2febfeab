"""Attention on the CPU: ``attend`` for every backend that runs here against SDPA on contiguous copies, on the
layouts the FLUX.2 blocks pass (strided v), compiled without graph breaks; the FP8 scale math through its pure-torch
emulation; the choice by measurement with injected candidates and clock (no real timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fluxserve.engine import attention, attention_choice
from fluxserve.engine.attention_choice import AttentionGeometry

CPU = torch.device("cpu")
GEOMETRY = AttentionGeometry(heads=2, head_dim=16, image_tokens=48, text_tokens=16, double_blocks=2,
                             single_blocks=3)
EXACT_ON_CPU = ("native", "sdpa_math", "sdpa_flash")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _contiguous_sdpa(q, k, v):
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _tiny_transformer():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)).eval()


def _inputs(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(8), torch.arange(8), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(6))
    return {"hidden_states": torch.randn(1, 64, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
            "timestep": torch.rand(1, generator=generator), "guidance": torch.tensor([2.5]),
            "img_ids": img_ids.unsqueeze(0), "txt_ids": txt_ids.unsqueeze(0), "return_dict": False}


@pytest.fixture(autouse=True)
def _fresh_measurements(monkeypatch):
    monkeypatch.setattr(attention_choice, "_tables", {})


# ---- attend -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", EXACT_ON_CPU)
def test_attend_matches_sdpa_on_contiguous_copies_for_both_layouts(backend, dtype):
    layouts = attention_choice.model_layouts(GEOMETRY, CPU, dtype=dtype, seed=1)
    assert not layouts["single"][2].is_contiguous()  # v: a view of the fused projection, as the blocks pass it
    for q, k, v in layouts.values():
        out = attention.attend(q, k, v, backend)
        ref = _contiguous_sdpa(q, k, v)
        assert out.shape == q.shape and out.dtype == dtype
        assert _rel(out, ref) <= (1e-6 if dtype == torch.float32 else 8e-3)
        assert _rel(out, attention_choice.reference(q, k, v)) <= attention_choice.EXACT_TOLERANCE


def test_attend_refuses_what_cannot_run_here():
    q, k, v = attention_choice.model_layouts(GEOMETRY, CPU)["single"]
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.attend(q, k, v, "warp_speed")
    with pytest.raises(RuntimeError):  # PyTorch has no CPU memory-efficient kernel
        attention.attend(q, k, v, "sdpa_efficient")
    assert attention.load_fa3() is not None  # no FlashAttention-3 build loads on this machine
    assert "fa3_fwd_interface" in attention.load_fa3() and "flash_attn_interface" in attention.load_fa3()
    with pytest.raises(RuntimeError, match="FlashAttention-3 is not loaded"):
        attention.attend(q, k, v, "fa3")


def test_every_cpu_backend_compiles_without_graph_breaks():
    outcome = attention_choice.graph_breaks(CPU, (*EXACT_ON_CPU, "fp8_emulated"))
    assert outcome == {name: "none" for name in (*EXACT_ON_CPU, "fp8_emulated")}


def _block_inputs(transformer, kwargs) -> dict[str, tuple]:
    captured: dict[str, tuple] = {}
    blocks = {"double": transformer.transformer_blocks[0], "single": transformer.single_transformer_blocks[0]}
    hooks = [block.register_forward_pre_hook(lambda _m, a, kw, name=name: captured.setdefault(name, (a, kw)),
                                             with_kwargs=True) for name, block in blocks.items()]
    with torch.no_grad():
        transformer(**kwargs)
    for hook in hooks:
        hook.remove()
    return {name: (blocks[name], *captured[name]) for name in blocks}


@pytest.mark.parametrize("backend", ["sdpa_flash", "fp8_emulated"])
def test_our_processors_compile_whole_in_both_block_kinds(backend):
    transformer = _tiny_transformer()
    stock = _block_inputs(transformer, _inputs(2))
    assert attention.install_processors(transformer, backend) == 4
    for name, (block, args, kwargs) in stock.items():
        with torch.no_grad():
            compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)(*args, **kwargs)
            eager = block(*args, **kwargs)
            attention.restore_processors(transformer)
            ref = block(*args, **kwargs)
            attention.install_processors(transformer, backend)
        for out, want in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(ref),
                             strict=True):
            assert _rel(out, want) <= (1e-5 if backend == "sdpa_flash" else attention_choice.FP8_TOLERANCE), name
        for out, want in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager),
                             strict=True):
            assert _rel(out, want) <= 1e-5, name


def test_processors_install_once_shared_and_restore():
    from test_accel import _tiny_transformer

    transformer = _tiny_transformer()
    stock = {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "set_processor")}
    assert attention.set_attention_backend(transformer, "sdpa_math") == "sdpa_math"
    assert attention.backend_of(transformer) == "sdpa_math"
    ours = [m.processor for m in transformer.modules() if hasattr(m, "set_processor")]
    assert len({id(p) for p in ours}) == 2  # one instance per block kind, so one compiled graph serves all blocks
    assert attention.set_attention_backend(transformer, "sdpa_flash") == "sdpa_flash"  # from ours to ours
    assert attention.set_attention_backend(transformer, "fa3") == "native"  # cannot load here: stock native
    assert attention.backend_of(transformer) is None
    now = {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "set_processor")}
    assert all(now[name] is processor for name, processor in stock.items())


# ---- FP8: the scale math, proven through the pure-torch kernel ---------------------------------------------------
def test_quantize_per_head_scales_each_batch_and_head_on_its_own():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 3, 16, generator=generator)
    x[0, :, 1] *= 1e5  # one loud head must not coarsen the others (one scale per tensor: 0.45 error)
    x[1, :, 2] = 0  # an all-zero head stays finite
    x8, descale = attention.quantize_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.dtype == torch.float32 and descale.shape == (2, 3)
    assert torch.equal(x8.float().abs().amax(dim=(1, 3))[descale > 1e-10],
                       torch.full((5,), attention.FP8_MAX))  # each head's largest value maps to 448
    back = x8.float() * descale[:, None, :, None]
    assert torch.isfinite(back).all() and torch.equal(back[1, :, 2], torch.zeros(64, 16))
    # e4m3: relative error <= 2^-4 for normal values, <= 2^-10 x descale absolute below them
    bound = x.abs() * 2**-4 + descale[:, None, :, None] * 2**-10
    assert ((back - x).abs() <= bound).all()
    quiet = (back[0, :, 0] - x[0, :, 0]).norm() / x[0, :, 0].norm()
    assert quiet <= 3e-2  # the loud head in the same batch row did not cost head 0 its precision


def test_fp8_emulation_is_dequantise_then_attention_and_its_error_is_fp8s():
    q, k, v = attention_choice.model_layouts(GEOMETRY, CPU, seed=4)["single"]
    q = q * 4  # sharper attention than unit-variance inputs give
    out = attention.attend(q, k, v, "fp8_emulated")
    assert out.shape == q.shape and out.dtype == q.dtype
    deq = [x8.float() * d[:, None, :, None] for x8, d in map(attention.quantize_per_head, (q, k, v))]
    assert _rel(out, _contiguous_sdpa(*deq).to(torch.bfloat16)) <= 1e-2
    error = _rel(out, attention_choice.reference(q, k, v))
    assert attention_choice.EXACT_TOLERANCE < error <= attention_choice.FP8_TOLERANCE  # lossy, within FP8's bound

    def no_descale(q8, k8, v8, *_):
        return attention.dequantized_sdpa(q8, k8, v8, *(torch.ones_like(d) for d in _))

    wrong = attention.attend_fp8(q, k, v, no_descale)  # a kernel that ignored the descale factors
    assert _rel(wrong, attention_choice.reference(q, k, v)) > attention_choice.FP8_TOLERANCE


# ---- measurement: fastest within tolerance, dropped with reasons, remembered -------------------------------------
class FakeClock:
    """Time moves only when a fake kernel runs: each call advances it by that kernel's duration."""

    def __init__(self, durations: dict[str, float]) -> None:
        self.now = 0.0
        self.durations = durations
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def run(self, q, k, v, name):
        self.calls.append(name)
        self.now += self.durations[name]
        if name == "broken":
            raise RuntimeError("no kernel image is available for execution on the device")
        out = attention.attend(q, k, v, "sdpa_math")
        return out * 1.05 if name == "wrong" else out  # 5% off: far above bf16's tolerance


def test_measurement_keeps_the_fastest_accurate_candidate_and_says_why_others_went():
    clock = FakeClock({"slow": 0.004, "fast": 0.002, "wrong": 0.001, "broken": 0.0005})
    backend, why, figures = attention_choice.choose_attention(
        CPU, GEOMETRY, ["slow", "fast", "wrong", "broken"], run=clock.run, clock=clock, warmup=2, calls=3)
    assert backend == "fast" and "fastest of 2" in why
    assert figures["fast"]["layouts"]["single"]["ms"] == pytest.approx(2.0)  # per call, from the clock
    assert figures["fast"]["ms_per_forward"] == pytest.approx(5 * 2.0)  # 2 double + 3 single blocks
    assert figures["fast"]["rel_error_vs_fp32"] <= attention_choice.EXACT_TOLERANCE
    assert "above the 0.01 tolerance" in figures["wrong"]["dropped"]
    assert "no kernel image" in figures["broken"]["skipped"] and "RuntimeError" in figures["broken"]["skipped"]
    assert clock.calls.count("slow") == 2 * (2 + 3)  # two layouts x (warmup + timed calls): bounded
    json.dumps(figures, allow_nan=False)


def test_the_choice_is_remembered_per_device_and_geometry():
    clock = FakeClock({"a": 0.003, "b": 0.001})
    first = attention_choice.choose_attention(CPU, GEOMETRY, ["a", "b"], run=clock.run, clock=clock)
    measured_calls = len(clock.calls)
    same_heads = AttentionGeometry(heads=2, head_dim=16, double_blocks=5, single_blocks=20)  # a second model
    assert attention_choice.choose_attention(CPU, same_heads, ["a", "b"], run=clock.run, clock=clock)[0] == "b"
    assert attention_choice.choose_attention(CPU, GEOMETRY, ["a", "b"], run=clock.run, clock=clock) == first
    assert len(clock.calls) == measured_calls  # nothing measured again
    other = AttentionGeometry(heads=4, head_dim=16, image_tokens=48, text_tokens=16)
    attention_choice.choose_attention(CPU, other, ["a", "b"], run=clock.run, clock=clock)
    assert len(clock.calls) == 2 * measured_calls


def test_measurement_stops_at_its_budget_and_falls_back_when_nothing_passes():
    clock = FakeClock({"a": 1.0, "b": 0.001, "broken": 0.001})
    figures = attention_choice.measure_attention(CPU, GEOMETRY, ["a", "b"], run=clock.run, clock=clock,
                                                 budget_s=5.0)
    assert "ms_per_forward" in figures["a"] and "budget was spent" in figures["b"]["skipped"]
    clock = FakeClock({"wrong": 0.001, "broken": 0.001})
    backend, why, _ = attention_choice.choose_attention(CPU, GEOMETRY, ["broken", "wrong"], run=clock.run,
                                                        clock=clock)
    assert backend == "native" and "no candidate" in why


def test_decide_never_raises_and_keeps_lossy_kernels_off_below_high(monkeypatch):
    assert attention_choice.decide(CPU, GEOMETRY, "none", forced="sdpa_math").backend == "native"
    regular = attention_choice.decide(CPU, GEOMETRY, "regular", forced="sdpa_math", fp8=True)
    assert (regular.backend, regular.fp8, regular.fp8_why) == ("sdpa_math", False, "lossy: off at regular")
    lossy = attention_choice.decide(CPU, GEOMETRY, "regular", forced="fp8_emulated")
    assert lossy.backend == "native" and "not an exact backend" in lossy.why
    off = attention_choice.decide(CPU, GEOMETRY, "high", fp8=False)
    assert off.fp8 is False and "FLUXSERVE_FP8_ATTENTION=0" in off.fp8_why
    assert "not supported on cpu" in attention_choice.decide(CPU, GEOMETRY, "high").fp8_why

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attention_choice, "model_layouts", out_of_memory)
    failed = attention_choice.decide(CPU, GEOMETRY, "regular", candidates=["a", "b"])
    assert failed.backend == "native" and "out of memory" in failed.why
    json.dumps(failed.as_dict(), allow_nan=False)


def _figures(ms: float, error: float, dropped: str | None = None) -> dict:
    entry = {"ms_per_forward": ms, "rel_error_vs_fp32": error, "layouts": {}}
    return {**entry, "dropped": dropped} if dropped else entry


def test_fp8_attention_is_on_only_when_it_ran_within_tolerance_and_is_faster():
    exact = {"sdpa_cudnn": _figures(40.0, 2e-3)}
    on, why = attention_choice.fp8_verdict({**exact, "fa3_fp8": _figures(30.0, 4e-2)}, "sdpa_cudnn", None)
    assert on and "4.00e-02" in why and "against 40.00 ms with sdpa_cudnn" in why
    on, why = attention_choice.fp8_verdict({**exact, "fa3_fp8": _figures(45.0, 4e-2)}, "sdpa_cudnn", None)
    assert not on and "slower" in why
    assert attention_choice.fp8_verdict({**exact, "fa3_fp8": _figures(45.0, 4e-2)}, "sdpa_cudnn", True)[0]
    dropped = _figures(30.0, 0.5, "error 5.00e-01 against fp32 is above the 0.1 tolerance")
    on, why = attention_choice.fp8_verdict({**exact, "fa3_fp8": dropped}, "sdpa_cudnn", True)
    assert not on and "above the 0.1 tolerance" in why
    on, why = attention_choice.fp8_verdict({"fa3_fp8": {"skipped": "raised RuntimeError: x"}}, "fa3", None)
    assert not on and "did not run" in why


# ---- what can run where, and the table for the GPU benchmark ------------------------------------------------------
def test_candidates_by_device_and_kernel_availability(monkeypatch):
    cuda = torch.device("cuda")
    assert attention_choice.attention_candidates(CPU) == ["native"]
    monkeypatch.setattr(attention, "load_fa3", lambda: None)
    monkeypatch.setattr(attention_choice, "diffusers_can_use_flash_attention_3", lambda: True)
    every = ["native", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "_native_cudnn", "fa3", "_flash_3"]
    assert attention_choice.attention_candidates(cuda, (9, 0)) == every
    assert attention_choice.attention_candidates(cuda, (8, 9)) == every[:5]  # FlashAttention-3 is Hopper's
    assert attention_choice.attention_candidates(cuda, (7, 5)) == ["native", "sdpa_efficient"]
    assert "Hopper" in attention_choice.unavailable("fa3_fp8", cuda, (8, 9))
    monkeypatch.setattr(attention, "load_fa3", lambda: "fa3_fwd_interface: ModuleNotFoundError")
    monkeypatch.setattr(attention_choice, "diffusers_can_use_flash_attention_3", lambda: False)
    assert attention_choice.attention_candidates(cuda, (9, 0)) == every[:5]
    assert "ModuleNotFoundError" in attention_choice.unavailable("fa3", cuda, (9, 0))
    assert "flash_attn_3" in attention_choice.unavailable("_flash_3", cuda, (9, 0))
    assert attention_choice.unavailable("sdpa_cudnn", CPU) == "not supported on cpu"


def test_attention_table_on_tiny_shapes_is_complete_and_json():
    table = attention_choice.attention_table(CPU, GEOMETRY, calls=2, warmup=1, compile_check=True)
    json.dumps(table, allow_nan=False)
    rows = table["backends"]
    assert set(rows) == set(attention_choice.TABLE_BACKENDS)
    for name in ("native", "sdpa_flash"):
        assert rows[name]["rel_error_vs_fp32"] <= attention_choice.EXACT_TOLERANCE
        assert rows[name]["rel_error_vs_bf16"] <= 1e-2 and rows[name]["graph_breaks"] == "none"
        assert set(rows[name]["layouts"]) == {"single", "double"}
        assert all(row["ms"] > 0 and row["tflops"] > 0 for row in rows[name]["layouts"].values())
    assert rows["fp8_emulated"]["rel_error_vs_fp32"] > attention_choice.EXACT_TOLERANCE
    assert "dropped" not in rows["fp8_emulated"]  # within FP8's tolerance
    for name in ("sdpa_cudnn", "_native_cudnn", "fa3", "_flash_3", "flash", "fa3_fp8"):
        assert rows[name] == {"skipped": "not supported on cpu"}
    report = attention_choice.fp8_attention_report(CPU, GEOMETRY, calls=1, warmup=1)
    assert set(report["backends"]) == {"fa3_fp8", "fp8_emulated", "fa3", "native"}
    assert report["decision_at_high"]["fp8"] is False and report["decision_at_high"]["fp8_why"]
