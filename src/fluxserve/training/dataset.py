"""Training datasets: the images and captions a LoRA learns from, read from a zip archive or a folder.

The format is fal's trainers': images (PNG, JPEG, WebP, AVIF, BMP, GIF, TIFF), each optionally captioned by a
same-named ``.txt`` file (``cat.png`` + ``cat.txt``); ``default_caption`` captions the rest. Image-to-image
(``edit``) datasets hold pairs ``ROOT_start.EXT`` (the input) and ``ROOT_end.EXT`` (the target), captioned by
``ROOT.txt``; a pair may have up to three more inputs, ``ROOT_start2`` to ``ROOT_start4`` (reference images).
Non-image files, archives inside the archive and system files (``__MACOSX/``, ``.DS_Store``, hidden files) are
skipped with a note.

``load_dataset`` checks everything without decoding a pixel: the archive's headers (``archive``), every size
and compression ratio as declared, the captions, then each image's data streamed once (checked against its
header and counted against the total) with its dimensions read from its header (``imagesize``, the first
``HEADER_BYTES``): size, minimum side, aspect ratio and the total megapixels as kept. What it costs is the
archive (where it is held in memory), its index, one image header and one caption at a time: a few MiB, however
many pixels the images hold. An example's images are decoded only when asked for (``Example.image`` /
``Example.starts``), one at a time, and never kept: the API checks a dataset at submit without decoding it, and
the worker decodes each image as the trainer encodes it. Every refusal is an ``InputError`` on
``image_data_url`` (``default_caption`` when captions are missing).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Self, overload

import imagesize
from PIL import Image, ImageOps

from fluxserve import inputs
from fluxserve.request import InputError
from fluxserve.training.archive import FIELD, Entry, is_system, open_source, short, size_text
from fluxserve.training.limits import DatasetLimits

__all__ = ["FIELD", "Dataset", "DatasetLimits", "Example", "check_api_source", "check_dataset", "load_dataset"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"})
RATIO_FLOOR = 1024**2  # entries below 1 MiB are not held to the ratio: short captions compress very well
HEADER_BYTES = 4 * 1024**2  # an image's dimensions must be in its first 4 MiB (a JPEG's metadata comes first)
_BMP_TIFF = (b"BM", b"II*\x00", b"MM\x00*")  # the signatures inputs.image_type does not know


class _Image:
    """One image of the dataset: its entry, the dimensions its header declares, and how to decode it."""

    def __init__(self, entry: Entry, size: tuple[int, int], limits: DatasetLimits):
        self.entry, self.size, self.limits = entry, size, limits

    def decode(self) -> Image.Image:
        """Decoded under the reference images' decompression-bomb guard, refused when it holds more pixels than
        its header declared (the total was counted from the headers), turned by its EXIF orientation, as RGB
        (transparency on white) and at most ``max_side`` a side."""
        limits = self.limits
        try:
            image = inputs.open_image_bytes(self.entry.read(limits.max_entry_bytes), FIELD, limits.max_megapixels,
                                            kind="a training image")
            width, height = image.size
            if width * height > self.size[0] * self.size[1]:
                raise InputError(FIELD, f"image is {width}x{height}, more than the {self.size[0]}x{self.size[1]} "
                                 "its header declares")
            _check_shape(width, height, limits)
            image = _upright(inputs.decode_image(image, FIELD))
        except InputError as exc:
            raise InputError(FIELD, f"{short(self.entry.name)}: {exc.message}") from None
        if max(image.size) > limits.max_side:
            image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        return image


class _Decoded(Sequence[Image.Image]):
    """Images decoded each time one is asked for; the count costs nothing. Compares as the list of its images."""

    def __init__(self, images: list[_Image]):
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...
    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [image.decode() for image in self._images[index]]
        return self._images[index].decode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class Example:
    """One training example: ``image`` (for edit datasets the END image, the target) and ``starts`` (the inputs
    ``ROOT_start``, then ``ROOT_start2`` ... ``ROOT_start4`` where given; empty for text-to-image) are decoded from
    the dataset on each access and never kept, so holding examples costs their captions, not their pixels.
    ``name`` is the entry's path without its extension (the pair's ROOT for edit datasets), for logs."""

    def __init__(self, image: _Image, caption: str, starts: list[_Image], name: str):
        self._image, self._starts, self.caption, self.name = image, starts, caption, name

    @property
    def image(self) -> Image.Image:
        return self._image.decode()

    @property
    def starts(self) -> Sequence[Image.Image]:
        return _Decoded(self._starts)

    def __repr__(self) -> str:
        return f"Example({self.name!r}, {len(self._starts)} start image(s), caption={self.caption!r})"


@dataclass
class Dataset:
    """The examples, sorted by name, and the notes (files skipped and why). The examples read from the
    dataset's archive while they are used: ``with load_dataset(...) as dataset:`` closes it at the end (else it
    closes when the examples are gone)."""

    examples: list[Example]
    notes: list[str]
    megapixels: float  # all images as kept, from their headers
    close: Callable[[], None] = field(default=lambda: None, repr=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_dataset(source: str | os.PathLike | bytes, *, edit: bool = False, default_caption: str | None = None,
                 limits: DatasetLimits | None = None) -> Dataset:
    """Open and check a dataset from a zip file path, a folder path, zip bytes, an http(s) URL or a data URI
    (API callers may only give URLs and data URIs: see ``check_api_source``), decoding nothing: see the module's
    docstring. The same data gives the same examples in the same order, so the same seed trains the same LoRA."""
    limits = limits or DatasetLimits()
    default_caption = (default_caption or "").strip() or None
    notes: list[str] = []
    opened = open_source(source, limits, notes)
    try:
        images, captions = _classify(opened.entries, notes)
        if not images:
            raise InputError(FIELD, "the archive holds no images (PNG, JPEG, WebP, AVIF, BMP, GIF or TIFF)")
        _check_sizes(list(images.values()), list(captions.values()), limits)
        groups = _pairs(images) if edit else {stem: (entry, []) for stem, entry in images.items()}
        counter = _Counter(limits)
        texts = {stem: counter.caption(captions[stem]) for stem in sorted(groups) if stem in captions}
        for stem in sorted(set(captions) - set(groups)):
            wanted = "image pair of that name (a pair's caption is ROOT.txt)" if edit else "image of that name"
            notes.append(f"skipped {short(captions[stem].name)}: no {wanted}")
        missing = sorted(stem for stem in groups if not texts.get(stem))
        if missing and default_caption is None:
            raise InputError("default_caption", f"{len(missing)} of {len(groups)} "
                             f"{'image pairs' if edit else 'images'} have no caption (a same-named .txt file, "
                             f"e.g. {_missing_caption_name(missing[0], groups, edit)}); give default_caption "
                             "or add the captions")
        examples = []
        for stem in sorted(groups):
            end, starts = groups[stem]
            examples.append(Example(counter.image(end), texts.get(stem) or default_caption or "",
                                    [counter.image(start) for start in starts], stem))
    except BaseException:
        opened.close()
        raise
    return Dataset(examples, notes, counter.pixels / inputs.MEGAPIXEL, opened.close)


def check_dataset(source: str | os.PathLike | bytes, *, edit: bool = False, default_caption: str | None = None,
                  limits: DatasetLimits | None = None) -> None:
    """Everything ``load_dataset`` checks, nothing decoded, nothing kept: what the API runs before a training job
    is queued."""
    load_dataset(source, edit=edit, default_caption=default_caption, limits=limits).close()


def check_api_source(source: object) -> None:
    """Refuse what an API caller may not give as ``image_data_url``: anything but an http(s) URL or a data URI
    (a caller must not name files or folders on the server)."""
    if not isinstance(source, str) or not source.strip().lower().startswith(("http://", "https://", "data:")):
        raise InputError(FIELD, "must be an http(s) URL or a data URI of a zip archive")


# Sorting the entries out


def _classify(entries: list[Entry], notes: list[str]) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Images and captions by their path without extension; everything else is skipped with a note."""
    images: dict[str, Entry] = {}
    captions: dict[str, Entry] = {}
    system = []
    for entry in sorted(entries, key=lambda entry: entry.name):
        if is_system(entry.name):
            system.append(entry.name)
            continue
        suffix = PurePosixPath(entry.name).suffix.lower()
        stem = entry.name[:len(entry.name) - len(suffix)]
        if suffix == ".txt":
            captions[stem] = entry
        elif suffix in IMAGE_SUFFIXES:
            if stem in images:
                raise InputError(FIELD, f"{short(images[stem].name)} and {short(entry.name)} have the same "
                                 "name; give each image its own name")
            images[stem] = entry
        elif suffix in ARCHIVE_SUFFIXES:
            notes.append(f"skipped {short(entry.name)}: archives inside the archive are not opened")
        else:
            notes.append(f"skipped {short(entry.name)}: not an image")
    if system:
        shown = ", ".join(short(name, 40) for name in system[:3]) + (", ..." if len(system) > 3 else "")
        notes.append(f"skipped {len(system)} system or hidden file{'s' if len(system) > 1 else ''} "
                     f"(__MACOSX/, .DS_Store and the like): {shown}")
    return images, captions


