"""Reference images: resolve one reference (URL, data URI or local path) and check a request's references.

Dialects may call these early to reject bad input with their own 4xx; the engine calls them again. Errors are
``InputError`` naming the field, e.g. ``image_urls[2]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import threading
from pathlib import Path

from PIL import Image

from fluxserve import fetch
from fluxserve.request import InputError

MIN_SIDE = 64  # the reference code rejects smaller sides
MAX_ASPECT = 8.0  # ... and more extreme aspect ratios
DEFAULT_MAX_REFERENCES = 10
DEFAULT_MAX_INPUT_MEGAPIXELS = 14.0
MEGAPIXEL = 1024 * 1024  # as the providers count it (seed 004: "1 megapixel = 1024x1024 pixels")

# Pillow's own decompression-bomb guard, a backstop behind the header check in ``_open_header``: it warns
# above this many pixels and refuses twice as many when an image is opened, before anything is decoded.
Image.MAX_IMAGE_PIXELS = int(DEFAULT_MAX_INPUT_MEGAPIXELS * MEGAPIXEL)

_AVIF_BRANDS = (b"avif", b"avis")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)


def load_image(ref: str, field_name: str = "image_urls[0]", *, max_megapixels: float | None = None
               ) -> Image.Image:
    """One reference as an RGB ``PIL.Image``: an http(s) URL, a ``data:`` URI or a local file path (the CLI's
    references, and the server's own files that a dialect resolved). Images declaring more than
    ``max_megapixels`` (default 14) are refused from their header, before decoding."""
    limit = max_megapixels or DEFAULT_MAX_INPUT_MEGAPIXELS
    return decode_image(_open_header(ref, field_name, limit), field_name)


def load_references(
    refs: list[str],
    endpoint=None,
    *,
    remote: bool = False,
    max_references: int | None = None,
    max_input_megapixels: float | None = None,
    field_name: str = "image_urls",
) -> list[Image.Image]:
    """A request's references, checked against the endpoint's limits (see ``check_references``) from their
    headers before any is decoded; ``remote`` refuses local file paths (references from API callers)."""
    max_references, max_input_megapixels = _limits(endpoint, max_references, max_input_megapixels)
    if len(refs) > max_references:
        raise InputError(field_name, f"{len(refs)} reference images given; at most {max_references} are allowed")
    headers, total = [], 0
    for index, ref in enumerate(refs):
        name = f"{field_name}[{index}]"
        if remote:
            _check_remote(ref, name)
        image = _open_header(ref, name, max_input_megapixels)
        headers.append(image)
        total += image.size[0] * image.size[1]
        if total > max_input_megapixels * MEGAPIXEL:  # stop downloading once the total is over
            break
    check_references(headers, max_references=max_references, max_input_megapixels=max_input_megapixels,
                     field_name=field_name)
    return [decode_image(image, f"{field_name}[{index}]") for index, image in enumerate(headers)]


def needs_network(refs: list[str]) -> bool:
    """Whether checking ``refs`` downloads anything (an http(s) URL among them), or only decodes data URIs and
    local files."""
    return any(isinstance(ref, str) and ref.strip().lower().startswith(("http://", "https://")) for ref in refs)


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
    max_references, max_input_megapixels = _limits(endpoint, max_references, max_input_megapixels)
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
    if total > max_input_megapixels * MEGAPIXEL:
        raise InputError(
            field_name,
            f"the reference images total {total / MEGAPIXEL:.1f} MP; at most {max_input_megapixels:g} MP of input is allowed",
        )


def image_type(data: bytes) -> str | None:
    """The image content type these bytes are (PNG, JPEG, WebP, GIF, AVIF), read from their first bytes, or None."""
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


def _limits(endpoint, max_references: int | None, max_input_megapixels: float | None) -> tuple[int, float]:
    if max_references is None:
        max_references = getattr(endpoint, "max_references", None) or DEFAULT_MAX_REFERENCES
    if max_input_megapixels is None:
        max_input_megapixels = getattr(endpoint, "max_input_megapixels", None) or DEFAULT_MAX_INPUT_MEGAPIXELS
    return max_references, max_input_megapixels


def _check_remote(ref: str, field_name: str) -> None:
    if not isinstance(ref, str) or not ref.strip().lower().startswith(("http://", "https://", "data:")):
        raise InputError(field_name, "must be an http(s) URL or a data URI")


def _open_header(ref: str, field_name: str, max_megapixels: float) -> Image.Image:
    """Fetch the encoded image and let Pillow read its header only; refuse it when it declares more than
    ``max_megapixels`` (nothing is decoded yet)."""
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(field_name, "must be an image URL, a data URI or a file path")
    ref = ref.strip()
    if ref.startswith(("http://", "https://")):
        data = _download(ref, field_name)
    elif ref.startswith("data:"):
        data = data_uri_bytes(ref, field_name)
    else:
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise InputError(field_name, f"{_short(ref)!r} is not an http(s) URL, a data URI or an existing file")
        data = path.read_bytes()
    return open_image_bytes(data, field_name, max_megapixels, source=ref)


def open_image_bytes(data: bytes, field_name: str, max_megapixels: float, *, source: str = "",
                     kind: str = "a reference") -> Image.Image:
    """Let Pillow read the header of an encoded image only; refuse it when it declares more than
    ``max_megapixels`` (nothing is decoded yet). ``source`` names where the bytes came from in messages,
    ``kind`` what the image is for ("a reference", "a training image")."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        declared = 2 * Image.MAX_IMAGE_PIXELS / MEGAPIXEL
        raise InputError(field_name, f"image declares more than {declared:g} MP in its "
                         f"header; {kind} may have at most {max_megapixels:g} MP") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read the header is the input's fault
        where = f" from {_short(source)!r}" if source else ""
        raise InputError(field_name, f"could not read an image{where}: {exc}") from None
    width, height = image.size
    if width * height > max_megapixels * MEGAPIXEL:
        megapixels = width * height / MEGAPIXEL
        raise InputError(field_name, f"image is {width}x{height} ({megapixels:.1f} MP); {kind} may "
                         f"have at most {max_megapixels:g} MP")
    return image


def decode_image(image: Image.Image, field_name: str) -> Image.Image:
    """Decode an opened image (at most ``decode_slots`` at once in the process) as RGB on white."""
    with _decode_slots():
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - any failure to decode is the input's fault
            raise InputError(field_name, f"could not decode the image: {exc}") from None
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.split()[-1])
            return background
        return image.convert("RGB")


_slots_lock = threading.Lock()
_slots: tuple[int, threading.BoundedSemaphore] | None = None


def _decode_slots() -> threading.BoundedSemaphore:
    global _slots
    wanted = fetch.current().decode_slots
    with _slots_lock:
        if _slots is None or _slots[0] != wanted:
            _slots = (wanted, threading.BoundedSemaphore(wanted))
        return _slots[1]


def _download(url: str, field_name: str) -> bytes:
    policy = fetch.current()
    try:
        return fetch.download(url, max_bytes=policy.max_reference_bytes, deadline_s=policy.deadline_s,
                              policy=policy)
    except fetch.FetchError as exc:
        raise InputError(field_name, f"could not download {_short(url)!r}: {exc.message}") from None


def data_uri_bytes(uri: str, field_name: str) -> bytes:
    """The bytes a ``data:`` URI carries (base64 or percent-encoded)."""
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
