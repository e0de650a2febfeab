"""Full-size FLUX.2 pipelines with random weights: benchmarks without a download.

The architectures are the real ones (configs written here from the published model cards and diffusers
configs, see shared/research/flux2-model.md): the transformer of [dev], [klein] 4B and [klein] 9B, their text
encoders (Mistral-Small-3.2-24B with its Pixtral vision tower, Qwen3-4B, Qwen3-8B) and the FLUX.2 VAE.

Built to fit, like real weights (``placement``):

1. every module is constructed on the **meta device** (parameters only; the few small buffers such as rotary
   frequencies are computed on the CPU as usual), which allocates nothing and gives the bf16 byte counts;
2. the memory plan (``placement.plan_for`` -> ``plan.plan_memory``, with ``plan.headroom_bytes`` kept free) is
   made from those counts and the GPU's free memory (``memory.free_gpu_bytes``, under the process's GPU memory
   cap when one is set) **before** anything is allocated;
3. ``placement.place_components`` materialises each component tensor by tensor on its device; a Linear the
   plan holds in FP8 (the transformer blocks', the text encoder's except ``lm_head``) is quantised right after
   its bf16 weight is made, so the GPU never holds a whole bf16 component that is meant to be FP8. A streamed
   component is drawn on the GPU tensor by tensor, copied to pinned host memory and streamed from there.

The [dev] transformer (64 GB bf16) and Mistral (48 GB) therefore build on an 80 GB H100 as FP8 + FP8 (or, with
``--transformer bf16``, a bf16 transformer and a streamed text encoder), the same placement real weights get
there, and in bf16 everywhere on a 141 GB H200 (as FP8 + FP8 again when it is capped at 80 GiB:
``--gpu-memory-cap``).

Random initialisation (timing weights, not a trained model): every tensor with two or more dimensions
(Linear, Embedding, Conv weights) is drawn from ``normal(0, std)`` with ``std = min(0.02, fan_in ** -0.5)``
(the cap keeps activations bounded through 56 blocks); 1-D ``weight`` tensors (norm scales) are ones, biases
and other 1-D tensors zeros. Each tensor has its own generator seeded from ``(seed, component, name)``, so two
builds with the same seed give identical weights on the same device, whatever the plan and build order.
Random weights produce noise images; they are for timing and memory only. Tokenizers are the demo's
byte-level ones (prompts are padded to 512 tokens either way, so the sequence length is the real one).
``parameter_counts`` builds on the meta device (no memory) to count parameters.

Full-size builds need CUDA (``check_device``); pass small ``Architecture`` overrides to build anywhere:
``tiny_architecture(model)`` is a one-block transformer, a tiny text encoder and VAE with the real structure,
which the tests and ``benchmarks/gpu_run.py --tiny`` build on the CPU through exactly the same code.

The engine serves these builds instead of loading weights when the setting ``random_weights`` is ``full``
(``fluxserve serve --random-weights``, ``fluxserve bench --random-weights``) or ``tiny``
(``FLUXSERVE_RANDOM_WEIGHTS=tiny``: CPU checks of that path): ``build_for_model`` maps a catalogue model to its
architecture (the [klein] base models share their distilled siblings' architectures). The safety checker is off
there (``SAFETY_OFF``): its model would be a download, and the images are noise.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

MODELS = ("dev", "klein-4b", "klein-9b")
SIZES = ("full", "tiny")  # the values of the setting ``random_weights`` (empty: load weights)
SAFETY_OFF = "off with random weights (the safety model would be a download, and the images are noise)"

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


@dataclass(frozen=True)
class Architecture:
    """The constructor arguments of one model's three components (overridable: tests use tiny ones)."""

    transformer: dict  # Flux2Transformer2DModel(**transformer)
    text: dict  # Qwen3Config(**text) for klein, MistralConfig(**text) for dev
    vision: dict | None = None  # PixtralVisionConfig(**vision), dev only
    vae: dict = field(default_factory=dict)  # AutoencoderKLFlux2(**vae); {} is the FLUX.2 VAE


