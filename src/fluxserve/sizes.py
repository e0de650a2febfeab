"""Every size conversion of every dialect, in one place.

fal ``image_size`` enums and ``{width, height}``; OpenAI ``WxH``, ``W:H``, ``auto`` and ``aspect_ratio`` +
``resolution`` tiers (the 1K table of seed 004, nearest match); Replicate aspect ratios, ``custom`` and
megapixel tiers, ``match_input_image``; rounding to multiples of 16; the model's pixel limits.

Functions raise ``SizeError(field, message)``; each dialect turns it into its own 4xx.
"""

from __future__ import annotations

import math
import re

# fal ImageSize enum (seeds 000, 001)
FAL_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
FAL_MIN_SIDE, FAL_MAX_SIDE = 512, 2048  # seed 001: "width and height must be between 512 and 2048"

# Seed 004's 1K table: aspect ratio -> (width, height). Other tiers scale it.
TABLE_1K: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1183, 887),
    "3:4": (887, 1182),
    "5:4": (1145, 916),
    "4:5": (916, 1145),
    "3:2": (1254, 836),
    "2:3": (836, 1254),
    "16:9": (1365, 768),
    "9:16": (768, 1365),
}
# FLUX.2 outputs up to 4 MP (2048x2048): 4K maps to the nearest supported tier, 2K.
RESOLUTION_TIERS: dict[str, float] = {"0.5K": 0.5, "1K": 1.0, "2K": 2.0}
KNOWN_RESOLUTIONS = ("0.5K", "1K", "2K", "4K")

# Replicate FLUX.2 schemas (seed 003, research): aspect ratios and megapixel tiers (1 MP = 1024x1024).
REPLICATE_ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
REPLICATE_MEGAPIXELS: dict[str, float] = {"0.5 MP": 0.5, "1 MP": 1.0, "2 MP": 2.0, "4 MP": 4.0}

# What the model can produce.
MODEL_MIN_SIDE, MODEL_MAX_SIDE = 64, 2048
MODEL_MAX_PIXELS = 2048 * 2048


class SizeError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def round16(value: float) -> int:
    """The nearest multiple of 16, at least 16."""
    return max(16, round(value / 16.0) * 16)


def check_model_limits(width: int, height: int, field_name: str = "size") -> tuple[int, int]:
    if not (MODEL_MIN_SIDE <= width <= MODEL_MAX_SIDE and MODEL_MIN_SIDE <= height <= MODEL_MAX_SIDE):
        raise SizeError(
            field_name,
            f"{width}x{height} is outside the model's limits: each side must be between "
            f"{MODEL_MIN_SIDE} and {MODEL_MAX_SIDE} pixels",
        )
    return width, height


# ---- fal ---------------------------------------------------------------------------------------------
def fal_image_size(value: str | dict | None, default: str = "landscape_4_3") -> tuple[int, int] | None:
    """fal ``image_size``: an enum name, ``{"width", "height"}``, or ``"auto"`` (None: size from the input)."""
    if value is None:
        value = default
    if isinstance(value, str):
        if value == "auto":
            return None
        if value not in FAL_IMAGE_SIZES:
            allowed = ", ".join(FAL_IMAGE_SIZES)
            raise SizeError("image_size", f"unknown size {value!r}; allowed: {allowed} or {{width, height}}")
        return FAL_IMAGE_SIZES[value]
    width, height = int(value["width"]), int(value["height"])
    for name, side in (("width", width), ("height", height)):
        if not FAL_MIN_SIDE <= side <= FAL_MAX_SIDE:
            raise SizeError(
                f"image_size.{name}", f"{side} is out of range: must be between {FAL_MIN_SIDE} and {FAL_MAX_SIDE}"
            )
    return width, height


# ---- OpenAI-style gateways (seed 004) --------------------------------------------------------------
_WXH = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")


def parse_ratio(value: str, field_name: str) -> float:
    m = _RATIO.match(value)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise SizeError(field_name, f"{value!r} is not an aspect ratio like '16:9'")
    return float(m.group(1)) / float(m.group(2))


def nearest_ratio(ratio: float, choices) -> str:
    """The supported ratio closest to ``ratio`` on a log scale (7:1 between 4:1 and 8:1 gives 8:1)."""
    return min(choices, key=lambda name: abs(math.log(parse_ratio(name, "aspect_ratio") / ratio)))


def nearest_tier(value: str) -> float:
    """A resolution tier ('1K', '2K', '0.5K', '4K', or a megapixel number) -> the nearest supported scale."""
    text = value.strip().upper().replace(" ", "")
    try:
        if text.endswith("K"):
            scale = float(text[:-1])
        elif text.endswith("MP"):
            scale = math.sqrt(float(text[:-2]))
        else:
            scale = math.sqrt(float(text))
    except ValueError:
        raise SizeError(
            "resolution", f"{value!r} is not a resolution tier; use one of {', '.join(KNOWN_RESOLUTIONS)}"
        ) from None
    if scale <= 0:
        raise SizeError("resolution", f"{value!r} must be positive")
    return min(RESOLUTION_TIERS.values(), key=lambda tier: abs(math.log(tier / scale)))


