"""The output safety checker: the NSFW image classifier the official FLUX.2 CLI uses.

``Falconsai/nsfw_image_detection`` is a ViT-B/16 (224x224) ``ViTForImageClassification`` with the labels
``{0: "normal", 1: "nsfw"}``. An image is flagged when its nsfw probability exceeds the threshold of the
request's ``safety_tolerance`` (fal's scale: 1 is the strictest, 5 the most permissive):

| safety_tolerance | flagged when P(nsfw) > |
|------------------|------------------------|
| 1                | 0.50                   |
| 2 (default)      | 0.85 (the official CLI's threshold) |
| 3                | 0.93                   |
| 4                | 0.97                   |
| 5                | 0.99                   |

Flagged images are returned black (``blackout``) with ``nsfw: true``, as fal does.
``build_demo_checker`` writes a tiny random-weight model of the same architecture for tests and demos.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

DEFAULT_SAFETY_MODEL = "Falconsai/nsfw_image_detection"
THRESHOLDS: dict[int, float] = {1: 0.50, 2: 0.85, 3: 0.93, 4: 0.97, 5: 0.99}
LABELS = {0: "normal", 1: "nsfw"}
IMAGE_SIZE = 224


class SafetyModelError(RuntimeError):
    """The safety classifier's weights could not be loaded."""


def threshold(tolerance: int) -> float:
    """The nsfw probability above which an image is flagged, for ``safety_tolerance`` 1-5."""
    if tolerance not in THRESHOLDS:
        raise ValueError(f"safety_tolerance must be 1-5, got {tolerance!r}")
    return THRESHOLDS[tolerance]


def blackout(image: Image.Image) -> Image.Image:
    """A black image of the same size and mode (opaque where the mode has alpha)."""
    return Image.new(image.mode, image.size, "black")


class SafetyChecker:
    def __init__(self, model, processor, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.nsfw_index = _nsfw_index(model.config.id2label)

    @classmethod
    def load(cls, path_or_hub_id: str | Path = DEFAULT_SAFETY_MODEL, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, token: str | None = None) -> SafetyChecker:
        """Load from a local directory (``save_pretrained`` layout) or a Hugging Face hub id."""
        from transformers import AutoImageProcessor, ViTForImageClassification

        source = str(path_or_hub_id)
        local = Path(source).expanduser()
        is_local = local.is_dir()
        if not is_local and _looks_like_path(source):
            raise SafetyModelError(_missing_message(source, True, FileNotFoundError("no such directory")))
        try:
            model = ViTForImageClassification.from_pretrained(
                str(local) if is_local else source, token=token, dtype=dtype or torch.float32)
            processor = AutoImageProcessor.from_pretrained(str(local) if is_local else source, token=token)
        except (OSError, ValueError) as exc:
            raise SafetyModelError(_missing_message(source, is_local, exc)) from exc
        return cls(model.to(device), processor, device)

    @torch.no_grad()
    def scores(self, images: list[Image.Image]) -> list[float]:
        """P(nsfw) for each image."""
        if not images:
            return []
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        logits = self.model(pixel_values=pixels).logits.float()
        return logits.softmax(dim=-1)[:, self.nsfw_index].tolist()

    def check(self, images: list[Image.Image], tolerance: int) -> list[bool]:
        """True for each image whose nsfw probability exceeds ``threshold(tolerance)``."""
        limit = threshold(tolerance)
        return [score > limit for score in self.scores(images)]


def build_demo_checker(directory: Path, seed: int = 0, always_flag: bool = False,
                       nsfw_probability: float | None = None) -> Path:
    """Write a tiny random-weight ViT classifier with the real model's labels, input size and image
    processor to ``directory`` (``save_pretrained`` layout, so it loads through ``SafetyChecker.load``).

    By default it almost never flags (P(nsfw) about 0.02, still varying with the image); ``always_flag``
    makes P(nsfw) about 0.9997 for every image; ``nsfw_probability`` pins P(nsfw) to that exact value.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=2,
        id2label=dict(LABELS), label2id={name: index for index, name in LABELS.items()},
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        if nsfw_probability is not None:
            if not 0.0 < nsfw_probability < 1.0:
                raise ValueError("nsfw_probability must be strictly between 0 and 1")
            model.classifier.weight.zero_()
            logit = math.log(nsfw_probability / (1.0 - nsfw_probability))
            model.classifier.bias.copy_(torch.tensor([0.0, logit]))
        else:
            model.classifier.weight.mul_(0.01)
            model.classifier.bias.copy_(torch.tensor([-4.0, 4.0] if always_flag else [2.0, -2.0]))
    processor = ViTImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _nsfw_index(id2label: dict) -> int:
    for index, label in id2label.items():
        if str(label).lower() == "nsfw":
            return int(index)
    raise SafetyModelError(f"the safety classifier has no 'nsfw' label (labels: {id2label})")


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``owner/name``; anything absolute, relative-dotted, ``~`` or deeper is a path."""
    return source.startswith((os.sep, ".", "~")) or source.count("/") > 1 or Path(source).exists()


def _missing_message(source: str, is_local: bool, exc: Exception) -> str:
    from huggingface_hub import constants

    if is_local:
        where = f"the local directory {source}"
    else:
        where = f"the Hugging Face hub and the local cache {constants.HF_HUB_CACHE}"
        if constants.HF_HUB_OFFLINE:
            where += " (HF_HUB_OFFLINE is set, so the hub was not asked)"
    return (
        f"Could not load the safety checker model {source!r} from {where}: {exc}. "
        f"Fix: download it once with `hf download {DEFAULT_SAFETY_MODEL}` (set HF_TOKEN if the hub asks "
        "for a token), or point fluxserve at a local directory holding config.json, model.safetensors and "
        "preprocessor_config.json; unset HF_HUB_OFFLINE to let it download. Use --demo for the tiny "
        "demo checker, or disable the checker per request with enable_safety_checker=false."
    )
