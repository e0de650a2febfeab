"""What an upload may be: images (PNG, JPEG, WebP, AVIF, GIF) and LoRA weights (safetensors), recognised by
their bytes, never by the declared content type or file name."""

from __future__ import annotations

import json
import struct

SAFETENSORS = "application/vnd.safetensors"
ACCEPTED = "PNG, JPEG, WebP, AVIF or GIF images, or safetensors LoRA weights"
_AVIF_BRANDS = (b"avif", b"avis")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def image_type(data: bytes) -> str | None:
    """The image content type these bytes are, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:8] == b"ftyp" and len(data) >= 16:
        size = struct.unpack(">I", data[:4])[0]
        brands = [data[8:12]] + [data[i:i + 4] for i in range(16, min(size, len(data), 64), 4)]
        if any(brand in _AVIF_BRANDS for brand in brands):
            return "image/avif"
    return None


def is_safetensors(data: bytes) -> bool:
    """True when ``data`` starts like a safetensors file: a little-endian u64 header size, then a JSON object."""
    if len(data) < 10:
        return False
    (size,) = struct.unpack("<Q", data[:8])
    if size < 2 or size > _MAX_SAFETENSORS_HEADER or 8 + size > len(data):
        return False
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict)


def sniff(data: bytes) -> str | None:
    """The content type an upload is stored and served with, or None when it is not accepted."""
    return image_type(data) or (SAFETENSORS if is_safetensors(data) else None)
