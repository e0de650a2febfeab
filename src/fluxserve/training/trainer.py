"""The FLUX.2 LoRA trainer: the standard flow-matching recipe of diffusers' FLUX.2 DreamBooth LoRA examples.

``train_lora(pipe, examples)`` teaches a LoRA to a loaded FLUX.2 pipeline ([dev] or [klein] base) and returns its
weights in the diffusers format that ``pipe.load_lora_weights`` and fal's ``/lora`` endpoints accept:

* every example's image is encoded once with the VAE (FLUX.2's patchified, batch-norm normalised latents) and its
  caption once with ``pipe.encode_prompt``; the training steps only run the transformer;
* a LoRA of rank ``rank`` (alpha = rank, so scale 1 means the trained strength) on the double blocks' attention
  projections and the single blocks' fused attention + MLP projections; the base stays frozen;
* each step takes one example (a seeded shuffle per pass over the data), noises its latents at a sigma drawn
  uniformly and shifted with FLUX.2's resolution-dependent schedule, and regresses the velocity
  ``noise - latents`` (mean squared error) with AdamW on the LoRA parameters only;
* /edit examples carry one to four start images: their latents go in as the reference images, exactly as the
  FLUX.2 pipelines condition editing (extra tokens after the noisy ones, time coordinates 10, 20, ...), and only
  the target is scored.

On CUDA, or with weights below float32, the step runs under bf16 autocast (on CUDA with gradient checkpointing)
and the LoRA comes back in bf16; a float32 pipeline on the CPU trains in float32. The LoRA's initial weights, the
example order, the noise and the sigmas all come from ``seed``, so on the CPU the same seed, data and arguments
give the same LoRA bit for bit. The caller's pipeline is left as it was found (a serving pipeline at
acceleration ``none``, which the engine's next request lifts again).

``save_lora`` writes the weights as safetensors, under diffusers' keys (fal's ``diffusers_lora_file``) or under
ComfyUI's FLUX.2 keys.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from fluxserve.engine.placement import is_streamed
from fluxserve.request import GenerationCancelled

if TYPE_CHECKING:
    from fluxserve.training.dataset import Example

ADAPTER = "fluxserve_training"
DOUBLE_BLOCK_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
SINGLE_BLOCK_TARGETS = ["to_qkv_mlp_proj"]
GUIDANCE = 3.5  # the guidance embedding value [dev] trains at (klein base has no guidance embedding)
SCHEDULE_STEPS = 50  # the step count FLUX.2's empirical shift is evaluated at: the base models' default
REFERENCE_TIME = 10  # the time coordinate the FLUX.2 pipelines give the first reference image (then 20, 30, ...)
TEXT_TOKENS = 512  # the caption's embedded length (the pipelines' max_sequence_length)


@dataclass
class TrainProgress:
    step: int
    total: int
    loss: float


@dataclass
class CachedExample:
    latents: torch.Tensor  # (1, C, H, W): patchified, normalised
    prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    reference: torch.Tensor | None  # packed start-image latents, one image after another (1, N, C)
    reference_ids: torch.Tensor | None

    def to(self, device: torch.device) -> CachedExample:
        return CachedExample(*(None if value is None else value.to(device) for value in
                         (self.latents, self.prompt_embeds, self.text_ids, self.reference, self.reference_ids)))


def train_lora(pipe, examples: list[Example], *, steps: int = 1000, learning_rate: float = 5e-5, rank: int = 16,
               seed: int = 0, resolution: int = 1024, on_progress: Callable[[TrainProgress], None] | None = None,
               should_cancel: Callable[[], bool] | None = None,
               offload_text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """Train a LoRA on ``examples`` (objects with ``image``, ``caption`` and ``start``) for ``steps`` steps.

    Returns the diffusers-format state dict (``transformer.<module>.lora_A.weight`` / ``lora_B``). Raises
    ``GenerationCancelled`` before the next step once ``should_cancel`` answers True. ``offload_text_encoder``:
    once the captions are embedded, the text encoder waits in host memory until the steps are done.
    """
    if not examples:
        raise ValueError("train_lora needs at least one example")
    if steps < 1 or rank < 1:
        raise ValueError("steps and rank must be positive")
    transformer = pipe.transformer
    if is_streamed(transformer):
        raise ValueError("training needs the transformer resident on the GPU (bf16 or FP8), not streamed from "
                         "host memory")
    device = next(transformer.parameters()).device
    if getattr(pipe, "_fluxserve_accel", None) is not None:
        # A serving pipeline: fused QKV would bypass the q/k/v adapters and compiled blocks cannot train. The
        # engine puts every request's own acceleration level back before it generates.
        from fluxserve.engine.accel import apply_acceleration

        apply_acceleration(pipe, "none", device)
    cached = _encode_examples(pipe, examples, resolution)
    parked = _in_host_memory(pipe.text_encoder) if offload_text_encoder else contextlib.nullcontext()
    with parked:
        return train_cached(transformer, cached, steps=steps, learning_rate=learning_rate, rank=rank, seed=seed,
                            on_progress=on_progress, should_cancel=should_cancel)


def train_cached(transformer, cached: list[CachedExample], *, steps: int, learning_rate: float, rank: int,
                 seed: int, on_progress: Callable[[TrainProgress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """The training steps of ``train_lora`` on examples already encoded (``CachedExample``): what the GPU
    benchmark times, with random latents and embeddings of the real shapes."""
    if not cached:
        raise ValueError("train_cached needs at least one example")
    device = next(transformer.parameters()).device
    cuda = device.type == "cuda"
    mixed = cuda or transformer.dtype != torch.float32  # bf16 autocast for GPUs and low-precision weights
    generator = torch.Generator().manual_seed(seed)
    if cuda:
        torch.cuda.empty_cache()
    with _training_adapter(transformer, rank, seed, gradient_checkpointing=cuda) as parameters:
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        guidance = torch.full([1], GUIDANCE, device=device) if transformer.config.guidance_embeds else None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
        order = _example_order(len(cached), generator)
        for step in range(1, steps + 1):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"training cancelled before step {step} of {steps}")
            with autocast:
                loss = _flow_matching_loss(transformer, cached[next(order)].to(device), guidance, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_progress is not None:
                on_progress(TrainProgress(step=step, total=steps, loss=float(loss.detach())))
        from peft.utils import get_peft_model_state_dict

        weights = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
        dtype = torch.bfloat16 if mixed else torch.float32
        return {f"transformer.{key}": value.detach().to("cpu", dtype).contiguous() for key, value in weights.items()}


def save_lora(state: dict[str, torch.Tensor], path: str | os.PathLike, *, format: str = "fal",
              metadata: dict[str, str] | None = None) -> None:
    """Write a LoRA as safetensors with ``metadata``: ``fal`` keeps diffusers' keys, ``comfy`` writes the same
    LoRA in ComfyUI's FLUX.2 layout (see ``comfy_state``)."""
    from safetensors.torch import save_file

    if format == "fal":
        tensors = dict(state)
    elif format == "comfy":
        tensors = comfy_state(state)
    else:
        raise ValueError(f"unknown LoRA format {format!r}: use 'fal' or 'comfy'")
    save_file({key: value.contiguous() for key, value in tensors.items()}, os.fspath(path),
              metadata={"format": "pt", **(metadata or {})})


