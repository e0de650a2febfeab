"""Output encoding: every format opens in Pillow with the right size and mode, carries the generation
parameters and the AI-generated marker, and honours the quality setting."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.encode import DIGITAL_SOURCE_TYPE, FORMATS, encode_image, read_metadata
from fluxserve.request import CONTENT_TYPES

METADATA = {
    "prompt": 'a lighthouse at dusk, "quoted" <tags> & unicode: café ☃',
    "seed": 1234,
    "steps": 28,
    "guidance": 2.5,
    "model": "dev",
    "endpoint": "fal-ai/flux-2",
    "size": [80, 48],
}
PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF", "gif": "GIF"}
EXPECTED_CARRIERS = {
    "png": ["png-text", "exif", "xmp"],
    "jpeg": ["exif", "xmp"],
    "webp": ["exif", "xmp"],
    "avif": ["exif", "xmp"],
    "gif": ["gif-comment"],
}


def noise_image(width: int = 80, height: int = 48, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    channels = len(mode)
    pixels = (rng.random((height, width, channels)) * 255).astype("uint8")
    return Image.fromarray(pixels, mode)


def test_formats_match_request_content_types():
    assert set(FORMATS) == set(CONTENT_TYPES)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_pillow(fmt: str):
    data = encode_image(noise_image(), fmt, None, METADATA)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == PIL_NAMES[fmt]
        assert Image.MIME[image.format] == CONTENT_TYPES[fmt]
        assert image.size == (80, 48)
        assert image.mode == ("P" if fmt == "gif" else "RGB")
        image.load()


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameters_and_ai_marker_read_back(fmt: str):
    meta = read_metadata(encode_image(noise_image(), fmt, 75, METADATA))
    assert meta["format"] == fmt
    assert meta["parameters"] == METADATA
    assert meta["ai_generated"] is True
    assert meta["carriers"] == EXPECTED_CARRIERS[fmt]
    if fmt != "gif":  # Pillow cannot write XMP or EXIF into GIF; its comment carries the marker
        assert meta["digital_source_type"] == DIGITAL_SOURCE_TYPE
        assert meta["software"] == "fluxserve"


def test_plain_image_has_no_marker():
    out = io.BytesIO()
    noise_image().save(out, "PNG")
    meta = read_metadata(out.getvalue())
    assert meta["ai_generated"] is False
    assert meta["parameters"] is None


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_quality_changes_lossy_size(fmt: str):
    image = noise_image(128, 96)
    low = encode_image(image, fmt, 10, METADATA)
    high = encode_image(image, fmt, 95, METADATA)
    assert len(low) < len(high)


def test_png_quality_is_compression_effort_and_lossless():
    ramp = np.tile(np.arange(128, dtype="uint8"), (96, 1))
    image = Image.fromarray(np.stack([ramp, ramp[::-1], ramp // 2], axis=-1))  # compressible, unlike noise
    fast = encode_image(image, "png", 100, METADATA)  # compress_level 0
    small = encode_image(image, "png", 0, METADATA)  # compress_level 9
    assert len(small) < len(fast)
    for data in (fast, small):
        with Image.open(io.BytesIO(data)) as decoded:
            assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_gif_quality_sets_palette_size():
    image = noise_image(128, 96)
    with Image.open(io.BytesIO(encode_image(image, "gif", 0, METADATA))) as few:
        assert len(few.convert("RGB").getcolors(1 << 16)) <= 2
    with Image.open(io.BytesIO(encode_image(image, "gif", 100, METADATA))) as many:
        assert len(many.convert("RGB").getcolors(1 << 16)) > 100


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
def test_alpha_kept_where_the_format_has_it(fmt: str):
    data = encode_image(noise_image(mode="RGBA"), fmt, None, METADATA)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGBA"


def test_jpeg_drops_alpha():
    with Image.open(io.BytesIO(encode_image(noise_image(mode="RGBA"), "jpeg", None, METADATA))) as image:
        assert image.mode == "RGB"


def test_huge_prompt_still_encodes_jpeg_with_marker():
    meta = read_metadata(encode_image(noise_image(), "jpeg", None, {"prompt": "x" * 70_000}))
    assert meta["ai_generated"] is True
    assert meta["digital_source_type"] == DIGITAL_SOURCE_TYPE


def test_rejects_unknown_format_and_quality():
    with pytest.raises(ValueError, match="tiff"):
        encode_image(noise_image(), "tiff", None, METADATA)
    with pytest.raises(ValueError, match="quality"):
        encode_image(noise_image(), "jpeg", 101, METADATA)