def _check_sizes(images: list[Entry], captions: list[Entry], limits: DatasetLimits) -> None:
    """Per-entry and total sizes and compression ratios, as the headers declare them, before anything is read."""
    for entry in captions:
        if entry.size > limits.max_caption_bytes:
            raise InputError(FIELD, f"{short(entry.name)} is {size_text(entry.size)}; a caption may have at most "
                             f"{size_text(limits.max_caption_bytes)}")
    for entry in [*images, *captions]:
        if entry.size > limits.max_entry_bytes:
            raise InputError(FIELD, f"{short(entry.name)} is {size_text(entry.size)} uncompressed; at most "
                             f"{size_text(limits.max_entry_bytes)} per file is allowed")
        if entry.compressed is not None and _over_ratio(entry.size, entry.compressed, limits):
            raise InputError(FIELD, f"{short(entry.name)} expands {entry.size / max(entry.compressed, 1):.0f}"
                             f" times when uncompressed; at most {limits.max_ratio:g} times is allowed")
    total = sum(entry.size for entry in [*images, *captions])
    if total > limits.max_total_bytes:
        raise InputError(FIELD, f"the images and captions total {size_text(total)} uncompressed; at most "
                         f"{size_text(limits.max_total_bytes)} is allowed")
    compressed = [entry.compressed for entry in [*images, *captions] if entry.compressed is not None]
    if compressed and _over_ratio(total, sum(compressed), limits):
        raise InputError(FIELD, f"the archive expands {total / max(sum(compressed), 1):.0f} times when "
                         f"uncompressed; at most {limits.max_ratio:g} times is allowed")


