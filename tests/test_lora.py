"""Per-request LoRAs on a real (tiny) Flux2Pipeline: they change the output, combine, honour their scale,
leave no trace afterwards, are cached by content hash, are downloaded once over real HTTP, and anything
that is not safetensors is refused with the field name."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

from fluxserve.engine.lora import applied_loras, resolve_lora
from fluxserve.request import InputError, LoraSpec

pytestmark = pytest.mark.usefixtures("loopback_fetches")  # the test servers run on 127.0.0.1

ATTENTION = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn.add_v_proj"]
EVERYWHERE = ATTENTION + ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.linear_in",
                          "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                          "single_transformer_blocks.0.attn.to_out"]


def write_lora(path: Path, transformer: torch.nn.Module, seed: int, modules: list[str] = EVERYWHERE,
               rank: int = 4) -> Path:
    """A LoRA in the diffusers/PEFT key format ``transformer.<module>.lora_A.weight``, random but strong."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        layer = transformer.get_submodule(name)
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def peft_layers(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


@pytest.fixture(scope="module")
def pipe():
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, sample_size=32,
    )
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)


def generate(pipe) -> torch.Tensor:
    embeds = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, height=16, width=16, num_inference_steps=2, guidance_scale=2.5,
                    generator=torch.Generator().manual_seed(2), output_type="latent").images


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"a": write_lora(root / "a.safetensors", pipe.transformer, seed=10),
            "b": write_lora(root / "b.safetensors", pipe.transformer, seed=11)}


def test_no_loras_is_a_no_op(pipe, tmp_path: Path):
    base = generate(pipe)
    with applied_loras(pipe, [], tmp_path) as names:
        assert names == []
        assert torch.equal(generate(pipe), base)
    assert not (tmp_path / "loras").exists()


def test_lora_changes_the_output_and_leaves_no_trace(pipe, loras, tmp_path: Path):
    base = generate(pipe)
    with applied_loras(pipe, [LoraSpec(path=str(loras["a"]), scale=1.0)], tmp_path) as names:
        assert len(names) == 1 and pipe.get_active_adapters() == names
        with_lora = generate(pipe)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert torch.equal(generate(pipe), base)  # the next request sees the untouched model
    assert peft_layers(pipe.transformer) == 0
    # and the same LoRA applied again reproduces its own output
    with applied_loras(pipe, [LoraSpec(path=str(loras["a"]))], tmp_path):
        assert torch.equal(generate(pipe), with_lora)


def test_two_loras_at_once_with_their_scales(pipe, loras, tmp_path: Path):
    base = generate(pipe)
    outputs = {}
    for label, specs in {
        "a": [LoraSpec(path=str(loras["a"]))],
        "b": [LoraSpec(path=str(loras["b"]))],
        "ab": [LoraSpec(path=str(loras["a"])), LoraSpec(path=str(loras["b"]), scale=0.5)],
        "a0": [LoraSpec(path=str(loras["a"]), scale=0.0)],
    }.items():
        with applied_loras(pipe, specs, tmp_path) as names:
            assert len(names) == len(specs)
            outputs[label] = generate(pipe)
    assert not torch.allclose(outputs["ab"], outputs["a"], atol=1e-3)
    assert not torch.allclose(outputs["ab"], outputs["b"], atol=1e-3)
    assert torch.allclose(outputs["a0"], base, atol=1e-6)  # scale 0 is no LoRA
    assert torch.equal(generate(pipe), base)


def test_same_file_twice_is_allowed(pipe, loras, tmp_path: Path):
    base = generate(pipe)
    with applied_loras(pipe, [LoraSpec(path=str(loras["a"])), LoraSpec(path=str(loras["a"]))], tmp_path) as names:
        assert len(set(names)) == 2
    assert torch.equal(generate(pipe), base)


def test_not_safetensors_is_refused_with_the_field(pipe, loras, tmp_path: Path):
    pickled = tmp_path / "sneaky.safetensors"  # the name lies: it is a pickle
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, pickled)
    text = tmp_path / "page.safetensors"
    text.write_text("<html>not a model</html>")
    base = generate(pipe)
    for bad in (pickled, text):
        specs = [LoraSpec(path=str(loras["a"])), LoraSpec(path=str(bad))]
        with pytest.raises(InputError) as info, applied_loras(pipe, specs, tmp_path):
            pass
        assert info.value.field == "loras[1].path"
        assert "not a safetensors file" in info.value.message
    assert peft_layers(pipe.transformer) == 0
    assert torch.equal(generate(pipe), base)


def test_missing_file_and_bad_scheme(tmp_path: Path):
    with pytest.raises(InputError) as info:
        resolve_lora(str(tmp_path / "nope.safetensors"), tmp_path, "loras[0].path")
    assert info.value.field == "loras[0].path" and "no such file" in info.value.message
    with pytest.raises(InputError, match="unsupported LoRA location"):
        resolve_lora("ftp://example.com/x.safetensors", tmp_path, "loras[0].path")
    with pytest.raises(InputError, match="hf://owner/repo/path"):
        resolve_lora("hf://owner/repo", tmp_path, "loras[0].path")