# diffusers module -> FLUX.2's original (BFL) module, the names ComfyUI's FLUX.2 model uses
DOUBLE_BLOCK_NAMES = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                      "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                      "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
SINGLE_BLOCK_NAMES = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def comfy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA under ComfyUI's FLUX.2 keys: ``diffusion_model.`` + the original block names
    (``double_blocks.N.img_attn.proj``, ``single_blocks.N.linear1`` ...) with ``lora_A`` / ``lora_B``, as
    ComfyUI and diffusers load them. Every module is a rename of the same tensors except the separate q, k and v
    LoRAs, which FLUX.2's fused ``qkv`` layer takes as one LoRA: their A matrices stacked and their B matrices
    block-diagonal (rank 3 x rank, the same weight change exactly, and scale 1 as there is no alpha)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        modules.setdefault(module, {})[part.split(".")[0]] = value
    fused_of = {part: fused for fused, parts in FUSED_QKV.items() for part in parts}
    comfy: dict[str, torch.Tensor] = {}
    for module, pair in modules.items():
        kind, index, name = module.split(".", 2)
        if kind == "single_transformer_blocks":
            comfy.update(_renamed(pair, f"diffusion_model.single_blocks.{index}.{SINGLE_BLOCK_NAMES[name]}"))
        elif name not in fused_of:
            comfy.update(_renamed(pair, f"diffusion_model.double_blocks.{index}.{DOUBLE_BLOCK_NAMES[name]}"))
        else:
            fused = fused_of[name]
            parts = [modules.get(f"{kind}.{index}.{part}") for part in FUSED_QKV[fused]]
            if any(part is None for part in parts):
                raise ValueError(f"{module}: ComfyUI's fused qkv layer needs LoRAs on q, k and v together")
            if name == FUSED_QKV[fused][0]:
                target = f"diffusion_model.double_blocks.{index}.{fused}"
                comfy[f"{target}.lora_A.weight"] = torch.cat([part["A"] for part in parts])
                comfy[f"{target}.lora_B.weight"] = torch.block_diag(*[part["B"] for part in parts])
    return comfy