def _over_ratio(size: int, compressed: int, limits: DatasetLimits) -> bool:
    return size > RATIO_FLOOR and size > limits.max_ratio * max(compressed, 1)


MAX_STARTS = 4  # ROOT_start, ROOT_start2, ROOT_start3, ROOT_start4
_PAIR_PART = re.compile(r"^(.*)_(start([2-4])?|end)$", re.IGNORECASE)


def _pairs(images: dict[str, Entry]) -> dict[str, tuple[Entry, list[Entry]]]:
    """Edit datasets: by ROOT, the ``ROOT_end`` image and its inputs ``ROOT_start`` (then ``ROOT_start2`` to
    ``ROOT_start4``, in that order), as (end, starts)."""
    starts: dict[str, dict[int, Entry]] = {}
    ends: dict[str, Entry] = {}
    for stem, entry in images.items():
        match = _PAIR_PART.match(stem)
        if not match:
            raise InputError(FIELD, f"{short(entry.name)} is not named ROOT_start (ROOT_start2 to "
                             f"ROOT_start{MAX_STARTS} for more inputs) or ROOT_end; an edit dataset holds pairs "
                             "such as photo_start.jpg and photo_end.jpg")
        root, part, number = match.groups()
        if part.lower() == "end":
            ends[root] = entry
        else:
            starts.setdefault(root, {})[int(number or 1)] = entry
    for root in sorted(set(starts) | set(ends)):
        if root not in ends:
            have = min(starts[root].items())[1]
            raise InputError(FIELD, f"{short(have.name)} has no {short(root)}_end image to pair with")
        if 1 not in starts.get(root, {}):
            raise InputError(FIELD, f"{short(ends[root].name)} has no {short(root)}_start image to pair with")
    return {root: (ends[root], [starts[root][n] for n in sorted(starts[root])]) for root in ends}


