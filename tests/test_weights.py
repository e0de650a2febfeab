"""Real-weight loading, component by component, planned from the checkpoint's byte counts on disk: checked on
the demo checkpoints (the same diffusers layout and from_pretrained calls as the real ones) on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fluxserve.engine import fp8, placement, plan, weights
from fluxserve.engine.demo import demo_path
from fluxserve.engine.plan import MemoryPlan, fp8_footprint

BF16_RESIDENT = MemoryPlan("bf16", "resident")


@pytest.fixture(scope="module")
def demo_dirs(demo_settings):
    return {arch: demo_path(demo_settings.demo_dir, arch) for arch in ("dev", "klein")}


def stored_bytes(module: nn.Module) -> int:
    """Bytes of what a checkpoint stores: parameters (tied ones once) and persistent buffers."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                total += buffer.numel() * buffer.element_size()
    return total


def generate(pipe, guidance: float) -> np.ndarray:
    return pipe(prompt="a red fox in the snow", height=64, width=96, num_inference_steps=2,
                guidance_scale=guidance, generator=torch.Generator().manual_seed(11), output_type="np").images


# ---- the plan from disk -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["dev", "klein"])
def test_checkpoint_bytes_equal_the_loaded_modules(demo_dirs, arch):
    path = demo_dirs[arch]
    on_disk = weights.checkpoint_bytes(path)
    assert set(on_disk) == {"transformer", "text_encoder", "vae"}
    dtypes = {kind for c in weights.COMPONENTS for kind, _ in weights.checkpoint_tensors(path, c).values()}
    assert dtypes & weights.FLOAT_DTYPES == {"F32"}  # the demo checkpoints are float32 (norm counters int64)
    for component in weights.COMPONENTS:
        module = weights.load_component(path, component, torch.float32, "cpu")
        assert on_disk[component] == stored_bytes(module) > 0, component
    # at a target dtype: floating tensors counted at its size, plus the FP8 footprints for the plan
    bf16 = weights.checkpoint_bytes(path, torch.bfloat16)
    for component in weights.COMPONENTS:
        loaded = weights.load_component(path, component, torch.bfloat16, "cpu")
        assert bf16[component] == stored_bytes(loaded) < on_disk[component], component
    transformer = weights.load_component(path, "transformer", torch.bfloat16, "cpu")
    shapes = placement.linear_shapes(transformer, fp8.transformer_block_filter)
    assert bf16["transformer_fp8"] == fp8_footprint(bf16["transformer"], shapes, 2) < bf16["transformer"]
    assert bf16["text_encoder_fp8"] < bf16["text_encoder"]
    # streamed: the parts outside the repeated layers plus two layers, as counted on the loaded modules
    for component in ("transformer", "text_encoder"):
        loaded = weights.load_component(path, component, torch.bfloat16, "cpu")
        stored = [(n, p.numel() * p.element_size()) for n, p in loaded.named_parameters()]
        assert bf16[f"{component}_stream"] == plan.stream_footprint(component, stored)
        assert bf16[f"{component}_stream"] <= bf16[component]


def test_component_files_prefer_the_index_and_skip_variants(tmp_path):
    tensor = {"w": torch.zeros(4, 4)}
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(tensor, folder / "diffusion_pytorch_model.fp16.safetensors")
    save_file(tensor, folder / "diffusion_pytorch_model.safetensors")
    assert [f.name for f in weights.component_files(folder)] == ["diffusion_pytorch_model.safetensors"]
    for i in (1, 2):
        save_file({f"w{i}": torch.zeros(2, 3)}, folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors")
    index = {"weight_map": {"w1": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "w2": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert len(weights.component_files(folder)) == 2
    assert weights.checkpoint_tensors(tmp_path, "transformer") == {"w1": ("F32", (2, 3)), "w2": ("F32", (2, 3))}


def test_plan_from_disk_for_the_published_sizes():
    """The numbers the GPU path plans with (dev: 64.4 GB transformer, 48 GB Mistral in bf16)."""
    gb = 10**9
    sizes = {"transformer": int(64.4 * gb), "text_encoder": 48 * gb, "vae": int(0.17 * gb)}
    h100 = placement.plan_for("cuda", sizes, free_bytes=int(79.2 * 2**30), total_bytes=int(79.6 * 2**30))
    h200 = placement.plan_for("cuda", sizes, free_bytes=int(139.5 * 2**30), total_bytes=int(139.8 * 2**30))
    assert (h100.transformer, h100.text_encoder) == ("fp8", "fp8")
    assert (h200.transformer, h200.text_encoder) == ("bf16", "resident")
    assert placement.plan_for("cpu", sizes).text_encoder == "resident"


# ---- component-wise loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "guidance"), [("dev", 2.5), ("klein-4b", 1.0)])
def test_component_loader_matches_the_whole_pipeline_loader(catalog, demo_settings, model, guidance):
    spec = catalog.models[model]
    path = demo_path(demo_settings.demo_dir, spec.demo)
    cpu = torch.device("cpu")
    reference = weights.load_pipeline(spec, path, torch.float32, demo=True)
    placement.place_pipeline(reference, cpu, torch.float32)
    expected = generate(reference, guidance)

    pipe, placed = weights.load_placed_pipeline(spec, path, cpu, torch.float32, demo=True, plan=BF16_RESIDENT)
    assert type(pipe) is type(reference)
    assert placed.as_dict()["text_encoder"] == "resident" and placed.bytes["transformer"] > 0
    assert np.array_equal(generate(pipe, guidance), expected)

    # FP8 for both: the same pipeline within FP8 rounding, the block Linears replaced
    pipe8, placed8 = weights.load_placed_pipeline(spec, path, cpu, torch.float32, demo=True,
                                                  plan=MemoryPlan("fp8", "fp8"))
    assert (placed8.transformer, placed8.text_encoder) == ("fp8", "fp8")
    assert not any(type(m) is nn.Linear and fp8.transformer_block_filter(n, m)
                   for n, m in pipe8.transformer.named_modules())
    assert fp8.has_fp8(pipe8.text_encoder) and type(pipe8.text_encoder.lm_head) is nn.Linear
    got = generate(pipe8, guidance)
    assert np.isfinite(got).all() and np.abs(got - expected).max() < 0.1

    # streamed, both (exact: it only changes where the weights wait between layers)
    pipe_s, placed_s = weights.load_placed_pipeline(spec, path, cpu, torch.float32, demo=True,
                                                    plan=MemoryPlan("stream", "stream"))
    assert (placed_s.transformer, placed_s.text_encoder) == ("stream", "stream")
    assert placement.is_streamed(pipe_s.transformer) and placement.is_streamed(pipe_s.text_encoder)
    assert np.array_equal(generate(pipe_s, guidance), expected)


def test_cpu_engine_path_stays_simple(catalog, demo_settings):
    """No plan on the CPU: the whole pipeline in float32, everything resident (today's path)."""
    spec = catalog.models["klein-4b"]
    pipe, placed = weights.load_placed_pipeline(spec, demo_path(demo_settings.demo_dir, spec.demo), "cpu",
                                                torch.float32, demo=True)
    assert placed.as_dict()["transformer"] == "float32" and placed.text_encoder == "resident"
    assert not fp8.has_fp8(pipe.transformer)
    assert set(placed.bytes) == {"transformer", "text_encoder", "vae"}