def architecture(model: str) -> Architecture:
    """The published full-size architecture of ``model``."""
    _check_model(model)
    if model == "dev":
        return Architecture({**TRANSFORMER_SHARED, **TRANSFORMER_CONFIGS[model]}, dict(MISTRAL_TEXT_CONFIG),
                            dict(PIXTRAL_VISION_CONFIG))
    return Architecture({**TRANSFORMER_SHARED, **TRANSFORMER_CONFIGS[model]}, dict(QWEN3_CONFIGS[model]))


# Tiny stand-ins with the same structure (``tiny_architecture``): one double and one single block of hidden
# 4 x 16 = 64, a text encoder of hidden 16 with as many layers as the pipeline reads (klein stacks hidden states
# 9/18/27 and dev 10/20/30, 3 x 16 = joint_attention_dim 48), a four-level VAE of two channels.
TINY_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 4, "joint_attention_dim": 48, "timestep_guidance_channels": 32, "mlp_ratio": 2.0,
    "axes_dims_rope": (4, 4, 4, 4),
}
TINY_VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (2, 2, 2, 2), "layers_per_block": 0, "latent_channels": 32, "norm_num_groups": 1,
    "mid_block_add_attention": False, "sample_size": 64,
}
TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "head_dim": 8, "patch_size": 8, "image_size": 64, "num_channels": 3}


def tiny_text(specials: list[str], layers: int, tied: bool) -> dict:
    """A text-encoder config of hidden 16 over the demo's byte-level vocabulary with ``specials``."""
    from fluxserve.engine.demo import _byte_level_tokenizer

    _, vocab = _byte_level_tokenizer(specials)
    return {"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 4096,
            "tie_word_embeddings": tied}


def tiny_architecture(model: str) -> Architecture:
    """A tiny architecture with the structure of ``model`` (the same module classes, the same hidden states read
    by the pipeline), small enough to build and run on a CPU in seconds: what the CPU tests and
    ``benchmarks/gpu_run.py --tiny`` build through exactly the code the full-size models go through."""
    from fluxserve.engine.demo import MISTRAL_SPECIALS, QWEN_SPECIALS

    _check_model(model)
    if model == "dev":
        return Architecture({**TINY_TRANSFORMER, "guidance_embeds": True}, tiny_text(MISTRAL_SPECIALS, 30, False),
                            vision=dict(TINY_VISION), vae=dict(TINY_VAE))
    return Architecture({**TINY_TRANSFORMER, "guidance_embeds": False}, tiny_text(QWEN_SPECIALS, 27, True),
                        vae=dict(TINY_VAE))


class RandomWeightsUnavailable(RuntimeError):
    """--random-weights was asked for where it cannot run (no CUDA device)."""


