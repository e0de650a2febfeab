"""Reference images: resolve one reference (URL, data URI or local path) and check a request's references.

Dialects may call these early to reject bad input with their own 4xx; the engine calls them again. Errors are
``InputError`` naming the field, e.g. ``image_urls[2]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fluxserve.request import InputError

MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0
MIN_SIDE = 64  # the reference code rejects smaller sides
MAX_ASPECT = 8.0  # ... and more extreme aspect ratios
DEFAULT_MAX_REFERENCES = 10
DEFAULT_MAX_INPUT_MEGAPIXELS = 14.0

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)


def load_remote_image(ref: str, field_name: str = "image_urls[0]") -> Image.Image:
    """Like ``load_image``, for references that came from an API caller: http(s) URLs and data URIs only, so a
    caller cannot read files from the server's disk."""
    if not isinstance(ref, str) or not ref.strip().lower().startswith(("http://", "https://", "data:")):
        raise InputError(field_name, "must be an http(s) URL or a data URI")
    return load_image(ref, field_name)


def load_image(ref: str, field_name: str = "image_urls[0]") -> Image.Image:
    """One reference as an RGB ``PIL.Image``: an http(s) URL, a ``data:`` URI or a local file path (the CLI's
    references, and the server's own files that a dialect resolved)."""
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(field_name, "must be an image URL, a data URI or a file path")
    ref = ref.strip()
    if ref.startswith(("http://", "https://")):
        data = _download(ref, field_name)
    elif ref.startswith("data:"):
        data = _decode_data_uri(ref, field_name)
    else:
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise InputError(field_name, f"{_short(ref)!r} is not an http(s) URL, a data URI or an existing file")
        data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(field_name, f"could not read an image from {_short(ref)!r}: {exc}") from None
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return image.convert("RGB")


def check_references(
    images: list[Image.Image],
    endpoint=None,
    *,
    max_references: int | None = None,
    max_input_megapixels: float | None = None,
    field_name: str = "image_urls",
) -> None:
    """Reject too many references, sides below 64 px, aspect ratios beyond 8:1 and more than the endpoint's
    total input megapixels (14 MP by default). ``endpoint`` is an ``EndpointSpec`` (its limits are used)."""
    if max_references is None:
        max_references = getattr(endpoint, "max_references", None) or DEFAULT_MAX_REFERENCES
    if max_input_megapixels is None:
        max_input_megapixels = getattr(endpoint, "max_input_megapixels", None) or DEFAULT_MAX_INPUT_MEGAPIXELS
    if len(images) > max_references:
        raise InputError(field_name, f"{len(images)} reference images given; at most {max_references} are allowed")
    total = 0
    for i, image in enumerate(images):
        width, height = image.size
        name = f"{field_name}[{i}]"
        if min(width, height) < MIN_SIDE:
            raise InputError(name, f"image is {width}x{height}; each side must be at least {MIN_SIDE} pixels")
        if max(width / height, height / width) > MAX_ASPECT:
            raise InputError(name, f"image is {width}x{height}; the aspect ratio must be at most {MAX_ASPECT:g}:1")
        total += width * height
    if total > max_input_megapixels * 1_000_000:
        raise InputError(
            field_name,
            f"the reference images total {total / 1e6:.1f} MP; at most {max_input_megapixels:g} MP of input is allowed",
        )


def image_content_type(data: bytes, default: str = "application/octet-stream") -> str:
    """The MIME type of an encoded image, read from its header by Pillow (``default`` when it is no image)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.get_format_mimetype() or default
    except (UnidentifiedImageError, OSError):
        return default


def _download(url: str, field_name: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True) as response:
            if response.status_code != 200:
                raise InputError(field_name, f"downloading {_short(url)!r} failed with HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise InputError(field_name, f"{_short(url)!r} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise InputError(field_name, f"could not download {_short(url)!r}: {exc}") from None


def _decode_data_uri(uri: str, field_name: str) -> bytes:
    match = _DATA_URI.match(uri)
    if not match:
        raise InputError(field_name, "is not a valid data URI (data:<mime>;base64,<data>)")
    payload = match.group("data")
    if match.group("b64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise InputError(field_name, "the data URI's base64 payload is invalid") from None
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
