"""The memory plan: where each part of a model goes on one GPU, and in which precision.

A pure function of byte counts (``plan_memory``), so ``fluxserve plan`` can answer "what fits where" without a
GPU, and the engine makes the very same decision from ``memory.free_gpu_bytes`` before it allocates anything.

The transformer is held in one of:

* ``bf16``: resident in bf16, the reference; every acceleration level runs on it.
* ``fp8``: resident with its block Linears in FP8 (e4m3, row scales; embedders, modulation and the output
  projection stay bf16): half the bytes. Every level then runs real FP8 matmuls where the GPU has them (Ada,
  Hopper and later), rather than dequantising the weights at every step; elsewhere the weights are dequantised.
* ``stream``: bf16 in host memory, moved to the GPU block by block for each step (the next block is copied
  while the current one runs): lossless, slow (the whole transformer crosses PCIe at every step); the last
  resort for GPUs too small to hold it.

The text encoder, used once per new prompt (the prompt cache hides repeats), is held ``resident`` (bf16),
``fp8`` (weight-only FP8: its Linears upcast in forward) or ``stream`` (host memory, layer by layer, only the
layers the pipeline reads). A streamed text encoder cannot expand prompts at a usable speed (generation would
stream the whole model for every token), so a model placed that way refuses prompt expansion.

The candidates are tried in order and the first that fits (bytes + ``headroom_bytes`` of working memory <= free)
is chosen. With FP8 matmuls: everything bf16; FP8 text encoder; FP8 transformer and text encoder; bf16
transformer with a streamed text encoder; FP8 transformer with a streamed text encoder; both streamed. Without
FP8 matmuls a bf16 transformer with a streamed text encoder comes before the FP8 transformer, whose weights
would otherwise be dequantised at every step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

GIB = 1024**3

TRANSFORMER_PLACEMENTS = ("bf16", "fp8", "stream")
TEXT_ENCODER_PLACEMENTS = ("resident", "fp8", "stream")
TRANSFORMER_CHOICES = ("auto", *TRANSFORMER_PLACEMENTS)
TEXT_ENCODER_CHOICES = ("auto", *TEXT_ENCODER_PLACEMENTS)

ORDER_WITH_FP8_MATMUL: tuple[tuple[str, str], ...] = (
    ("bf16", "resident"),
    ("bf16", "fp8"),
    ("fp8", "fp8"),
    ("bf16", "stream"),
    ("fp8", "stream"),
    ("stream", "stream"),
)
ORDER_WITHOUT_FP8_MATMUL: tuple[tuple[str, str], ...] = (
    ("bf16", "resident"),
    ("bf16", "fp8"),
    ("bf16", "stream"),
    ("fp8", "fp8"),
    ("fp8", "stream"),
    ("stream", "stream"),
)

# The repeated layers that streaming moves one at a time, by tensor name (module parameters and checkpoint
# tensors are named alike): the transformer's double- and single-stream blocks; the text encoder's decoder
# layers (``model.layers.N`` in Qwen3, ``model.language_model.layers.N`` in Mistral3), not its vision tower.
LAYER_PATTERNS = {
    "transformer": re.compile(r"^((?:single_)?transformer_blocks\.\d+)\."),
    "text_encoder": re.compile(r"^(?!.*vision)(.*?\blayers\.\d+)\."),
}


class DoesNotFit(RuntimeError):
    """No placement of the model fits the GPU; the message says what it would need."""


def headroom_bytes(total_bytes: int) -> int:
    """Working memory kept free for activations, attention and the VAE decode: max(4 GiB, 8% of the GPU)."""
    return max(4 * GIB, int(0.08 * total_bytes))


def fp8_footprint(bf16_bytes: int, linear_shapes: Iterable[tuple[int, int]], element_size: int = 2) -> int:
    """Bytes of a component after its Linears of ``linear_shapes`` ((out, in) each) are held in FP8 with row
    scales: one byte per weight plus two float32 scales per output row, instead of ``element_size`` bytes."""
    total = bf16_bytes
    for out_features, in_features in linear_shapes:
        total -= out_features * in_features * (element_size - 1)
        total += 8 * out_features
    return total


def stream_footprint(component: str, named_bytes: Iterable[tuple[str, int]]) -> int:
    """GPU bytes of a streamed component: everything outside its repeated layers stays on the GPU while it
    runs, plus two layers (the one running and the next being copied)."""
    pattern = LAYER_PATTERNS[component]
    total = 0
    layers: dict[str, int] = {}
    for name, size in named_bytes:
        total += size
        match = pattern.match(name)
        if match:
            layers[match.group(1)] = layers.get(match.group(1), 0) + size
    if not layers:
        return total
    return min(total, total - sum(layers.values()) + 2 * max(layers.values()))


@dataclass(frozen=True)
class Option:
    """One candidate placement and what it needs (headroom included)."""

    transformer: str
    text_encoder: str
    needed_bytes: int
    fits: bool

    def describe(self) -> str:
        return describe(self.transformer, self.text_encoder)

    def as_dict(self) -> dict:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder,
                "needed_gib": round(self.needed_bytes / GIB, 2), "fits": self.fits, "summary": self.describe(),
                "trade_off": trade_off(self.transformer, self.text_encoder)}


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen placement, the memory it was chosen from, and every candidate considered."""

    transformer: str  # bf16 | fp8 | stream
    text_encoder: str  # resident | fp8 | stream
    needed_bytes: int = 0
    free_bytes: int = 0
    reserve_bytes: int = 0
    options: tuple[Option, ...] = field(default=())

    def describe(self) -> str:
        return describe(self.transformer, self.text_encoder)

    def as_dict(self) -> dict:
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "summary": self.describe(),
            "needed_gib": round(self.needed_bytes / GIB, 2),
            "free_gib": round(self.free_bytes / GIB, 2),
            "headroom_gib": round(self.reserve_bytes / GIB, 2),
            "options": [option.as_dict() for option in self.options],
        }