def check_setting(size: str, device: torch.device | str, demo: bool = False) -> None:
    """Refuse, before anything is built, a ``random_weights`` setting that cannot run here: an unknown value,
    ``--demo`` with it, or the full-size architectures without a CUDA GPU (``check_device``)."""
    if size not in SIZES:
        raise RandomWeightsUnavailable(f"random_weights {size!r}: choose {' or '.join(SIZES)} (or leave it empty)")
    if demo:
        raise RandomWeightsUnavailable(
            "--random-weights and --demo exclude each other: --demo already serves tiny random models")
    if size == "full":
        check_device(device)


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
    """Construct modules in ``dtype`` on ``device``; on ``"meta"`` the parameters are meta tensors and the
    buffers (rotary frequencies, norm statistics: small, computed in ``__init__``) real CPU tensors."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if torch.device(device).type == "meta":
            with torch.device("cpu"), init_empty_weights(include_buffers=False):
                yield
        else:
            with torch.device(device):
                yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(model: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16,
                      arch: Architecture | None = None):
    from diffusers import Flux2Transformer2DModel

    arch = arch or architecture(model)
    with _building(device, dtype):
        return Flux2Transformer2DModel(**arch.transformer).eval()


def build_vae(device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16, arch: Architecture | None = None):
    from diffusers import AutoencoderKLFlux2

    with _building(device, dtype):
        # {} gives the defaults, which are the FLUX.2 VAE configuration
        return AutoencoderKLFlux2(**(arch.vae if arch else {})).eval()


def build_text_encoder(model: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16,
                       arch: Architecture | None = None):
    """(text_encoder, tokenizer or processor) for ``model``."""
    arch = arch or architecture(model)
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
                **arch.text,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            vision_config=PixtralVisionConfig(**(arch.vision or PIXTRAL_VISION_CONFIG)),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=2,
            multimodal_projector_bias=False,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        with _building(device, dtype):
            text_encoder = Mistral3ForConditionalGeneration(config).eval()
        return _tied(text_encoder), tokenizer

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
        **arch.text, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with _building(device, dtype):
        text_encoder = Qwen3ForCausalLM(config).eval()
    return _tied(text_encoder), tokenizer


def _tied(model):
    """Tie the embeddings again where the config says so: on the meta device accelerate re-wraps every
    registered parameter, which breaks the tie ``post_init`` made (Qwen3-4B shares embed_tokens/lm_head)."""
    model.tie_weights()
    return model


def random_init(seed: int, component: str, std: float = 0.02, draw_on: torch.device | None = None):
    """The seeded initialiser ``place_module`` calls for each meta tensor of ``component`` (see the module
    docstring for the distribution).

    ``draw_on``: the device whose generator draws every tensor (default: the one the tensor goes to). A
    component streamed from host memory on a GPU build is drawn on the GPU and copied to pinned host memory,
    which streaming uses as it is: the GPU draws [dev]'s 24B-parameter text encoder in seconds where the CPU
    takes minutes, and its weights are the very ones a resident placement of the same build gets."""

    def draw(name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty(like.shape, dtype=like.dtype, device=device)
        if not out.is_floating_point():
            return out.zero_()
        if out.dim() >= 2:
            # 32 bits: the CPU generator (mt19937) keeps only the low 32 bits of a seed
            key = zlib.crc32(f"{seed}/{component}/{name}".encode())
            generator = torch.Generator(device=device).manual_seed(key)
            fan_in = max(1, out[0].numel())
            return out.normal_(0.0, min(std, fan_in**-0.5), generator=generator)
        return out.fill_(1.0 if name.rsplit(".", 1)[-1] == "weight" else 0.0)

    def materialise(name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        if draw_on is None or torch.device(draw_on).type == torch.device(device).type:
            return draw(name, like, device)
        drawn = draw(name, like, torch.device(draw_on))
        pinned = torch.device(device).type == "cpu" and torch.cuda.is_available()
        return torch.empty(like.shape, dtype=like.dtype, device=device, pin_memory=pinned).copy_(drawn)

    return materialise


def meta_sizes(pipe, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of each component at ``dtype`` and the FP8 footprints, from the meta build (allocates nothing)."""
    from fluxserve.engine.placement import pipeline_sizes

    return pipeline_sizes(pipe, dtype)


