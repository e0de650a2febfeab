"""Encode generated images as PNG, JPEG, WebP, AVIF or GIF, with the generation parameters embedded and
every file marked as AI-generated.

Where the parameters go (one JSON object, ``metadata`` below):

| format | parameters (JSON)                         | AI-generated marker                                    |
|--------|-------------------------------------------|--------------------------------------------------------|
| PNG    | tEXt ``parameters``; EXIF; XMP (iTXt)     | tEXt ``Description``; EXIF ImageDescription; XMP IPTC   |
| JPEG   | EXIF UserComment; XMP                     | EXIF ImageDescription; XMP IPTC DigitalSourceType      |
| WebP   | EXIF UserComment; XMP                     | EXIF ImageDescription; XMP IPTC DigitalSourceType      |
| AVIF   | EXIF UserComment; XMP                     | EXIF ImageDescription; XMP IPTC DigitalSourceType      |
| GIF    | comment extension (marker line + JSON)    | comment extension (GIF carries no EXIF/XMP in Pillow)  |

The XMP packet sets ``Iptc4xmpExt:DigitalSourceType`` to IPTC's ``trainedAlgorithmicMedia``, the term that
C2PA-aware tools and photo libraries read as "created by a generative model". EXIF ``Software`` is
"fluxserve".

``quality`` (0-100, higher = better looking / larger) maps onto each format:
JPEG, WebP and AVIF quality directly; GIF quality sets the palette size: ``2 + round(254 * quality / 100)``
colours (100 -> 256). PNG is lossless whatever the quality: it only trades file size for encoding time, as a
zlib level ``round(9 * (100 - quality) / 100)``. The default (no quality) and every quality that maps to levels
0-2 (quality 73-100) are written by fpng, a fast encoder with one fixed effort: 20-50x faster than Pillow's
default level 6 on a 1024x1024 image, files about the size of zlib level 1 (``benchmarks/encoding.py``
measures both). Qualities 0-72 (levels 3-9) ask for smaller files at a CPU cost and are written by Pillow at
that level. Pillow also writes the PNGs fpng cannot: modes other than 8-bit RGB and RGBA, and any PNG when fpng
is not installed. The metadata chunks are the same either way (fpng's output gets them spliced in after IHDR,
before the first IDAT); so are the pixels.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from typing import Any

from PIL import ExifTags, Image, PngImagePlugin

try:  # the fast PNG encoder; without it Pillow writes every PNG (the same pixels and metadata, slower)
    import fpng
except ImportError:
    fpng = None

AI_MARKER = "AI generated"
SOFTWARE = "fluxserve"
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
DESCRIPTION = f"{AI_MARKER} image (FLUX.2, {SOFTWARE})"

FORMATS = ("png", "jpeg", "webp", "avif", "gif")
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90, "avif": 80}
# Pillow's level when it writes a PNG without a quality (fpng not installed, or a mode fpng cannot write): zlib
# level 1 encodes a photo-like PNG ~2x faster than level 6 for ~15% more bytes.
DEFAULT_PNG_LEVEL = 1
FAST_PNG_MAX_LEVEL = 2  # fpng is faster than zlib at levels 0-2 and its files are about level 1's size
FAST_PNG_MODES = {"RGB": 3, "RGBA": 4}  # the modes fpng writes, with their channels

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF", "gif": "GIF"}
_USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"  # EXIF UserComment character-code prefix
_MAX_SEGMENT = 65000  # JPEG APP1 segments (EXIF, XMP) hold at most 64 KiB

_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "fluxserve": "urn:fluxserve:metadata:1.0/",
}
for _prefix, _uri in _NS.items():
    ET.register_namespace(_prefix, _uri)


def encode_image(image: Image.Image, fmt: str, quality: int | None, metadata: dict) -> bytes:
    """Encode ``image`` as ``fmt`` (png|jpeg|webp|avif|gif) with ``metadata`` embedded (see module doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if quality is not None and not 0 <= quality <= 100:
        raise ValueError(f"quality must be 0-100, got {quality}")
    parameters = _to_json(metadata)
    out = io.BytesIO()
    if fmt == "gif":
        _save_gif(image, out, quality, parameters)
        return out.getvalue()

    options: dict[str, Any] = {"exif": _exif(metadata, parameters).tobytes(), "xmp": _xmp(parameters)}
    if fmt == "jpeg":
        # JPEG keeps EXIF and XMP in 64 KiB segments: drop the copy that does not fit rather than fail.
        if len(options["exif"]) > _MAX_SEGMENT:
            options["exif"] = _exif(metadata, None).tobytes()
        if len(options["xmp"]) > _MAX_SEGMENT:
            options["xmp"] = _xmp(None)
    if fmt == "png":
        _save_png(image, out, quality, parameters, options["exif"], options["xmp"])
    else:
        keep_alpha = fmt in ("webp", "avif") and image.mode in ("RGBA", "LA")
        image = image.convert("RGBA" if keep_alpha else "RGB") if image.mode not in ("RGB",) else image
        q = DEFAULT_QUALITY[fmt] if quality is None else quality
        image.save(out, _PIL_FORMATS[fmt], quality=q, **options)
    return out.getvalue()


def png_encoder(image: Image.Image, quality: int | None = None) -> str:
    """Which encoder writes ``image`` as a PNG at ``quality``: ``"fpng"`` or ``"pillow"`` (see module doc)."""
    level = None if quality is None else _png_level(quality)
    fast = level is None or level <= FAST_PNG_MAX_LEVEL
    return "fpng" if fast and fpng is not None and image.mode in FAST_PNG_MODES else "pillow"


def plain_png(image: Image.Image) -> bytes:
    """``image`` as a PNG without metadata, as fast as this machine writes one (live previews)."""
    if png_encoder(image) == "fpng":
        return _fpng(image)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=DEFAULT_PNG_LEVEL)
    return out.getvalue()


