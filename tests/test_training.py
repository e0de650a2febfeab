"""The LoRA trainer on the demo FLUX.2 pipelines ([dev] with Mistral3, [klein] base with Qwen3): it lowers the
loss, its LoRA loads with diffusers and changes the output (scale 0 gives the base output back), it is
reproducible bit for bit, cancels within one step, conditions /edit examples on their start image, leaves the
pipeline as it found it (the engine's serving pipeline included), trains bf16 weights under autocast and a base
held in FP8, and writes fal files and ComfyUI files that diffusers loads as the same LoRA."""

from __future__ import annotations

import math
import types

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from fluxserve.request import GenerationCancelled
from fluxserve.training.trainer import TrainProgress, save_lora, train_lora

STEPS = 60
LEARNING_RATE = 3e-2  # large: the demo transformer is tiny and the test trains for few steps
RANK = 8
RESOLUTION = 64


@pytest.fixture(scope="module", params=["dev", "klein"])
def pipe(request, demo_settings):
    import diffusers

    if request.param == "dev":
        loaded = diffusers.Flux2Pipeline.from_pretrained(demo_settings.demo_dir / "dev")
    else:
        loaded = diffusers.Flux2KleinPipeline.from_pretrained(demo_settings.demo_dir / "klein", is_distilled=False)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def square(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), colour)
    image.paste((255, 255, 255), (size // 4, size // 4, size // 2, size // 2))
    return image


def examples(edit: bool = False) -> list[types.SimpleNamespace]:
    colours = {"red": (220, 30, 30), "blue": (30, 40, 200), "green": (20, 180, 60)}
    return [types.SimpleNamespace(image=square(colour), caption=f"a {name} square", name=name,
                                  starts=[square((128, 128, 128))] if edit else [])
            for name, colour in colours.items()]


def train(pipe, **overrides) -> tuple[dict[str, torch.Tensor], list[TrainProgress]]:
    progress: list[TrainProgress] = []
    arguments = {"steps": STEPS, "learning_rate": LEARNING_RATE, "rank": RANK, "resolution": RESOLUTION,
                 "seed": 7, "on_progress": progress.append, **overrides}
    return train_lora(pipe, arguments.pop("examples", examples()), **arguments), progress


@pytest.fixture(scope="module")
def trained(pipe):
    return train(pipe)


def generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt="a red square", height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images


def peft_layers(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def test_training_lowers_the_loss(pipe, trained):
    _, progress = trained
    assert [p.step for p in progress] == list(range(1, STEPS + 1))
    assert all(p.total == STEPS for p in progress)
    losses = [p.loss for p in progress]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02
    # The same seed draws the same noise and sigmas, so an untrained run is a paired baseline.
    _, frozen = train(pipe, learning_rate=0.0)
    assert sum(losses[-10:]) / 10 < sum(p.loss for p in frozen[-10:]) / 10 - 0.02


def test_lora_is_in_the_diffusers_format_and_covers_attention_and_mlp(pipe, trained):
    state, _ = trained
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in state)
    modules = {key.removeprefix("transformer.").split(".lora_")[0] for key in state}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out"} <= modules
    a = state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert a.shape[0] == RANK and a.dtype == torch.float32
    assert any(value.abs().max() > 0 for key, value in state.items() if ".lora_B." in key)  # B starts at zero


def test_lora_changes_the_output_and_scale_zero_gives_the_base(pipe, trained, tmp_path):
    state, _ = trained
    base = generate(pipe)
    assert peft_layers(pipe.transformer) == 0  # training left no adapter behind
    save_lora(state, tmp_path / "lora.safetensors")
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="trained")
    try:
        scaling = pipe.transformer.transformer_blocks[0].attn.to_q.scaling["trained"]
        assert scaling == 1.0  # alpha = rank
        with_lora = generate(pipe)
        assert (with_lora - base).abs().max() > 1e-3
        pipe.set_adapters(["trained"], [0.0])
        torch.testing.assert_close(generate(pipe), base, rtol=0, atol=1e-6)
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base)


def test_same_seed_and_data_give_the_same_lora(pipe, trained):
    state, progress = trained
    again, progress_again = train(pipe)
    assert state.keys() == again.keys()
    assert all(torch.equal(state[key], again[key]) for key in state)
    assert [p.loss for p in progress] == [p.loss for p in progress_again]
    other, _ = train(pipe, seed=8, steps=5)
    assert any(not torch.equal(other[key], state[key]) for key in state)


