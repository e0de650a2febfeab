"""Random-weight builds: planned from the meta-device byte counts before allocating, then materialised
component by component, FP8 layers quantised as they arrive. Tiny architectures on the CPU run the same code
the full-size builds run on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxserve.engine import fp8, placement
from fluxserve.engine import random_weights as rw
from fluxserve.engine.plan import MemoryPlan

GIB = 1024**3
TINY_KLEIN = rw.tiny_architecture("klein-4b")
TINY_DEV = rw.tiny_architecture("dev")
FP8_BOTH = MemoryPlan("fp8", "fp8")
BF16_RESIDENT = MemoryPlan("bf16", "resident")


def all_tensors(pipe) -> list[tuple[str, torch.Tensor]]:
    out = []
    for component in ("transformer", "text_encoder", "vae"):
        module = getattr(pipe, component)
        out += [(f"{component}.{n}", t) for n, t in module.named_parameters()]
        out += [(f"{component}.{n}", t) for n, t in module.named_buffers()]
    return out


def generate(pipe, model: str) -> torch.Tensor:
    guidance = 2.5 if model == "dev" else 1.0
    return pipe(prompt="a lighthouse", height=64, width=64, num_inference_steps=2, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


# ---- the plan, from the meta build, before anything is allocated ------------------------------------------------
@pytest.mark.parametrize(
    ("model", "free_gib", "total_gib", "expected"),
    [
        ("dev", 79.2, 79.6, ("fp8", "fp8")),  # H100 80 GB: 64 + 48 GB bf16 does not fit (see test_plan.py)
        ("dev", 139.5, 139.8, ("bf16", "resident")),  # H200 141 GB: bf16 everywhere
        ("klein-4b", 79.2, 79.6, ("bf16", "resident")),
        ("klein-9b", 79.2, 79.6, ("bf16", "resident")),
    ],
)
def test_full_size_plan_from_the_meta_build(model, free_gib, total_gib, expected):
    pipe = rw.build_meta_pipeline(model)
    assert all(p.is_meta for _, p in pipe.transformer.named_parameters())
    assert all(p.is_meta for _, p in pipe.text_encoder.named_parameters())
    sizes = rw.meta_sizes(pipe)
    plan = placement.plan_for("cuda", sizes, free_bytes=int(free_gib * GIB), total_bytes=int(total_gib * GIB))
    assert (plan.transformer, plan.text_encoder) == expected
    assert plan.needed_bytes <= plan.free_bytes
    if model == "dev":
        assert 60 * GIB < sizes["transformer"] < 62 * GIB  # 64.4 GB
        assert 44 * GIB < sizes["text_encoder"] < 46 * GIB  # 48 GB
        # FP8 footprints count what stays bf16 (embeddings, lm_head, modulation): a little over half
        assert sizes["transformer"] // 2 < sizes["transformer_fp8"] < 0.52 * sizes["transformer"]
        assert sizes["text_encoder"] // 2 < sizes["text_encoder_fp8"] < 0.56 * sizes["text_encoder"]


# ---- materialising, tiny, on the CPU ----------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "arch"), [("klein-4b", TINY_KLEIN), ("dev", TINY_DEV)])
def test_tiny_fp8_build_is_complete_quantised_and_runs(model, arch):
    meta = rw.build_meta_pipeline(model, torch.float32, arch)
    block_linears = placement.linear_shapes(meta.transformer, fp8.transformer_block_filter)
    text_linears = placement.linear_shapes(meta.text_encoder, placement.text_encoder_filter)
    pipe, placed = rw.build_placed_random_pipeline(model, "cpu", torch.float32, seed=3, arch=arch, plan=FP8_BOTH)
    assert (placed.transformer, placed.text_encoder) == ("fp8", "fp8")
    assert placed.as_dict()["transformer"] == "fp8" and placed.bytes["transformer"] > 0
    tensors = all_tensors(pipe)
    assert tensors and [name for name, t in tensors if t.is_meta] == []
    assert all(t.device.type == "cpu" for _, t in tensors)
    # every Linear of the blocks (and of the text encoder but lm_head) is an FP8Linear, nothing else is
    quantised = [n for n, m in pipe.transformer.named_modules() if isinstance(m, fp8.FP8Linear)]
    assert len(quantised) == len(block_linears) > 0
    assert all(fp8.transformer_block_filter(n, None) for n in quantised)
    assert not any(type(m) is nn.Linear and fp8.transformer_block_filter(n, m)
                   for n, m in pipe.transformer.named_modules())
    assert type(pipe.transformer.proj_out) is nn.Linear
    te_quantised = [n for n, m in pipe.text_encoder.named_modules() if isinstance(m, fp8.FP8Linear)]
    assert len(te_quantised) == len(text_linears) > 0
    assert type(pipe.text_encoder.lm_head) is nn.Linear
    for _, layer in pipe.transformer.named_modules():
        if isinstance(layer, fp8.FP8Linear):
            assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.original is None
    if arch.text.get("tie_word_embeddings"):
        assert pipe.text_encoder.lm_head.weight is pipe.text_encoder.get_input_embeddings().weight
    image = generate(pipe, model)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all() and image.std() > 0


def test_fp8_layers_are_quantised_as_they_arrive():
    """Peak memory: while the transformer is materialised, at most one block Linear holds a full-precision
    weight (the one being made); each is replaced by its FP8 copy before the next is allocated."""
    pipe = rw.build_meta_pipeline("klein-4b", torch.float32, TINY_KLEIN)
    sizes = rw.meta_sizes(pipe, torch.float32)
    originals = [m for n, m in pipe.transformer.named_modules()
                 if type(m) is nn.Linear and fp8.transformer_block_filter(n, m)]
    held: list[int] = []

    def counting(component: str):
        init = rw.random_init(0, component)

        def materialise(name, like, device):
            if component == "transformer":  # full-precision block weights alive right now
                held.append(sum(1 for m in originals if m.weight is not None and not m.weight.is_meta))
            return init(name, like, device)

        return materialise

    placement.place_components(pipe, torch.device("cpu"), torch.float32, FP8_BOTH, sizes=sizes,
                               materialise=counting)
    assert held and max(held) <= 1
    assert all(m.weight is None for m in originals)  # released, not kept until the end of the walk
    assert fp8.has_fp8(pipe.transformer)


def test_same_seed_same_weights_and_another_seed_differs():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        pipe, _ = rw.build_placed_random_pipeline("klein-4b", "cpu", torch.float32, seed=seed, arch=TINY_KLEIN,
                                                  plan=BF16_RESIDENT)
        return {name: t.clone() for name, t in all_tensors(pipe)}

    first, second, other = weights(5), weights(5), weights(6)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    matrices = [k for k, t in first.items() if t.dim() >= 2]
    assert matrices and not any(torch.equal(first[k], other[k]) for k in matrices)
    # the documented initialisation: norms are ones, biases zeros, weights small and centred
    assert torch.equal(first["transformer.single_transformer_blocks.0.attn.norm_q.weight"],
                       torch.ones_like(first["transformer.single_transformer_blocks.0.attn.norm_q.weight"]))
    embed = first["text_encoder.model.embed_tokens.weight"]
    assert abs(float(embed.mean())) < 0.01 and 0.01 < float(embed.std()) < 0.03


@pytest.mark.parametrize(("model", "arch"), [("klein-4b", TINY_KLEIN), ("dev", TINY_DEV)])
def test_streamed_text_encoder_gives_the_same_image(model, arch):
    """A streamed text encoder (layer by layer from host memory) is the same function as a resident one."""
    resident, _ = rw.build_placed_random_pipeline(model, "cpu", torch.float32, seed=1, arch=arch,
                                                  plan=MemoryPlan("fp8", "resident"))
    streamed, placed = rw.build_placed_random_pipeline(model, "cpu", torch.float32, seed=1, arch=arch,
                                                       plan=MemoryPlan("fp8", "stream"))
    assert placed.text_encoder == "stream" and placement.is_streamed(streamed.text_encoder)
    assert not fp8.has_fp8(streamed.text_encoder) and fp8.has_fp8(streamed.transformer)
    assert torch.equal(generate(streamed, model), generate(resident, model))


def test_full_size_builds_need_cuda():
    with pytest.raises(rw.RandomWeightsUnavailable, match="--demo"):
        rw.build_placed_random_pipeline("klein-4b", "cpu")
    with pytest.raises(rw.RandomWeightsUnavailable, match="--demo"):
        rw.build_random_pipeline("dev", "cpu")


# ---- the engine serving random weights (the setting ``random_weights``) ------------------------------------------
def test_engine_builds_tiny_random_models_and_runs_no_safety_checker(tmp_path, catalog):
    """``random_weights = "tiny"``: the engine builds the catalogue model's architecture (a [klein] base model
    gets its distilled sibling's, undistilled) instead of loading weights, and never loads a safety model even
    when a request asks for the check."""
    from fluxserve.config import Settings
    from fluxserve.engine import Engine
    from fluxserve.request import GenerationRequest

    engine = Engine(Settings(data_dir=tmp_path, device="cpu", random_weights="tiny"), catalog)
    result = engine.generate(GenerationRequest(model="klein-4b-base", prompt="a lighthouse", width=64, height=64,
                                               steps=2, guidance=4.0, seed=1, safety_checker=True))
    assert len(result.images) == 1 and result.images[0].data.startswith(b"\x89PNG")
    assert result.images[0].nsfw is False and engine._safety is None
    pipe = engine._models["klein-4b-base"].pipe
    assert pipe.config.is_distilled is False and pipe.transformer.config.num_layers == 1  # the tiny stand-in
    report = engine.placement()
    assert report["random_weights"] == "tiny" and report["safety_checker"] == rw.SAFETY_OFF
    assert report["models"]["klein-4b-base"]["weights"] == "random weights (tiny klein-4b architecture, seed 0)"
    assert not (tmp_path / "cache" / "demo-weights").exists()  # nothing loaded, nothing downloaded


@pytest.mark.parametrize(("settings", "message"), [
    ({"random_weights": "full", "device": "cpu"}, "needs CUDA|device is cpu"),
    ({"random_weights": "full", "device": "cpu", "demo": True}, "exclude each other"),
    ({"random_weights": "huge", "device": "cpu"}, "choose full or tiny"),
])
def test_engine_refuses_random_weights_it_cannot_build(tmp_path, catalog, settings, message):
    from fluxserve.config import Settings
    from fluxserve.engine import Engine

    with pytest.raises(rw.RandomWeightsUnavailable, match=message):
        Engine(Settings(data_dir=tmp_path, **settings), catalog)


def test_random_weights_setting_from_flags_and_environment(monkeypatch, tmp_path):
    from fluxserve.cli import build_parser
    from fluxserve.commands.common import settings_from_args
    from fluxserve.config import Settings

    for command in ("serve", "worker"):
        args = build_parser().parse_args([command, "--random-weights", "--data-dir", str(tmp_path)])
        assert settings_from_args(args).random_weights == "full"
        assert settings_from_args(build_parser().parse_args([command])).random_weights == ""
    for raw, expected in (("1", "full"), ("on", "full"), ("tiny", "tiny"), ("0", ""), ("full", "full")):
        monkeypatch.setenv("FLUXSERVE_RANDOM_WEIGHTS", raw)
        assert Settings.from_env().random_weights == expected


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_refuse_random_weights_without_cuda(tmp_path, command):
    """On a machine without a CUDA GPU, --random-weights stops at once with one line that says why and what to
    use instead, before a port or a worker slot is taken."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fluxserve", command, "--random-weights", "--device", "cpu",
                           "--data-dir", str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: --random-weights builds the full-size models")
    assert "--demo" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "fluxserve.db").exists()