def describe(transformer: str, text_encoder: str) -> str:
    """E.g. "transformer FP8, text encoder streamed" ("streamed": kept in host memory, moved in per layer)."""
    words = {"bf16": "bf16", "fp8": "FP8", "stream": "streamed", "resident": "bf16"}
    return f"transformer {words[transformer]}, text encoder {words[text_encoder]}"


TRADE_OFFS = {
    ("bf16", "resident"): "lossless, everything resident",
    ("bf16", "fp8"): "lossless denoising; text encoder weights in FP8",
    ("fp8", "fp8"): "FP8 weights and FP8 matmuls at every level: fastest, not lossless",
    ("bf16", "stream"): "lossless denoising; each new prompt streams the text encoder; no prompt expansion",
    ("fp8", "stream"): "FP8 transformer; each new prompt streams the text encoder; no prompt expansion",
    ("stream", "stream"): "lossless but slow: the transformer crosses PCIe at every step; no prompt expansion",
}


def trade_off(transformer: str, text_encoder: str) -> str:
    """What a placement costs, in a few words."""
    return TRADE_OFFS.get((transformer, text_encoder), "")


def component_bytes(sizes: Mapping[str, int], component: str, placement: str) -> int:
    """GPU bytes of ``component`` ("transformer" | "text_encoder") held as ``placement``."""
    if placement in ("bf16", "resident"):
        return sizes[component]
    if placement == "fp8":
        return sizes.get(f"{component}_fp8") or sizes[component] // 2
    return sizes.get(f"{component}_stream") or sizes[component]


def needed_bytes(sizes: Mapping[str, int], transformer: str, text_encoder: str, reserve_bytes: int) -> int:
    return (component_bytes(sizes, "transformer", transformer)
            + component_bytes(sizes, "text_encoder", text_encoder)
            + sizes.get("vae", 0) + reserve_bytes)


def candidates(transformer: str = "auto", text_encoder: str = "auto",
               fp8_matmul: bool = True) -> list[tuple[str, str]]:
    """The placements considered, in order of preference, honouring a forced transformer or text encoder."""
    _check_choice("transformer", transformer, TRANSFORMER_CHOICES)
    _check_choice("text encoder", text_encoder, TEXT_ENCODER_CHOICES)
    if transformer != "auto" and text_encoder != "auto":
        return [(transformer, text_encoder)]
    if transformer != "auto":
        return [(transformer, te) for te in TEXT_ENCODER_PLACEMENTS]
    if text_encoder != "auto":
        return [(t, text_encoder) for t in TRANSFORMER_PLACEMENTS]
    return list(ORDER_WITH_FP8_MATMUL if fp8_matmul else ORDER_WITHOUT_FP8_MATMUL)


def plan_memory(sizes: Mapping[str, int], *, free_bytes: int, total_bytes: int | None = None,
                reserve_bytes: int | None = None, transformer: str = "auto", text_encoder: str = "auto",
                fp8_matmul: bool = True) -> MemoryPlan:
    """Choose the placement of one model on one GPU.

    ``sizes``: bf16 bytes of ``transformer``, ``text_encoder`` and ``vae``, and the footprints
    ``transformer_fp8`` / ``text_encoder_fp8`` (``fp8_footprint``) and ``transformer_stream`` /
    ``text_encoder_stream`` (``stream_footprint``) where known (else half and the whole, respectively).
    ``reserve_bytes`` defaults to ``headroom_bytes(total_bytes or free_bytes)``. Raises ``DoesNotFit`` when no
    candidate fits, naming the smallest need."""
    reserve = headroom_bytes(total_bytes or free_bytes) if reserve_bytes is None else reserve_bytes
    options = tuple(
        Option(t, te, need, need <= free_bytes)
        for t, te in candidates(transformer, text_encoder, fp8_matmul)
        for need in [needed_bytes(sizes, t, te, reserve)]
    )
    for option in options:
        if option.fits:
            return MemoryPlan(option.transformer, option.text_encoder, option.needed_bytes, free_bytes, reserve,
                              options)
    smallest = min(options, key=lambda o: o.needed_bytes)
    forced = [f"--{flag} {value}" for flag, value in (("transformer", transformer), ("text-encoder", text_encoder))
              if value != "auto"]
    raise DoesNotFit(
        f"no placement fits {free_bytes / GIB:.1f} GiB of free GPU memory"
        + (f" with {' '.join(forced)}" if forced else "")
        + f": the smallest ({smallest.describe()}) needs {smallest.needed_bytes / GIB:.1f} GiB, "
        f"{reserve / GIB:.1f} GiB of working memory included"
    )


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} placement {value!r}: choose one of {', '.join(choices)}")


