"""What an upload may be: images (PNG, JPEG, WebP, AVIF, GIF) and LoRA weights (safetensors), recognised by
their bytes, never by the declared content type or file name."""

from __future__ import annotations

import json
import struct

from fluxserve.inputs import image_type

SAFETENSORS = "application/vnd.safetensors"
ACCEPTED = "PNG, JPEG, WebP, AVIF or GIF images, or safetensors LoRA weights"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


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
