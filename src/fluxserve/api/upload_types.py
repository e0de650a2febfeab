"""What an upload may be: images (PNG, JPEG, WebP, AVIF, GIF), LoRA weights (safetensors) and zip archives (LoRA
training datasets), recognised by their bytes, never by the declared content type or file name. A zip is only
ever read by the dataset loader (``fluxserve.training.dataset``), which never extracts it, and is served back
as a download."""

from __future__ import annotations

import io
import json
import struct
import zipfile

from fluxserve.inputs import image_type

SAFETENSORS = "application/vnd.safetensors"
ZIP = "application/zip"
ACCEPTED = "PNG, JPEG, WebP, AVIF or GIF images, safetensors LoRA weights, or zip archives (training datasets)"
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
    except (ValueError, RecursionError):  # not JSON, or nested past what the decoder recurses through
        return False
    return isinstance(header, dict)


def is_zip(data: bytes) -> bool:
    """True for a zip archive: a local file header first and an end-of-central-directory record at the end."""
    return data[:4] == b"PK\x03\x04" and zipfile.is_zipfile(io.BytesIO(data))


def sniff(data: bytes) -> str | None:
    """The content type an upload is stored and served with, or None when it is not accepted."""
    if kind := image_type(data):
        return kind
    if is_safetensors(data):
        return SAFETENSORS
    return ZIP if is_zip(data) else None