# ---- training ---------------------------------------------------------------------------------------------------
# A LoRA training job takes the whole GPU. The frozen transformer stays as it is held for serving (bf16, or FP8
# where that is how the model fits); its LoRA trains in float32 under bf16 autocast with gradient checkpointing.
# The captions are embedded once, before the first step, so the text encoder is idle during the steps: when the
# step's working memory does not fit beside it, it waits in host memory and comes back afterwards.

def training_step_bytes(*, hidden: int, blocks: int, mlp_hidden: int, tokens: int, lora_parameters: int) -> int:
    """Working memory of one LoRA training step beside the frozen weights: each block's input kept for the
    backward pass (``tokens x hidden`` bf16 a block, gradient checkpointing), one block's activations and their
    gradients while it is recomputed (about ``tokens x (8 hidden + 6 mlp_hidden)`` bf16, twice: Q/K/V, the
    attention output, the SwiGLU input and output), and the LoRA's float32 weights, gradients and two AdamW
    moments (16 bytes a parameter)."""
    kept = 2 * tokens * hidden * blocks
    block = 2 * 2 * tokens * (8 * hidden + 6 * mlp_hidden)
    return kept + block + 16 * lora_parameters


@dataclass(frozen=True)
class TrainingPlan:
    """Where a LoRA training job's parts are on one GPU."""

    transformer: str  # bf16 | fp8: the frozen base, as held for serving
    text_encoder: str  # resident | fp8 | stream: as held for serving
    offload_text_encoder: bool  # moved to host memory for the steps
    step_bytes: int
    needed_bytes: int  # transformer + VAE + step + working memory (+ the text encoder when it stays)
    free_bytes: int
    reserve_bytes: int

    def describe(self) -> str:
        words = {"bf16": "bf16", "fp8": "FP8"}
        text = f"frozen transformer {words[self.transformer]}, LoRA float32 with gradient checkpointing"
        if self.text_encoder == "stream":
            return f"{text}; text encoder streamed (in host memory during the steps)"
        if self.offload_text_encoder:
            return f"{text}; text encoder moved to host memory during the steps"
        return f"{text}; text encoder stays on the GPU"

    def as_dict(self) -> dict:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder,
                "offload_text_encoder": self.offload_text_encoder, "summary": self.describe(),
                "step_gib": round(self.step_bytes / GIB, 2), "needed_gib": round(self.needed_bytes / GIB, 2),
                "free_gib": round(self.free_bytes / GIB, 2), "headroom_gib": round(self.reserve_bytes / GIB, 2)}


def plan_training(sizes: Mapping[str, int], *, transformer: str, text_encoder: str, step_bytes: int,
                  free_bytes: int, total_bytes: int | None = None, reserve_bytes: int | None = None) -> TrainingPlan:
    """Whether a LoRA training step fits beside the model held as ``transformer`` / ``text_encoder``, and whether
    the text encoder must leave the GPU for the steps. Raises ``DoesNotFit`` (streamed transformer, or too
    little memory even with the text encoder in host memory)."""
    if transformer not in ("bf16", "fp8"):
        raise DoesNotFit("training needs the transformer resident on the GPU (bf16 or FP8); it is streamed from "
                         "host memory here (serve it with --transformer fp8 on a GPU where that fits)")
    reserve = headroom_bytes(total_bytes or free_bytes) if reserve_bytes is None else reserve_bytes
    base = component_bytes(sizes, "transformer", transformer) + sizes.get("vae", 0) + step_bytes + reserve
    encoder = 0 if text_encoder == "stream" else component_bytes(sizes, "text_encoder", text_encoder)
    offload = base + encoder > free_bytes
    if offload and base > free_bytes:
        raise DoesNotFit(
            f"training needs {base / GIB:.1f} GiB with the text encoder in host memory ({step_bytes / GIB:.1f} "
            f"GiB for the step, {reserve / GIB:.1f} GiB of working memory) and {free_bytes / GIB:.1f} GiB is free"
            + (": hold the transformer in FP8 (--transformer fp8), or train at a lower resolution"
               if transformer == "bf16" else ": train at a lower resolution"))
    return TrainingPlan(transformer, text_encoder, offload and encoder > 0, step_bytes,
                        base if offload else base + encoder, free_bytes, reserve)