def _missing_caption_name(stem: str, groups: dict[str, tuple[Entry, list[Entry]]], edit: bool) -> str:
    return f"{stem}.txt for {groups[stem][0].name}" if not edit else f"{stem}.txt for the pair {stem}"


# Checking the images by their headers


class _Counter:
    """Streams each image and caption once, counting the bytes really read against ``max_total_bytes`` (sizes
    were checked as declared; this catches headers that lie) and the images' pixels as kept against
    ``max_total_megapixels``."""

    def __init__(self, limits: DatasetLimits):
        self.limits, self.bytes, self.pixels = limits, 0, 0

    def caption(self, entry: Entry) -> str:
        data = entry.read(self.limits.max_caption_bytes)
        self._count(len(data))
        return data.decode("utf-8-sig", errors="replace").strip()

    def image(self, entry: Entry) -> _Image:
        """The image's header read from its first ``HEADER_BYTES`` (the rest streamed past to check it against
        the archive's header) and checked: a known format, a size within ``max_megapixels``, sides of at least
        ``min_side``, the aspect ratio; its pixels as kept count towards the total."""
        limits, head = self.limits, bytearray()
        for chunk in entry.chunks(limits.max_entry_bytes):
            self._count(len(chunk))
            if len(head) < HEADER_BYTES:
                head += chunk[:HEADER_BYTES - len(head)]
        width, height = _header_size(bytes(head), entry.name)
        try:
            if width * height > limits.max_megapixels * inputs.MEGAPIXEL:
                raise InputError(FIELD, f"image is {width}x{height} ({width * height / inputs.MEGAPIXEL:.1f} MP); "
                                 f"a training image may have at most {limits.max_megapixels:g} MP")
            _check_shape(width, height, limits)
        except InputError as exc:
            raise InputError(FIELD, f"{short(entry.name)}: {exc.message}") from None
        self.pixels += math.prod(_kept_size(width, height, limits.max_side))
        if self.pixels > limits.max_total_megapixels * inputs.MEGAPIXEL:
            raise InputError(FIELD, f"the images total more than {limits.max_total_megapixels:g} MP (after "
                             f"downscaling to {limits.max_side} px a side); use fewer or smaller images")
        return _Image(entry, (width, height), limits)

    def _count(self, received: int) -> None:
        self.bytes += received
        if self.bytes > self.limits.max_total_bytes:
            raise InputError(FIELD, f"the images and captions hold more than {size_text(self.limits.max_total_bytes)}"
                             " uncompressed: more than their headers declare")


def _header_size(head: bytes, name: str) -> tuple[int, int]:
    """The dimensions an image's first bytes declare, as stored (before any EXIF turn, which keeps the pixel
    count, the shortest side and the aspect ratio)."""
    if inputs.image_type(head) is None and not head.startswith(_BMP_TIFF):
        raise InputError(FIELD, f"{short(name)}: could not read an image: not a PNG, JPEG, WebP, AVIF, BMP, GIF "
                         "or TIFF file")
    width, height = imagesize.get(io.BytesIO(head), exif_rotation=False)
    if width <= 0 or height <= 0:
        raise InputError(FIELD, f"{short(name)}: could not read an image: no size in its first "
                         f"{size_text(HEADER_BYTES)}")
    return width, height


def _check_shape(width: int, height: int, limits: DatasetLimits) -> None:
    if min(width, height) < limits.min_side:
        raise InputError(FIELD, f"image is {width}x{height}; each side of a training image must be at least "
                         f"{limits.min_side} pixels")
    if max(width / height, height / width) > inputs.MAX_ASPECT:
        raise InputError(FIELD, f"image is {width}x{height}; the aspect ratio must be at most "
                         f"{inputs.MAX_ASPECT:g}:1")


def _kept_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size ``Image.thumbnail`` gives an image downscaled to ``max_side`` on its long side (about)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is when its EXIF data cannot be read."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken metadata is no reason to refuse the pixels
        return image