def read_metadata(data: bytes) -> dict:
    """Read back what ``encode_image`` embedded.

    Returns ``{"format", "parameters" (dict or None), "ai_generated" (bool), "digital_source_type"
    (str or None), "software" (str or None), "carriers" (where the parameters were found: "png-text",
    "exif", "xmp", "gif-comment")}``.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        info = dict(image.info)
        exif = image.getexif()
        fmt = (image.format or "").lower()
    result: dict[str, Any] = {"format": fmt, "parameters": None, "ai_generated": False,
                              "digital_source_type": None, "software": None, "carriers": []}

    def found(carrier: str, text: str | bytes | None) -> None:
        parsed = _parse_json(text)
        if parsed is not None:
            result["carriers"].append(carrier)
            if result["parameters"] is None:
                result["parameters"] = parsed

    if fmt == "png":
        found("png-text", info.get("parameters"))
        result["ai_generated"] |= AI_MARKER in str(info.get("Description", ""))
        result["software"] = info.get("Software")
    if exif:
        result["ai_generated"] |= AI_MARKER in str(exif.get(ExifTags.Base.ImageDescription, ""))
        result["software"] = result["software"] or exif.get(ExifTags.Base.Software)
        comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        if isinstance(comment, bytes) and comment.startswith(_USER_COMMENT_ASCII):
            comment = comment[len(_USER_COMMENT_ASCII):]
        found("exif", comment)
    if xmp := info.get("xmp"):
        source_type, params = _read_xmp(xmp)
        result["digital_source_type"] = source_type
        result["ai_generated"] |= source_type == DIGITAL_SOURCE_TYPE
        found("xmp", params)
    if fmt == "gif" and (comment := info.get("comment")):
        text = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
        first, _, rest = text.partition("\n")
        result["ai_generated"] |= AI_MARKER in first
        found("gif-comment", rest)
    return result


def _to_json(metadata: dict) -> str:
    # ASCII-only JSON fits every carrier (PNG tEXt is Latin-1, EXIF ASCII) and still round-trips Unicode.
    return json.dumps(metadata, ensure_ascii=True, separators=(",", ":"), default=str)


def _parse_json(text: str | bytes | None) -> dict | None:
    if not text:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        value = json.loads(text.strip("\x00 \n"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _exif(metadata: dict, parameters: str | None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = DESCRIPTION
    exif[ExifTags.Base.Software] = SOFTWARE
    if metadata.get("model"):
        exif[ExifTags.Base.Model] = str(metadata["model"])
    if parameters is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _USER_COMMENT_ASCII + parameters.encode()
    return exif


def _xmp(parameters: str | None) -> bytes:
    def q(prefix: str, name: str) -> str:
        return f"{{{_NS[prefix]}}}{name}"

    meta = ET.Element(q("x", "xmpmeta"))
    rdf = ET.SubElement(meta, q("rdf", "RDF"))
    desc = ET.SubElement(rdf, q("rdf", "Description"), {
        q("rdf", "about"): "",
        q("Iptc4xmpExt", "DigitalSourceType"): DIGITAL_SOURCE_TYPE,
        q("xmp", "CreatorTool"): SOFTWARE,
    })
    alt = ET.SubElement(ET.SubElement(desc, q("dc", "description")), q("rdf", "Alt"))
    ET.SubElement(alt, q("rdf", "li"), {"xml:lang": "x-default"}).text = DESCRIPTION
    if parameters is not None:
        ET.SubElement(desc, q("fluxserve", "parameters")).text = parameters
    body = ET.tostring(meta, encoding="unicode")
    packet = f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>{body}<?xpacket end="w"?>'
    return packet.encode("utf-8")


def _read_xmp(xmp: str | bytes) -> tuple[str | None, str | None]:
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return None, None
    try:
        root = ET.fromstring(text[start:end + len("</x:xmpmeta>")])
    except ET.ParseError:
        return None, None
    source_type = params = None
    for desc in root.iter(f"{{{_NS['rdf']}}}Description"):
        source_type = source_type or desc.get(f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType")
        node = desc.find(f"{{{_NS['fluxserve']}}}parameters")
        if node is not None and params is None:
            params = node.text
    return source_type, params


def _png_level(quality: int) -> int:
    return round(9 * (100 - quality) / 100)


def _save_png(image: Image.Image, out: io.BytesIO, quality: int | None, parameters: str, exif: bytes,
              xmp: bytes) -> None:
    image = image if image.mode in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1") else image.convert("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("Software", SOFTWARE)
    info.add_text("Description", DESCRIPTION)
    info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
    if png_encoder(image, quality) == "pillow":
        level = DEFAULT_PNG_LEVEL if quality is None else _png_level(quality)
        image.save(out, "PNG", pnginfo=info, compress_level=level, exif=exif)
        return
    # The chunks Pillow would write before the image data, in its order: the text chunks, then eXIf (the EXIF
    # block without its "Exif\0\0" header).
    chunks = io.BytesIO()
    for cid, data, *_after_idat in info.chunks:
        PngImagePlugin.putchunk(chunks, cid, data)
    PngImagePlugin.putchunk(chunks, b"eXIf", exif.removeprefix(b"Exif\x00\x00"))
    out.write(_with_chunks(_fpng(image), chunks.getvalue()))


def _fpng(image: Image.Image) -> bytes:
    channels = FAST_PNG_MODES[image.mode]
    pixels = image.tobytes()
    if len(pixels) != image.width * image.height * channels:  # fpng reads width * height * channels bytes
        raise ValueError(f"{image.mode} image of {image.size} gave {len(pixels)} bytes")
    return fpng.from_bytes(pixels, image.width, image.height, channels)


def _with_chunks(png: bytes, chunks: bytes) -> bytes:
    """``png`` with ``chunks`` (whole chunks: length, type, data, CRC) inserted right after its IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG that starts with its IHDR chunk")
    end = 8 + 12 + int.from_bytes(png[8:12], "big")  # signature, then length + type + data + CRC
    return png[:end] + chunks + png[end:]


def _save_gif(image: Image.Image, out: io.BytesIO, quality: int | None, parameters: str) -> None:
    colors = 256 if quality is None else 2 + round(254 * quality / 100)
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    paletted = rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    paletted.save(out, "GIF", comment=f"{DESCRIPTION}\n{parameters}".encode(), optimize=False)