def _renamed(pair: dict[str, torch.Tensor], target: str) -> dict[str, torch.Tensor]:
    return {f"{target}.lora_{part}.weight": value for part, value in pair.items()}


def lora_parameter_count(transformer, rank: int) -> int:
    """Parameters of the LoRA ``train_lora`` adds at ``rank`` (works on a meta-device transformer)."""
    targets = _target_modules(transformer)
    return sum(rank * (module.in_features + module.out_features)
               for name, module in transformer.named_modules()
               if hasattr(module, "in_features") and any(name == t or name.endswith(f".{t}") for t in targets))


def step_bytes(transformer, *, resolution: int, rank: int, references: int = 0) -> int:
    """GPU working memory of one training step at ``resolution``² with ``references`` start images
    (``plan.training_step_bytes``)."""
    from fluxserve.engine import plan

    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    width, height = _training_size(resolution, resolution, resolution)
    tokens = (width // 16) * (height // 16) * (1 + references) + TEXT_TOKENS
    return plan.training_step_bytes(hidden=hidden, blocks=config.num_layers + config.num_single_layers,
                                    mlp_hidden=int(hidden * config.mlp_ratio), tokens=tokens,
                                    lora_parameters=lora_parameter_count(transformer, rank))


def _target_modules(transformer) -> list[str]:
    singles = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(transformer.config.num_single_layers)]
    return DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS + singles


