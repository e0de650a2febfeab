"""The engine on the demo models (CPU, small sizes, few steps)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxserve.catalog import Catalog
from fluxserve.engine import Engine, WeightsNotFound, fp8
from fluxserve.engine.demo import demo_path
from fluxserve.engine.placement import text_encoder_filter
from fluxserve.inputs import check_references, load_image
from fluxserve.request import GenerationCancelled, GenerationRequest, InputError
from fluxserve.sizes import FAL_IMAGE_SIZES


def request(**fields) -> GenerationRequest:
    values = {"model": "dev", "prompt": "a red fox in the snow", "width": 256, "height": 192, "steps": 2,
              "seed": 7, "safety_checker": False}
    values.update(fields)
    return GenerationRequest(**values)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


# ---- catalogue and sizes ------------------------------------------------------------------------------------
DESIGN_ENDPOINTS = {
    "fal-ai/flux-2": "dev", "fal-ai/flux-2/turbo": "dev", "fal-ai/flux-2/flash": "klein-4b",
    "fal-ai/flux-2/edit": "dev", "fal-ai/flux-2/turbo/edit": "dev", "fal-ai/flux-2/flash/edit": "klein-4b",
    "fal-ai/flux-2/lora": "dev", "fal-ai/flux-2/lora/edit": "dev",
    "fal-ai/flux-2-pro": "dev", "fal-ai/flux-2-pro/edit": "dev",
    "fal-ai/flux-2-flex": "dev", "fal-ai/flux-2-flex/edit": "dev",
}


def test_catalogue_maps_every_design_endpoint(catalog: Catalog):
    for endpoint_id, model in DESIGN_ENDPOINTS.items():
        endpoint = catalog.endpoint(endpoint_id)
        assert endpoint.model == model, endpoint_id
        assert endpoint.is_edit == endpoint_id.endswith("/edit")
    assert catalog.endpoint("fal-ai/flux-2").steps == 28
    assert catalog.endpoint("fal-ai/flux-2").guidance == 2.5
    assert len(catalog.endpoint("fal-ai/flux-2/turbo").sigmas) == 8
    assert catalog.endpoint("fal-ai/flux-2/turbo").loras[0].path.endswith("flux.2-turbo-lora.safetensors")
    assert catalog.endpoint("fal-ai/flux-2-pro/edit").max_references == 9
    assert catalog.endpoint("fal-ai/flux-2-flex/edit").max_references == 10
    assert catalog.endpoint("fal-ai/flux-2-pro").expand_prompt
    for spec in catalog.models.values():
        assert spec.pipeline in ("Flux2Pipeline", "Flux2KleinPipeline")
        assert spec.demo == ("dev" if spec.pipeline == "Flux2Pipeline" else "klein")


def test_fal_size_enums():
    assert FAL_IMAGE_SIZES == {
        "square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
        "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576),
    }


# ---- demo weights through from_pretrained -------------------------------------------------------------------
def test_demo_models_load_through_from_pretrained(engine: Engine, demo_settings):
    import json

    for arch, cls in (("dev", "Flux2Pipeline"), ("klein", "Flux2KleinPipeline")):
        index = json.loads((demo_settings.demo_dir / arch / "model_index.json").read_text())
        assert index["_class_name"] == cls
    engine.load("dev")
    placement = engine.placement()
    dev = placement["models"]["dev"]
    assert dev["weights"] == str(demo_settings.demo_dir / "dev")
    assert dev["pipeline"] == "Flux2Pipeline" and dev["dtype"] == "float32" and dev["text_encoder"] == "resident"
    assert placement["device"] == "cpu"
    pipe = engine._models["dev"].pipe
    assert type(pipe.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    # 8x VAE downsampling and 2x2 patches: 1024x768 -> 64x48 = 3072 image tokens
    assert pipe.vae_scale_factor == 8
    joint = pipe.transformer.config.joint_attention_dim
    assert joint == 3 * pipe.text_encoder.config.text_config.hidden_size


# ---- generation ---------------------------------------------------------------------------------------------
def test_same_seed_same_pixels_and_different_seeds_differ(engine: Engine):
    first = engine.generate(request(seed=11))
    again = engine.generate(request(seed=11))
    other = engine.generate(request(seed=12))
    assert first.seed == 11
    assert first.images[0].data == again.images[0].data
    assert not np.array_equal(pixels(first.images[0].data), pixels(other.images[0].data))
    assert set(first.timings) == {"text_encoding", "denoising", "decoding", "safety", "encoding", "inference"}
    assert first.timings["inference"] >= first.timings["denoising"] > 0
    assert first.prompt == "a red fox in the snow"


def test_render_then_encode_images_is_generate(engine: Engine):
    """The GPU part and the encoding apart give the files ``generate`` gives, with every timing."""
    rendered = engine.render(request(seed=21, steps=1, num_images=2))
    assert len(rendered.images) == 2 and all(isinstance(image, Image.Image) for image in rendered.images)
    assert set(rendered.timings) == {"text_encoding", "denoising", "decoding", "safety"}
    assert rendered.gpu_seconds >= rendered.timings["denoising"] > 0
    split = engine.encode_images(rendered)
    whole = engine.generate(request(seed=21, steps=1, num_images=2))
    assert [image.data for image in split.images] == [image.data for image in whole.images]
    assert split.seed == whole.seed == 21 and split.prompt == whole.prompt
    assert list(split.timings) == ["text_encoding", "denoising", "decoding", "safety", "encoding", "inference"]
    assert split.timings["encoding"] > 0
    assert split.timings["inference"] == pytest.approx(rendered.gpu_seconds + split.timings["encoding"])


def test_the_encoding_pool_size_is_configurable(demo_settings, catalog):
    from fluxserve.engine.pipeline import encode_threads

    assert encode_threads(replace(demo_settings, encode_threads=3)) == 3
    assert 1 <= encode_threads(demo_settings) <= 4  # 0: one per CPU core, up to 4
    assert Engine(replace(demo_settings, encode_threads=3), catalog)._encoder._max_workers == 3


def test_seed_is_drawn_and_returned_when_missing(engine: Engine):
    result = engine.generate(request(seed=None, steps=1))
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**31
    replay = engine.generate(request(seed=result.seed, steps=1))
    assert replay.images[0].data == result.images[0].data


def test_num_images_is_one_batch(engine: Engine):
    result = engine.generate(request(model="klein-4b", num_images=3, guidance=1.0))
    assert len(result.images) == 3
    arrays = [pixels(image.data) for image in result.images]
    assert all(a.shape == (192, 256, 3) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])
    assert result.has_nsfw_concepts == [False, False, False]


def test_size_not_multiple_of_16_is_resized_to_exact(engine: Engine):
    result = engine.generate(request(width=250, height=190, steps=1))
    image = result.images[0]
    assert (image.width, image.height) == (250, 190)
    assert Image.open(io.BytesIO(image.data)).size == (250, 190)


@pytest.mark.parametrize(("model", "guidance"), [("dev", 2.5), ("klein-4b", 1.0), ("klein-4b-base", 4.0)])
def test_engine_matches_plain_diffusers_pipeline(engine: Engine, demo_settings, model, guidance):
    import diffusers

    spec = engine.catalog.models[model]
    result = engine.generate(request(model=model, steps=3, guidance=guidance, seed=5, acceleration="none"))
    kwargs = {"is_distilled": spec.distilled} if spec.pipeline == "Flux2KleinPipeline" else {}
    pipe = getattr(diffusers, spec.pipeline).from_pretrained(demo_settings.demo_dir / spec.demo, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a red fox in the snow", height=192, width=256, num_inference_steps=3,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(5), output_type="pil").images[0]
    difference = np.abs(pixels(result.images[0].data) - np.asarray(expected).astype(np.int16))
    assert difference.max() <= 1


def test_editing_with_one_and_three_references(engine: Engine, reference_image):
    one = engine.generate(request(width=None, height=None, image_urls=[reference_image(200, 136)]))
    assert (one.images[0].width, one.images[0].height) == (192, 128)  # the first reference's, in multiples of 16
    refs = [reference_image(160, 160, 1), reference_image(256, 128, 2), reference_image(96, 192, 3)]
    three = engine.generate(request(width=None, height=None, image_urls=refs))
    assert (three.images[0].width, three.images[0].height) == (160, 160)
    held = engine.generate(request(width=None, height=None, min_side=512, image_urls=[reference_image(200, 136)]))
    assert (held.images[0].width, held.images[0].height) == (752, 512)  # held to an endpoint's 512 minimum
    sized = engine.generate(request(image_urls=refs))
    assert (sized.images[0].width, sized.images[0].height) == (256, 192)
    plain = engine.generate(request(width=160, height=160))
    assert not np.array_equal(pixels(three.images[0].data), pixels(plain.images[0].data))


def test_reference_validation_names_the_field(engine: Engine, reference_image):
    with pytest.raises(InputError) as info:
        engine.generate(request(image_urls=[reference_image(128, 128), reference_image(40, 128)]))
    assert info.value.field == "image_urls[1]" and "64" in info.value.message
    with pytest.raises(InputError) as info:
        engine.generate(request(image_urls=[reference_image(64 * 9, 64)]))
    assert info.value.field == "image_urls[0]" and "aspect" in info.value.message
    with pytest.raises(InputError) as info:
        engine.generate(request(image_urls=[reference_image(64, 64)] * 11))
    assert info.value.field == "image_urls" and "at most 10" in info.value.message
    with pytest.raises(InputError) as info:
        engine.generate(request(image_urls=["/no/such/file.png"]))
    assert info.value.field == "image_urls[0]"
    with pytest.raises(InputError) as info:
        engine.generate(request(image_urls=["data:image/png;base64,bm90IGFuIGltYWdl"]))
    assert info.value.field == "image_urls[0]"


def test_reference_limits_per_endpoint(catalog: Catalog):
    big = [Image.new("RGB", (4000, 2000))] * 2  # 15.3 MP in total (1 MP = 1024x1024 pixels)
    with pytest.raises(InputError) as info:
        check_references(big, catalog.endpoint("fal-ai/flux-2/edit"))
    assert info.value.field == "image_urls" and "14 MP" in info.value.message
    check_references(big[:1], catalog.endpoint("fal-ai/flux-2/edit"))
    # 14 MP is 14 x 1024 x 1024 pixels: 14.5 million pixels (13.8 MP) pass
    check_references([Image.new("RGB", (4000, 3625))], catalog.endpoint("fal-ai/flux-2/edit"))
    small = [Image.new("RGB", (64, 64))] * 10
    check_references(small, catalog.endpoint("fal-ai/flux-2-flex/edit"))
    with pytest.raises(InputError, match="at most 9"):
        check_references(small, catalog.endpoint("fal-ai/flux-2-pro/edit"))


def test_load_image_accepts_data_uris_and_paths(reference_image):
    import base64

    path = reference_image(80, 70)
    uri = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    assert load_image(uri).size == (80, 70)
    assert load_image(path).size == (80, 70)
    assert load_image("file://" + path).mode == "RGB"


def test_progress_once_per_step_with_previews(engine: Engine):
    seen = []
    engine.generate(request(steps=5, partial_images=2), on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 for p in seen)
    assert seen[2].message == "step 3/5"
    previews = [p.preview for p in seen if p.preview is not None]
    assert len(previews) == 2
    assert all(Image.open(io.BytesIO(data)).format == "PNG" for data in previews)


def test_cancellation_stops_within_one_step(engine: Engine):
    seen = []

    def cancel_after_two() -> bool:
        return len(seen) >= 2

    with pytest.raises(GenerationCancelled):
        engine.generate(request(steps=6), on_progress=seen.append, should_cancel=cancel_after_two)
    assert [p.step for p in seen] == [1, 2]


def test_sigmas_pass_through(engine: Engine):
    sigmas = [1.0, 0.6509, 0.4374, 0.00031]
    seen = []
    result = engine.generate(request(steps=4, sigmas=sigmas), on_progress=seen.append)
    assert [p.total for p in seen] == [4] * 4
    default = engine.generate(request(steps=4))
    assert result.images[0].data != default.images[0].data


def test_turbo_preset_runs_on_the_demo_with_its_stand_in_lora(engine: Engine, catalog: Catalog):
    turbo = catalog.endpoint("fal-ai/flux-2/turbo")
    fields = {"model": turbo.model, "steps": turbo.steps, "sigmas": list(turbo.sigmas), "seed": 5,
              "width": 256, "height": 256}
    with_lora = engine.generate(request(loras=list(turbo.loras), **fields))
    without = engine.generate(request(**fields))
    assert pixels(with_lora.images[0].data).shape == (256, 256, 3)
    assert not np.array_equal(pixels(with_lora.images[0].data), pixels(without.images[0].data))


def test_prompt_expansion_returns_a_different_prompt(engine: Engine):
    for model in ("dev", "klein-4b"):
        result = engine.generate(request(model=model, steps=1, expand_prompt=True, seed=3))
        assert result.prompt and result.prompt != "a red fox in the snow"
        again = engine.generate(request(model=model, steps=1, expand_prompt=True, seed=3))
        assert again.prompt == result.prompt


def test_prompt_expansion_is_refused_with_a_streamed_text_encoder(demo_settings, catalog: Catalog):
    """Generating text through a text encoder streamed layer by layer would take minutes: a clear input error
    naming the field instead, while plain requests run."""
    from fluxserve.engine.pipeline import LoadedModel
    from fluxserve.engine.plan import MemoryPlan
    from fluxserve.engine.weights import load_placed_pipeline

    spec = catalog.models["klein-4b"]
    pipe, placed = load_placed_pipeline(spec, demo_path(demo_settings.demo_dir, spec.demo), "cpu", torch.float32,
                                        demo=True, plan=MemoryPlan("bf16", "stream"))
    streamed = Engine(demo_settings, catalog)
    streamed._models["klein-4b"] = LoadedModel("klein-4b", spec, pipe, "demo", placed, 0.0)
    with pytest.raises(InputError) as info:
        streamed.generate(request(model="klein-4b", steps=1, expand_prompt=True, width=64, height=64))
    assert info.value.field == "expand_prompt" and "streamed" in info.value.message
    assert streamed.generate(request(model="klein-4b", steps=1, width=64, height=64)).images


def test_generation_runs_on_the_engine_thread_whoever_calls(engine: Engine):
    import threading

    names: set[str] = set()

    def on_progress(_progress):
        names.add(threading.current_thread().name)

    def run():
        engine.generate(request(model="klein-4b", steps=2, width=64, height=64), on_progress=on_progress)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run()
    assert len(names) == 1 and next(iter(names)).startswith("engine-cpu")


def test_unknown_model_and_half_size_are_input_errors(engine: Engine):
    with pytest.raises(InputError) as info:
        engine.generate(request(model="nope"))
    assert info.value.field == "model"
    with pytest.raises(InputError) as info:
        engine.generate(request(width=256, height=None))
    assert info.value.field == "height"


def test_safety_and_output_format(engine: Engine):
    result = engine.generate(request(steps=1, safety_checker=True, output_format="jpeg"))
    assert result.images[0].content_type == "image/jpeg"
    assert Image.open(io.BytesIO(result.images[0].data)).format == "JPEG"
    assert result.has_nsfw_concepts == [False] or result.has_nsfw_concepts == [True]
    assert result.timings["safety"] > 0


# ---- missing weights -------------------------------------------------------------------------------------------
def test_missing_local_weights_error_says_where_and_how(demo_settings, catalog, tmp_path):
    settings = replace(demo_settings, demo=False)
    spec = replace(catalog.models["dev"], weights=str(tmp_path / "no-such-model"))
    engine = Engine(settings, replace(catalog, models={**catalog.models, "dev": spec}))
    with pytest.raises(WeightsNotFound) as info:
        engine.load("dev")
    message = str(info.value)
    assert "'dev'" in message and str(tmp_path / "no-such-model") in message
    assert "catalog" in message and "--demo" in message


def test_missing_hub_weights_error_offline(demo_settings, catalog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    settings = replace(demo_settings, demo=False, hf_token="")
    spec = replace(catalog.models["klein-4b"], weights="fluxserve-tests/no-such-model")
    engine = Engine(settings, replace(catalog, models={**catalog.models, "klein-4b": spec}))
    with pytest.raises(WeightsNotFound) as info:
        engine.load("klein-4b")
    message = str(info.value)
    assert "'klein-4b'" in message and "fluxserve-tests/no-such-model" in message
    assert "HF_TOKEN" in message and "HF_HUB_OFFLINE" in message and "cache" in message


# ---- placement ----------------------------------------------------------------------------------------------------
def test_fp8_text_encoder_on_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(4, 32)
    expected = model(x)
    assert fp8.quantize_linears(model, include=text_encoder_filter, granularity="row", mode="weight_only") == 2
    assert all(b.dtype == torch.float8_e4m3fn for name, b in model.named_buffers() if name.endswith("weight_fp8"))
    got = model(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.05, rtol=0.05)
    assert not torch.equal(got, expected)


def test_preview_is_the_clean_estimate(engine: Engine):
    from fluxserve.engine import decode

    engine.load("klein-4b")
    pipe = engine._models["klein-4b"].pipe
    torch.manual_seed(0)
    before, after = torch.randn(1, 16 * 12, 128), torch.randn(1, 16 * 12, 128)
    # with sigma_next = 0 the Euler step lands on the clean image: the preview decodes `after` itself
    preview = decode.preview_from_step(pipe, before, after, 0.4, 0.0, 192, 256)
    final = decode.decode(pipe, decode.vae_latents(pipe, after, 192, 256))[0]
    assert preview.size == final.size == (256, 192)
    assert np.abs(np.asarray(preview).astype(int) - np.asarray(final).astype(int)).max() <= 1


def test_serving_devices_one_engine_per_device(demo_settings, catalog: Catalog):
    from fluxserve.engine import engines_for, serving_devices

    assert serving_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert serving_devices("") == (["cpu"] if not torch.cuda.is_available() else
                                   [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    engines = engines_for(replace(demo_settings, device="cpu,cpu"), catalog)
    assert [str(engine.device) for engine in engines] == ["cpu", "cpu"]