def test_hf_reference_offline_says_why(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as info:
        resolve_lora("hf://fal/FLUX.2-dev-Turbo/flux.2-turbo-lora.safetensors", tmp_path, "loras[2].path")
    assert info.value.field == "loras[2].path"
    assert "not in the local cache" in info.value.message


def test_lora_that_does_not_fit_the_model_is_an_input_error(pipe, tmp_path: Path):
    wrong = tmp_path / "other-model.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 999),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4)}, str(wrong))
    base = generate(pipe)
    with pytest.raises(InputError) as info, applied_loras(pipe, [LoraSpec(path=str(wrong))], tmp_path):
        pass
    assert info.value.field == "loras[0].path"
    assert peft_layers(pipe.transformer) == 0
    assert torch.equal(generate(pipe), base)


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    counts: ClassVar[dict[str, int]] = {}

    def do_GET(self):
        CountingHandler.counts[self.path] = CountingHandler.counts.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    CountingHandler.counts = {}

    def handler(*args, **kwargs):
        return CountingHandler(*args, directory=str(served), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_lora_downloads_once_then_comes_from_the_cache(pipe, loras, file_server, tmp_path: Path):
    served, base_url = file_server
    (served / "style.safetensors").write_bytes(loras["a"].read_bytes())
    url = f"{base_url}/style.safetensors"
    cache = tmp_path / "cache"

    first = resolve_lora(url, cache, "loras[0].path")
    second = resolve_lora(url, cache, "loras[0].path")
    assert CountingHandler.counts == {"/style.safetensors": 1}
    assert first == second
    assert first.path.parent == cache / "loras" and first.path.name == f"{first.sha256}.safetensors"
    assert first.sha256 == resolve_lora(str(loras["a"]), cache, "loras[0].path").sha256  # content identity

    with applied_loras(pipe, [LoraSpec(path=str(loras["a"]))], cache):
        local_output = generate(pipe)
    with applied_loras(pipe, [LoraSpec(path=url)], cache):
        url_output = generate(pipe)
    assert torch.equal(url_output, local_output)
    assert CountingHandler.counts == {"/style.safetensors": 1}


def test_http_errors_and_non_safetensors_downloads(file_server, tmp_path: Path):
    served, base_url = file_server
    (served / "page.safetensors").write_text("<!doctype html><html><body>login required</body></html>")
    with pytest.raises(InputError) as info:
        resolve_lora(f"{base_url}/missing.safetensors", tmp_path, "loras[0].path")
    assert info.value.field == "loras[0].path" and "HTTP 404" in info.value.message
    with pytest.raises(InputError) as info:
        resolve_lora(f"{base_url}/page.safetensors", tmp_path, "loras[1].path")
    assert info.value.field == "loras[1].path" and "not a safetensors file" in info.value.message
    assert list((tmp_path / "loras").glob("*.safetensors")) == []  # nothing half-downloaded is kept
    assert list((tmp_path / "loras").glob(".download-*")) == []


# ---- through the engine, on the demo [dev] pipeline ----------------------------------------------------------
def engine_pixels(engine, **fields):
    import io

    import numpy as np
    from PIL import Image

    from fluxserve.request import GenerationRequest

    request = GenerationRequest(model="dev", prompt="a lighthouse at dusk", width=64, height=64, steps=2, seed=5,
                                safety_checker=False, **fields)
    result = engine.generate(request)
    return [np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")) for image in result.images]


def test_engine_applies_and_removes_a_lora(engine, demo_settings, tmp_path: Path):
    import numpy as np
    from diffusers import Flux2Transformer2DModel

    demo_transformer = Flux2Transformer2DModel.from_pretrained(demo_settings.demo_dir / "dev", subfolder="transformer")
    # Attention-only on purpose: it must still apply when the engine's acceleration fuses Q/K/V projections.
    attention = write_lora(tmp_path / "attn.safetensors", demo_transformer, seed=3, modules=ATTENTION)
    everywhere = write_lora(tmp_path / "all.safetensors", demo_transformer, seed=4)

    base = engine_pixels(engine)
    for path in (attention, everywhere):
        with_lora = engine_pixels(engine, loras=[LoraSpec(path=str(path), scale=1.0)])
        assert not np.array_equal(with_lora[0], base[0]), path.name
        assert np.array_equal(engine_pixels(engine)[0], base[0])  # removed completely afterwards
    both = engine_pixels(engine, loras=[LoraSpec(path=str(attention)), LoraSpec(path=str(everywhere))])
    assert not np.array_equal(both[0], base[0])
    assert np.array_equal(engine_pixels(engine, loras=[LoraSpec(path=str(everywhere), scale=0.0)])[0], base[0])
    assert np.array_equal(engine_pixels(engine)[0], base[0])


def test_engine_rejects_a_pickled_lora_with_the_field(engine, tmp_path: Path):
    pickled = tmp_path / "model.safetensors"
    torch.save({"weight": torch.zeros(2)}, pickled)
    with pytest.raises(InputError) as info:
        engine_pixels(engine, loras=[LoraSpec(path=str(pickled))])
    assert info.value.field == "loras[0].path"


def test_output_metadata_keeps_lora_url_secrets_out(engine, demo_settings, file_server, tmp_path: Path):
    """A signed LoRA URL's token (and any user:password) does not travel inside the generated image's
    parameters; the URL's host and path do."""
    import io

    from diffusers import Flux2Transformer2DModel
    from PIL import Image

    from fluxserve.request import GenerationRequest

    served, base_url = file_server
    demo_transformer = Flux2Transformer2DModel.from_pretrained(demo_settings.demo_dir / "dev", subfolder="transformer")
    write_lora(served / "style.safetensors", demo_transformer, seed=7)
    url = base_url.replace("http://", "http://user:pw-secret@") + "/style.safetensors?token=sig-secret#frag"
    result = engine.generate(GenerationRequest(model="dev", prompt="a lighthouse", width=64, height=64, steps=1,
                                               seed=1, safety_checker=False, loras=[LoraSpec(path=url)]))
    parameters = Image.open(io.BytesIO(result.images[0].data)).info["parameters"]
    assert f"{base_url}/style.safetensors" in parameters
    assert "secret" not in parameters and "token" not in parameters
