"""Tiny random-weight FLUX.2 pipelines for demos and tests.

``build_demo_weights(directory)`` writes two pipelines with the real architectures, only tiny:

* ``dev``: ``Flux2Pipeline`` with a Mistral3 (Pixtral vision tower + Mistral text model) encoder. The real
  checkpoint pairs it with a ``PixtralProcessor``, which needs torchvision; the demo uses a fast tokenizer with
  the same Mistral chat template (what the pipeline's text encoding calls is identical);
* ``klein``: ``Flux2KleinPipeline`` with a Qwen3 causal LM encoder and a Qwen-style chat tokenizer.

Both share the FLUX.2 VAE layout (4 levels, so 8x downsampling and realistic token counts) and a one-block
transformer. Tokenizers are byte-level BPE vocabularies built locally with ``tokenizers`` (no download), with
chat templates. Everything is seeded, so two builds give identical files. They are saved with
``save_pretrained`` and loaded back with the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

DEMO_ARCHS = ("dev", "klein")
DEMO_VERSION = "1"  # bump when the demo layout changes; stale builds are rebuilt
_MARKER = "fluxserve-demo.json"

# Text encoders: hidden 16, so three stacked layers give the transformer's joint_attention_dim of 48.
TEXT_HIDDEN = 16
DEV_TEXT_LAYERS = 30  # hidden states 10, 20, 30 are stacked
KLEIN_TEXT_LAYERS = 27  # hidden states 9, 18, 27 are stacked
JOINT_ATTENTION_DIM = 3 * TEXT_HIDDEN

MISTRAL_SPECIALS = [
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in parts %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% for part in parts %}{% if part['type'] == 'image' %}[IMG]{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}[/INST]"
    "{% else %}{% for part in parts %}{{ part['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

_build_lock = threading.Lock()


def demo_path(demo_dir: Path, arch: str) -> Path:
    return Path(demo_dir) / arch


def is_built(demo_dir: Path, arch: str) -> bool:
    marker = demo_path(demo_dir, arch) / _MARKER
    try:
        return json.loads(marker.read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError):
        return False


@contextmanager
def _locked(demo_dir: Path):
    """One builder at a time: threads of this process and other processes (an advisory file lock)."""
    demo_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock, open(demo_dir / ".build.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: the thread lock alone
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_weights(demo_dir: Path, archs: tuple[str, ...] = DEMO_ARCHS) -> Path:
    """Build the demo pipelines that are missing (or stale); return ``demo_dir``."""
    demo_dir = Path(demo_dir)
    extras = (demo_dir / "safety", demo_lora_path(demo_dir))
    if all(is_built(demo_dir, arch) for arch in archs) and all(path.exists() for path in extras):
        return demo_dir
    with _locked(demo_dir):
        for arch in archs:
            if not is_built(demo_dir, arch):
                build_demo_pipeline(arch, demo_path(demo_dir, arch))
        _build_safety(demo_dir)
        _build_demo_lora(demo_dir)
    return demo_dir


def build_demo_weights(demo_dir: Path, force: bool = False) -> list[Path]:
    """Build every demo pipeline (again when ``force``); return their directories."""
    demo_dir = Path(demo_dir)
    with _locked(demo_dir):
        for arch in DEMO_ARCHS:
            if force or not is_built(demo_dir, arch):
                build_demo_pipeline(arch, demo_path(demo_dir, arch))
        _build_safety(demo_dir, force=force)
        _build_demo_lora(demo_dir, force=force)
    return [demo_path(demo_dir, arch) for arch in DEMO_ARCHS]


def _build_safety(demo_dir: Path, force: bool = False) -> None:
    from fluxserve.engine import safety

    target = demo_dir / "safety"
    if force or not target.exists():
        safety.build_demo_checker(target)


def demo_lora_path(demo_dir: Path) -> Path:
    """The demo stand-in for the catalogue's preset LoRAs (the Turbo LoRA): a LoRA for the dev demo model."""
    return Path(demo_dir) / "turbo-lora.safetensors"


def _build_demo_lora(demo_dir: Path, force: bool = False) -> None:
    """A small random LoRA on the dev demo transformer's attention, in the diffusers/PEFT key format."""
    import torch
    from safetensors.torch import save_file

    target = demo_lora_path(demo_dir)
    if target.exists() and not force:
        return
    generator = torch.Generator().manual_seed(7)
    transformer = _transformer()
    tensors = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=generator)
            tensors[f"transformer.{name}.lora_B.weight"] = 0.1 * torch.randn(layer.out_features, 2,
                                                                              generator=generator)
    staging = target.with_suffix(".tmp")
    save_file(tensors, str(staging))
    os.replace(staging, target)


def build_demo_pipeline(arch: str, target: Path) -> Path:
    """Build one tiny pipeline and save it atomically to ``target``."""
    import torch

    if arch not in DEMO_ARCHS:
        raise ValueError(f"unknown demo architecture {arch!r}; choose one of {', '.join(DEMO_ARCHS)}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            pipe = _build_dev() if arch == "dev" else _build_klein()
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / _MARKER).write_text(json.dumps({"version": DEMO_VERSION, "arch": arch}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---- components -------------------------------------------------------------------------------------
def _transformer():
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=1,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
    )


def _vae():
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(2, 2, 2, 2),
        layers_per_block=0,
        latent_channels=32,
        norm_num_groups=1,
        mid_block_add_attention=False,
        sample_size=64,
    )
    return vae


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The FLUX.2 [dev] scheduler configuration: dynamic shifting with the empirical mu from the pipeline.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )


def _byte_level_tokenizer(specials: list[str]):
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer, len(vocab)


def _build_dev():
    import torch
    from diffusers import Flux2Pipeline
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
        PreTrainedTokenizerFast,
    )

    raw, vocab_size = _byte_level_tokenizer(MISTRAL_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=131072, chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    text_config = MistralConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=DEV_TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    vision_config = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        patch_size=8, image_size=64, num_channels=3,
    )
    config = Mistral3Config(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(2)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(
        scheduler=_scheduler(), vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=_transformer(),
    )


def _build_klein():
    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    raw, vocab_size = _byte_level_tokenizer(QWEN_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="right", model_max_length=131072, chat_template=QWEN_CHAT_TEMPLATE,
    )
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=KLEIN_TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    text_encoder = Qwen3ForCausalLM(config).eval()
    return Flux2KleinPipeline(
        scheduler=_scheduler(), vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=_transformer(), is_distilled=True,
    )
