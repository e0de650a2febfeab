"""Output encoding: every format opens in Pillow with the right size and mode, carries the generation
parameters and the AI-generated marker, and honours the quality setting. PNGs written by fpng have the pixels
and the metadata chunks Pillow writes; Pillow writes what fpng cannot, and every PNG when fpng is missing."""

from __future__ import annotations

import importlib.util
import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine import encode
from fluxserve.engine.encode import DIGITAL_SOURCE_TYPE, FORMATS, encode_image, png_encoder, read_metadata
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


def smooth_image(width: int = 80, height: int = 48, mode: str = "RGB") -> Image.Image:
    """Gradients with a little grain, as photos compress (unlike noise); alpha a gradient too."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    planes = [np.sin(6 * x + 2 * y), np.cos(5 * x * y + 3 * x), x + y - 1, np.cos(4 * y)][:len(mode)]
    grain = np.random.default_rng(1).normal(0, 2, (height, width, len(mode)))
    pixels = np.clip(np.stack(planes, axis=-1) * 100 + 128 + grain, 0, 255).astype("uint8")
    return Image.fromarray(pixels, mode)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, data, CRC) of every chunk of a PNG file."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        cid, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        chunks.append((cid, body, struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0]))
        at += 12 + length
    return chunks


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


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
    assert [png_encoder(image, q) for q in (None, 100, 73, 72, 0)] == ["fpng", "fpng", "fpng", "pillow", "pillow"]
    fast = encode_image(image, "png", 100, METADATA)  # fpng
    small = encode_image(image, "png", 0, METADATA)  # Pillow, zlib level 9
    assert len(small) < len(fast)
    for data in (fast, small):
        assert np.array_equal(pixels(data), np.asarray(image))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("make", [noise_image, smooth_image])
def test_fast_png_pixels_are_identical(make, mode: str):
    image = make(257, 131, mode)  # odd sizes: no row happens to align
    assert png_encoder(image) == "fpng"
    data = encode_image(image, "png", None, METADATA)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_fast_png_carries_the_metadata_chunks_pillow_writes(mode: str):
    image = smooth_image(mode=mode)
    fast = png_chunks(encode_image(image, "png", None, METADATA))
    pillow = png_chunks(encode_image(image, "png", 0, METADATA))  # quality 0: Pillow, zlib level 9
    for cid, body, crc in fast:
        assert zlib.crc32(body, zlib.crc32(cid)) == crc, cid
    types = [cid for cid, _, _ in fast]
    first_idat = types.index(b"IDAT")
    assert types[0] == b"IHDR" and types[-1] == b"IEND"
    metadata = [(cid, body) for cid, body, _ in fast[1:first_idat] if cid != b"fdEC"]  # fdEC: fpng's own marker
    assert [cid for cid, _ in metadata] == [b"tEXt", b"tEXt", b"tEXt", b"iTXt", b"eXIf"]
    assert metadata == [(cid, body) for cid, body, _ in pillow if cid not in (b"IHDR", b"IDAT", b"IEND")]
    assert fast[0] == pillow[0]  # the same IHDR: size, bit depth, colour type
    assert read_metadata(encode_image(image, "png", None, METADATA)) == read_metadata(
        encode_image(image, "png", 0, METADATA))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16", "1"])
def test_pillow_writes_the_pngs_fpng_cannot(mode: str):
    image = noise_image().convert(mode) if mode != "I;16" else Image.fromarray(
        (np.random.default_rng(2).random((48, 80)) * 65535).astype("<u2"))
    assert image.mode == mode
    assert png_encoder(image) == "pillow"
    data = encode_image(image, "png", None, METADATA)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image))
    meta = read_metadata(data)
    assert meta["parameters"] == METADATA and meta["carriers"] == EXPECTED_CARRIERS["png"]


def test_without_fpng_pillow_writes_every_png(monkeypatch):
    monkeypatch.setitem(sys.modules, "fpng", None)  # `import fpng` now raises ImportError
    spec = importlib.util.spec_from_file_location("encode_without_fpng", encode.__file__)
    without = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(without)
    assert without.fpng is None
    image = smooth_image(mode="RGBA")
    assert without.png_encoder(image) == "pillow" and png_encoder(image) == "fpng"
    data = without.encode_image(image, "png", None, METADATA)
    assert b"fdEC" not in [cid for cid, _, _ in png_chunks(data)]
    assert np.array_equal(pixels(data), np.asarray(image))
    assert without.read_metadata(data) == read_metadata(encode_image(image, "png", None, METADATA))
    assert np.array_equal(pixels(without.plain_png(image)), pixels(encode.plain_png(image)))


def test_plain_png_is_fast_and_lossless_without_metadata():
    image = smooth_image()
    data = encode.plain_png(image)
    assert b"fdEC" in [cid for cid, _, _ in png_chunks(data)]  # written by fpng
    assert np.array_equal(pixels(data), np.asarray(image))
    assert read_metadata(data)["parameters"] is None


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
