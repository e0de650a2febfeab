"""Full-size FLUX.2 pipelines with random weights, built directly on a GPU: benchmarks without a download.

The architectures are the real ones (configs written here from the published model cards and diffusers
configs, see shared/research/flux2-model.md): the transformer of [dev], [klein] 4B and [klein] 9B, their text
encoders (Mistral-Small-3.2-24B with its Pixtral vision tower, Qwen3-4B, Qwen3-8B) and the FLUX.2 VAE. Every
module is constructed under ``torch.device(device)`` with bf16 as the default dtype, so nothing is allocated
on the CPU and nothing is ever held in float32 (the [dev] transformer alone would be 128 GB). Seeded: two
builds with the same seed on the same device give the same weights, so a baseline and fluxserve can be
compared "on the same weights" one after the other.

Random weights produce noise images; they are for timing and memory only. Tokenizers are the demo's
byte-level ones (prompts are padded to 512 tokens either way, so the sequence length is the real one).
``parameter_counts`` builds on the meta device (no memory) to count parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MODELS = ("dev", "klein-4b", "klein-9b")

TRANSFORMER_CONFIGS: dict[str, dict] = {
    "dev": {
        "num_layers": 8,
        "num_single_layers": 48,
        "num_attention_heads": 48,
        "joint_attention_dim": 15360,
        "guidance_embeds": True,
    },
    "klein-4b": {
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "joint_attention_dim": 7680,
        "guidance_embeds": False,
    },
    "klein-9b": {
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "joint_attention_dim": 12288,
        "guidance_embeds": False,
    },
}
TRANSFORMER_SHARED = {
    "patch_size": 1,
    "in_channels": 128,
    "attention_head_dim": 128,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
}

# Qwen3-4B / Qwen3-8B (klein) and Mistral-Small-3.2-24B's text model (dev).
QWEN3_CONFIGS: dict[str, dict] = {
    "klein-4b": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1_000_000,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
    },
    "klein-9b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
    },
}
MISTRAL_TEXT_CONFIG = {
    "hidden_size": 5120,
    "intermediate_size": 32768,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "rope_theta": 1_000_000_000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
PIXTRAL_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "head_dim": 64,
    "patch_size": 14,
    "image_size": 1540,
    "num_channels": 3,
    "rope_theta": 10000.0,
}


class RandomWeightsUnavailable(RuntimeError):
    """--random-weights was asked for where it cannot run (no CUDA device)."""


def check_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise RandomWeightsUnavailable(
            "--random-weights builds the full-size models (tens of GB) directly on a CUDA GPU; this run's device "
            f"is {device}. Use --demo for the tiny demo models on the CPU, or run on a machine with a GPU."
        )
    if not torch.cuda.is_available():
        raise RandomWeightsUnavailable(
            "--random-weights needs CUDA, and torch.cuda.is_available() is False; use --demo on the CPU"
        )
    return device


@contextlib.contextmanager
def _building(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(model: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16):
    from diffusers import Flux2Transformer2DModel

    _check_model(model)
    with _building(device, dtype):
        return Flux2Transformer2DModel(**TRANSFORMER_SHARED, **TRANSFORMER_CONFIGS[model]).eval()


def build_vae(device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16):
    from diffusers import AutoencoderKLFlux2

    with _building(device, dtype):
        return AutoencoderKLFlux2().eval()  # the defaults are the FLUX.2 VAE configuration


def build_text_encoder(model: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16):
    """(text_encoder, tokenizer or processor) for ``model``."""
    _check_model(model)
    from fluxserve.engine import demo

    if model == "dev":
        from transformers import (
            Mistral3Config,
            Mistral3ForConditionalGeneration,
            MistralConfig,
            PixtralVisionConfig,
            PreTrainedTokenizerFast,
        )

        # Like the demo: a fast tokenizer with the Mistral chat template (the real PixtralProcessor needs
        # torchvision; the text-encoding path the pipeline calls is the same).
        raw, _ = demo._byte_level_tokenizer(demo.MISTRAL_SPECIALS)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            padding_side="left",
            model_max_length=131072,
            chat_template=demo.MISTRAL_CHAT_TEMPLATE,
        )
        config = Mistral3Config(
            text_config=MistralConfig(
                **MISTRAL_TEXT_CONFIG,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            vision_config=PixtralVisionConfig(**PIXTRAL_VISION_CONFIG),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=2,
            multimodal_projector_bias=False,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        with _building(device, dtype):
            return Mistral3ForConditionalGeneration(config).eval(), tokenizer

    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    raw, _ = demo._byte_level_tokenizer(demo.QWEN_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="right",
        model_max_length=131072,
        chat_template=demo.QWEN_CHAT_TEMPLATE,
    )
    config = Qwen3Config(
        **QWEN3_CONFIGS[model], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with _building(device, dtype):
        return Qwen3ForCausalLM(config).eval(), tokenizer


def build_random_pipeline(
    model: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0
):
    """A full-size ``Flux2Pipeline`` / ``Flux2KleinPipeline`` with random weights, built on ``device``."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from fluxserve.engine import demo

    _check_model(model)
    device = check_device(device)
    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        transformer = build_transformer(model, device, dtype)
        text_encoder, tokenizer = build_text_encoder(model, device, dtype)
        vae = build_vae(device, dtype)
    if model == "dev":
        pipe = Flux2Pipeline(
            scheduler=demo._scheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
    else:
        pipe = Flux2KleinPipeline(
            scheduler=demo._scheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=True,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(model: str) -> dict[str, int]:
    """Parameters of each component, counted on the meta device (allocates nothing)."""
    transformer = build_transformer(model, "meta")
    text_encoder, _ = build_text_encoder(model, "meta")
    vae = build_vae("meta")
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae))
    }


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"--random-weights knows the architectures {', '.join(MODELS)}, not {model!r}")