def test_cancel_stops_within_one_step_and_restores_the_pipeline(pipe):
    parameters = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    progress: list[TrainProgress] = []
    with pytest.raises(GenerationCancelled):
        train_lora(pipe, examples(), steps=STEPS, learning_rate=LEARNING_RATE, rank=RANK, resolution=RESOLUTION,
                   on_progress=progress.append, should_cancel=lambda: bool(progress) and progress[-1].step >= 3)
    assert progress[-1].step in (3, 4)
    assert peft_layers(pipe.transformer) == 0
    assert not pipe.transformer.training
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    after = dict(pipe.transformer.named_parameters())
    assert after.keys() == parameters.keys()
    assert all(torch.equal(after[name], value) for name, value in parameters.items())


def test_edit_examples_condition_on_the_start_image(pipe, trained):
    state, _ = trained
    edit, progress = train(pipe, examples=examples(edit=True))
    assert len(progress) == STEPS and edit.keys() == state.keys()
    assert any(not torch.equal(edit[key], state[key]) for key in state)
    shifted = examples(edit=True)
    for example in shifted:
        example.starts = [square((10, 10, 10))]
    other_start, _ = train(pipe, examples=shifted, steps=5)
    same_start, _ = train(pipe, examples=examples(edit=True), steps=5)
    assert any(not torch.equal(other_start[key], same_start[key]) for key in state)


def test_edit_examples_with_several_start_images(pipe):
    from fluxserve.training import trainer

    two = examples(edit=True)
    for example in two:
        example.starts.append(square((250, 250, 10)))
    cached = trainer._encode_examples(pipe, two, RESOLUTION)
    one = trainer._encode_examples(pipe, examples(edit=True), RESOLUTION)
    tokens = one[0].reference.shape[1]
    assert cached[0].reference.shape[1] == 2 * tokens  # the second input's tokens follow the first's
    assert cached[0].reference_ids[0, :tokens, 0].unique().tolist() == [10]  # time coordinates 10, then 20
    assert cached[0].reference_ids[0, tokens:, 0].unique().tolist() == [20]
    assert torch.equal(cached[0].reference[:, :tokens], one[0].reference)
    with_two, progress = train(pipe, examples=two, steps=5)
    with_one, _ = train(pipe, examples=examples(edit=True), steps=5)
    assert len(progress) == 5 and any(not torch.equal(with_two[key], with_one[key]) for key in with_one)


def test_fal_file_keeps_the_keys_and_metadata(trained, tmp_path):
    state, _ = trained
    save_lora(state, tmp_path / "fal.safetensors", metadata={"trigger": "a square"})
    fal = load_file(tmp_path / "fal.safetensors")
    assert fal.keys() == state.keys()
    assert all(torch.equal(fal[key], state[key]) for key in state)
    with safe_open(tmp_path / "fal.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt", "trigger": "a square"}
    with pytest.raises(ValueError, match="unknown LoRA format"):
        save_lora(state, tmp_path / "other.safetensors", format="kohya")


def test_comfy_file_is_the_same_lora_under_flux2_original_names(pipe, trained, tmp_path):
    state, _ = trained
    save_lora(state, tmp_path / "comfy.safetensors", format="comfy")
    comfy = load_file(tmp_path / "comfy.safetensors")
    assert all(key.startswith("diffusion_model.") for key in comfy)
    renames = {"single_transformer_blocks.0.attn.to_qkv_mlp_proj": "single_blocks.0.linear1",
               "single_transformer_blocks.0.attn.to_out": "single_blocks.0.linear2",
               "transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj"}
    for diffusers_name, comfy_name in renames.items():
        for part in ("A", "B"):
            assert torch.equal(comfy[f"diffusion_model.{comfy_name}.lora_{part}.weight"],
                               state[f"transformer.{diffusers_name}.lora_{part}.weight"])
    # q, k and v go into FLUX.2's fused qkv layer as one LoRA with exactly the same weight change.
    fused = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"] @ comfy[
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    separate = torch.cat([state[f"transformer.transformer_blocks.0.attn.to_{name}.lora_B.weight"]
                          @ state[f"transformer.transformer_blocks.0.attn.to_{name}.lora_A.weight"]
                          for name in "qkv"])
    torch.testing.assert_close(fused, separate)
    assert len(comfy) == len(state) - 4  # three A/B pairs became one

    save_lora(state, tmp_path / "fal.safetensors")
    outputs = []
    for name in ("fal", "comfy"):
        pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"), adapter_name=name)
        try:
            outputs.append(generate(pipe))
        finally:
            pipe.unload_lora_weights()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