def gateway_size(
    size: str | None, aspect_ratio: str | None = None, resolution: str | None = None
) -> tuple[int, int] | None:
    """OpenAI-style size: ``size`` (WxH, W:H or auto) wins over ``aspect_ratio`` + ``resolution``.
    None means "auto": the input image's size for edits, 1024x1024 otherwise."""
    if size and size.strip().lower() != "auto":
        m = _WXH.match(size)
        if m:
            return check_model_limits(int(m.group(1)), int(m.group(2)))
        if _RATIO.match(size):
            aspect_ratio = size  # W:H is the same as aspect_ratio
        else:
            raise SizeError("size", f"{size!r} is not 'WxH', 'W:H' or 'auto'")
    if resolution and resolution.strip().lower() == "auto":
        resolution = None
    if not aspect_ratio and not resolution:
        return None
    ratio_name = nearest_ratio(parse_ratio(aspect_ratio, "aspect_ratio"), TABLE_1K) if aspect_ratio else "1:1"
    scale = nearest_tier(resolution) if resolution and resolution.lower() != "auto" else 1.0
    width, height = TABLE_1K[ratio_name]
    return fit_model_limits(round(width * scale), round(height * scale))


def fit_model_limits(width: int, height: int) -> tuple[int, int]:
    """Scale a tier size down (keeping its shape) until it fits the model: the largest tier of a wide
    ratio gives its nearest supported size (16:9 at 2K -> 2048x1152) instead of an error."""
    factor = min(1.0, MODEL_MAX_SIDE / max(width, height), math.sqrt(MODEL_MAX_PIXELS / (width * height)))
    return check_model_limits(round(width * factor), round(height * factor), "resolution")


def auto_size(width: int, height: int, min_side: int = MODEL_MIN_SIDE) -> tuple[int, int]:
    """An ``auto`` output size from a reference image's: its shape, scaled up until the short side reaches
    ``min_side`` (the endpoint's minimum) and down until it fits the model, in multiples of 16."""
    factor = max(1.0, min_side / min(width, height))
    factor = min(factor, MODEL_MAX_SIDE / max(width, height), math.sqrt(MODEL_MAX_PIXELS / (width * height)))
    w = min(MODEL_MAX_SIDE, max(min_side, round16(width * factor)))
    h = min(MODEL_MAX_SIDE, max(min_side, round16(height * factor)))
    return w, h


# ---- Replicate -----------------------------------------------------------------------------------------
def replicate_size(
    aspect_ratio: str,
    resolution: str,
    width: int | None = None,
    height: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Replicate FLUX.2: aspect ratio (or custom / match_input_image) and megapixel tier -> multiples of 16."""
    if aspect_ratio == "custom":
        if width is None or height is None:
            raise SizeError("width" if width is None else "height", "is required when aspect_ratio is 'custom'")
        return check_model_limits(round16(width), round16(height), "width")
    if aspect_ratio == "match_input_image":
        if input_size is None:
            raise SizeError("aspect_ratio", "'match_input_image' needs at least one input image")
        ratio = input_size[0] / input_size[1]
    elif aspect_ratio in REPLICATE_ASPECT_RATIOS:
        ratio = parse_ratio(aspect_ratio, "aspect_ratio")
    else:
        allowed = ", ".join((*REPLICATE_ASPECT_RATIOS, "match_input_image", "custom"))
        raise SizeError("aspect_ratio", f"{aspect_ratio!r} is not one of {allowed}")
    if resolution == "match_input_image":
        if input_size is None:
            raise SizeError("resolution", "'match_input_image' needs at least one input image")
        pixels = min(input_size[0] * input_size[1], MODEL_MAX_PIXELS)
    elif resolution in REPLICATE_MEGAPIXELS:
        pixels = REPLICATE_MEGAPIXELS[resolution] * 1024 * 1024
    else:
        allowed = ", ".join((*REPLICATE_MEGAPIXELS, "match_input_image"))
        raise SizeError("resolution", f"{resolution!r} is not one of {allowed}")
    width_f = math.sqrt(pixels * ratio)
    w, h = round16(width_f), round16(width_f / ratio)
    while w * h > MODEL_MAX_PIXELS or w > MODEL_MAX_SIDE or h > MODEL_MAX_SIDE:
        w, h = (w - 16, round16((w - 16) / ratio)) if w >= h else (round16((h - 16) * ratio), h - 16)
    return check_model_limits(w, h, "resolution")