def build_meta_pipeline(model: str, dtype: torch.dtype = torch.bfloat16, arch: Architecture | None = None,
                        distilled: bool = True):
    """The pipeline with every parameter on the meta device: no memory, real shapes. ``distilled``: a [klein]
    pipeline of the step-distilled model (False: a base model, which runs classifier-free guidance)."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from fluxserve.engine import demo

    _check_model(model)
    arch = arch or architecture(model)
    transformer = build_transformer(model, "meta", dtype, arch)
    text_encoder, tokenizer = build_text_encoder(model, "meta", dtype, arch)
    vae = build_vae("meta", dtype, arch)
    components = {"scheduler": demo._scheduler(), "vae": vae, "text_encoder": text_encoder,
                  "tokenizer": tokenizer, "transformer": transformer}
    if model == "dev":
        pipe = Flux2Pipeline(**components)
    else:
        pipe = Flux2KleinPipeline(**components, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_placed_random_pipeline(
    model: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    *,
    requested: dict[str, str] | None = None,
    arch: Architecture | None = None,
    plan=None,
    distilled: bool = True,
):
    """``(pipe, placement)``: the pipeline with random weights, built to fit ``device``.

    The plan (``plan.MemoryPlan``) is decided from the meta build's bf16 byte counts and the device's free
    memory before anything is allocated (pass ``plan`` to force one); then every component is materialised
    where the plan puts it (``placement.place_components``). ``requested``: {"transformer": ...,
    "text_encoder": ...} choices ("auto" by default). Full-size builds (``arch`` None) need CUDA."""
    from fluxserve.engine import placement as placing

    device = torch.device(device)
    if arch is None:
        device = check_device(device)
    pipe = build_meta_pipeline(model, dtype, arch, distilled)
    sizes = meta_sizes(pipe, dtype)
    requested = requested or {"transformer": "auto", "text_encoder": "auto"}
    if plan is None:
        plan = placing.plan_for(device, sizes, requested["transformer"], requested["text_encoder"])
    placed = placing.place_components(
        pipe, device, dtype, plan, requested=requested, sizes=sizes,
        materialise=lambda component: random_init(seed, component,
                                                  draw_on=device if device.type == "cuda" else None),
    )
    return pipe, placed


def architecture_key(model_key: str) -> str:
    """The architecture a catalogue model has: its own key, or its distilled sibling's for a [klein] base
    model (``klein-4b-base`` is ``klein-4b``'s architecture, undistilled)."""
    key = model_key.removesuffix("-base")
    if key not in MODELS:
        raise RandomWeightsUnavailable(
            f"--random-weights has no architecture for the model {model_key!r}; it builds "
            f"{', '.join(MODELS)} (and their -base variants)")
    return key


def build_for_model(model_key: str, size: str, device: torch.device | str, dtype: torch.dtype,
                    requested: dict[str, str], *, distilled: bool = True, seed: int = 0):
    """``(pipe, placement)`` for catalogue model ``model_key`` as the engine serves it with the setting
    ``random_weights`` = ``size``: the published architecture (``full``, CUDA only) or its tiny stand-in
    (``tiny``), placed as ``requested`` on ``device``."""
    key = architecture_key(model_key)
    check_setting(size, device)
    arch = tiny_architecture(key) if size == "tiny" else None
    return build_placed_random_pipeline(key, device, dtype, seed, requested=requested, arch=arch,
                                        distilled=distilled)


def build_random_pipeline(
    model: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
    *, arch: Architecture | None = None,
):
    """The pipeline with random weights, everything resident at ``dtype`` (what stock diffusers holds: the
    ``--baseline diffusers`` run). Refuses, before allocating, when that does not fit the GPU."""
    from fluxserve.engine import placement as placing

    device = torch.device(device)
    if arch is None:
        device = check_device(device)
    pipe = build_meta_pipeline(model, dtype, arch)
    sizes = meta_sizes(pipe, dtype)
    plan = resident_plan(model, sizes, device)
    placing.place_components(pipe, device, dtype, plan, sizes=sizes,
                             materialise=lambda component: random_init(seed, component))
    return pipe


def resident_plan(model: str, sizes: dict[str, int], device: torch.device):
    """The plan of everything resident at the load dtype; on CUDA only where that fits the GPU memory the
    planner sees (``memory.free_gpu_bytes``: under the cap) with working memory, else
    ``RandomWeightsUnavailable`` before anything is allocated."""
    from fluxserve.engine import memory
    from fluxserve.engine.plan import MemoryPlan, headroom_bytes

    resident = sizes["transformer"] + sizes["text_encoder"] + sizes["vae"]
    if device.type != "cuda":
        return MemoryPlan("bf16", "resident", resident, 0)
    free, total = memory.free_gpu_bytes(device)
    need = resident + headroom_bytes(total)
    if need > free:
        raise RandomWeightsUnavailable(
            f"{model} with every model resident in bf16 needs {need / 2**30:.1f} GiB (headroom included); "
            f"{device} has {free / 2**30:.1f} GiB free. Stock diffusers cannot hold it here: drop "
            "--baseline diffusers (fluxserve itself places it in FP8), or use a larger GPU."
        )
    return MemoryPlan("bf16", "resident", need, free)


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