@contextlib.contextmanager
def _training_adapter(transformer, rank: int, seed: int, *, gradient_checkpointing: bool
                      ) -> Iterator[list[torch.nn.Parameter]]:
    """Add a fresh, seeded LoRA adapter as the only active one and freeze the rest; afterwards remove it and
    put back the adapters, trainability, mode and checkpointing the transformer had."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from fluxserve.engine import fp8

    had_peft = bool(getattr(transformer, "_hf_peft_config_loaded", False))
    active = transformer.active_adapters() if had_peft else []
    trainable = {name for name, parameter in transformer.named_parameters() if parameter.requires_grad}
    was_training = transformer.training
    was_checkpointing = transformer.is_gradient_checkpointing
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=_target_modules(transformer))
    # A base held in FP8: the adapters wrap its FP8 Linears like any Linear, and those multiply through the
    # dequantised weight while training (FP8 matmuls have no backward).
    fp8_modes = [(layer, layer.mode) for layer in fp8.fp8_layers(transformer)]
    if fp8_modes:
        config._register_custom_module({fp8.FP8Linear: LoraLinear})
    for layer, mode in fp8_modes:
        if mode == "w8a8":
            layer.set_mode("weight_only")
    transformer.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")  # FP8Linear, registered above
            torch.manual_seed(seed)
            transformer.add_adapter(config, adapter_name=ADAPTER)
        transformer.set_adapter(ADAPTER)
        parameters = [parameter for name, parameter in transformer.named_parameters() if f".{ADAPTER}." in name]
        for parameter in parameters:
            parameter.requires_grad_(True)
            parameter.data = parameter.data.float()  # the optimiser keeps float32 LoRA weights under autocast
        if gradient_checkpointing and not was_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        yield parameters
    finally:
        transformer.train(was_training)
        if gradient_checkpointing and not was_checkpointing:
            transformer.disable_gradient_checkpointing()
        if ADAPTER in getattr(transformer, "peft_config", {}):
            if had_peft:
                transformer.delete_adapters(ADAPTER)
                if active:
                    transformer.set_adapter(active)
            else:
                transformer.unload_lora()
        for name, parameter in transformer.named_parameters():
            parameter.requires_grad_(name in trainable)
        for layer, mode in fp8_modes:
            layer.mode = mode  # exactly as it was


@contextlib.contextmanager
def _in_host_memory(module: torch.nn.Module) -> Iterator[None]:
    """Move ``module`` to host memory (freeing its GPU memory) and back to where it was afterwards."""
    device = next(module.parameters()).device
    module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        module.to(device)


def _example_order(count: int, generator: torch.Generator) -> Iterator[int]:
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def _flow_matching_loss(transformer, example: CachedExample, guidance: torch.Tensor | None,
                        generator: torch.Generator) -> torch.Tensor:
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu

    latents = example.latents
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    sigma = _shifted_sigma(torch.rand(1, generator=generator).item(),
                           compute_empirical_mu(latents.shape[2] * latents.shape[3], SCHEDULE_STEPS))
    noisy = Flux2Pipeline._pack_latents((1.0 - sigma) * latents + sigma * noise)
    ids = Flux2Pipeline._prepare_latent_ids(latents).to(latents.device)
    tokens = noisy.shape[1]
    if example.reference is not None:
        noisy = torch.cat([noisy, example.reference], dim=1)
        ids = torch.cat([ids, example.reference_ids], dim=1)
    prediction = transformer(
        hidden_states=noisy,
        timestep=torch.full([1], sigma, device=latents.device),
        guidance=guidance,
        encoder_hidden_states=example.prompt_embeds,
        txt_ids=example.text_ids,
        img_ids=ids,
        return_dict=False,
    )[0][:, :tokens]
    target = Flux2Pipeline._pack_latents(noise - latents)
    return torch.mean((prediction.float() - target.float()) ** 2)


def _shifted_sigma(u: float, mu: float) -> float:
    """FLUX.2's exponential time shift (the scheduler's ``time_shift``) of a uniform draw, kept inside (0, 1)."""
    u = min(max(u, 1e-3), 1.0 - 1e-3)
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


@torch.no_grad()
def _encode_examples(pipe, examples: list[Example], resolution: int) -> list[CachedExample]:
    """Latents and text embeddings of every example, computed once and kept in host memory (a step moves its
    example to the device); the encoders are not needed afterwards. Each image is asked for once, encoded and
    let go, so examples that decode on access (``training.dataset.Example``) hold one image at a time."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cached = []
    for example in examples:
        if example.caption not in embeddings:
            prompt_embeds, text_ids = pipe.encode_prompt(prompt=example.caption, device=pipe._execution_device)
            embeddings[example.caption] = (prompt_embeds.cpu(), text_ids.cpu())
        prompt_embeds, text_ids = embeddings[example.caption]
        reference = reference_ids = None
        starts = [_encode_image(pipe, start, resolution) for start in getattr(example, "starts", [])]
        if starts:  # the inputs as the pipelines give reference images: time coordinates 10, 20, ...
            reference_ids = Flux2Pipeline._prepare_image_ids(starts, scale=REFERENCE_TIME)
            reference = torch.cat([Flux2Pipeline._pack_latents(start) for start in starts], dim=1)
        cached.append(CachedExample(latents=_encode_image(pipe, example.image, resolution),
                              prompt_embeds=prompt_embeds, text_ids=text_ids, reference=reference,
                              reference_ids=reference_ids))
    return cached


def _encode_image(pipe, image: Image.Image, resolution: int) -> torch.Tensor:
    """The image at about ``resolution``² pixels (aspect kept, sides multiples of 16) as FLUX.2 latents."""
    width, height = _training_size(image.width, image.height, resolution)
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0
    vae = pipe.vae
    return pipe._encode_vae_image(tensor.to(vae.device, vae.dtype), generator=None).float().cpu()


def _training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = math.sqrt(resolution * resolution / (width * height))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)