def test_trains_on_the_engines_serving_pipeline_and_generation_is_unchanged(engine):
    from fluxserve.engine.accel import is_fused
    from fluxserve.request import GenerationRequest

    def image() -> bytes:
        request = GenerationRequest(model="klein-4b-base", prompt="a red square", width=64, height=64, steps=2,
                                    seed=3, safety_checker=False)
        return engine.generate(request).images[0].data

    before = image()
    pipe = engine._model("klein-4b-base").pipe
    assert is_fused(pipe.transformer)  # the regular acceleration level fuses QKV
    state = train_lora(pipe, examples(), steps=3, learning_rate=LEARNING_RATE, rank=RANK, resolution=RESOLUTION)
    # q, k and v were trained, so the fused projection did not bypass their adapters.
    assert state["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].abs().max() > 0
    assert peft_layers(pipe.transformer) == 0
    assert image() == before


def test_bf16_weights_train_under_autocast_and_give_a_bf16_lora(demo_settings, tmp_path):
    import diffusers

    pipe = diffusers.Flux2KleinPipeline.from_pretrained(demo_settings.demo_dir / "klein", is_distilled=False,
                                                        dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    progress: list[TrainProgress] = []
    state = train_lora(pipe, examples(edit=True), steps=3, learning_rate=LEARNING_RATE, rank=RANK,
                       resolution=RESOLUTION, on_progress=progress.append)
    assert len(progress) == 3 and all(math.isfinite(p.loss) for p in progress)
    assert {value.dtype for value in state.values()} == {torch.bfloat16}
    assert state["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].abs().max() > 0
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    save_lora(state, tmp_path / "bf16.safetensors")
    pipe.load_lora_weights(str(tmp_path / "bf16.safetensors"))
    assert peft_layers(pipe.transformer) > 0


def test_a_transformer_held_in_fp8_trains_and_keeps_its_fp8_layers(demo_settings):
    import diffusers

    from fluxserve.engine import fp8

    pipe = diffusers.Flux2KleinPipeline.from_pretrained(demo_settings.demo_dir / "klein", is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    assert fp8.quantize_transformer(pipe.transformer, mode="weight_only") > 0
    layers = list(fp8.fp8_layers(pipe.transformer))
    for layer in layers[::2]:
        layer.mode = "w8a8"  # as served on an FP8 GPU; FP8 matmuls have no backward
    modes = [layer.mode for layer in layers]
    state = train_lora(pipe, examples(), steps=3, learning_rate=LEARNING_RATE, rank=RANK, resolution=RESOLUTION)
    assert state["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight"].abs().max() > 0
    assert peft_layers(pipe.transformer) == 0
    assert list(fp8.fp8_layers(pipe.transformer)) == layers
    assert [layer.mode for layer in layers] == modes


def test_no_examples_and_a_streamed_transformer_are_refused(pipe):
    with pytest.raises(ValueError, match="at least one example"):
        train_lora(pipe, [])
    pipe.transformer._fluxserve_streamed = True
    try:
        with pytest.raises(ValueError, match="not streamed"):
            train_lora(pipe, examples())
    finally:
        del pipe.transformer._fluxserve_streamed


def test_offloading_the_text_encoder_trains_the_same_lora_and_puts_it_back(pipe, trained):
    state, _ = trained
    where = next(pipe.text_encoder.parameters()).device
    again, _ = train(pipe, offload_text_encoder=True)
    assert state.keys() == again.keys() and all(torch.equal(state[key], again[key]) for key in state)
    assert next(pipe.text_encoder.parameters()).device == where


def test_the_engine_says_where_training_runs(engine):
    notes = []
    state = engine.train("klein-4b-base", examples(), steps=1, learning_rate=LEARNING_RATE, rank=RANK,
                         resolution=RESOLUTION, on_note=notes.append)
    assert state and notes == ["training placement: everything in host memory on cpu"]
