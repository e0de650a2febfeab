"""Training datasets: the images and captions a LoRA learns from, read from a zip archive or a folder.

The format is fal's trainers': images (PNG, JPEG, WebP, AVIF, BMP, GIF, TIFF), each optionally captioned by a
same-named ``.txt`` file (``cat.png`` + ``cat.txt``); ``default_caption`` captions the rest. Image-to-image
(``edit``) datasets hold pairs ``ROOT_start.EXT`` (the input) and ``ROOT_end.EXT`` (the target), captioned by
``ROOT.txt``; a pair may have up to three more inputs, ``ROOT_start2`` to ``ROOT_start4`` (reference images). Non-image files, archives inside the archive and system files (``__MACOSX/``, ``.DS_Store``,
hidden files) are skipped with a note.

An archive is never extracted: its members are read in memory. Everything a header can tell is checked before
any member is read (entry count, names, links, sizes and compression ratios), sizes are enforced again while
reading (headers can lie), and each image's header is checked before it is decoded. Every refusal is an
``InputError`` on ``image_data_url`` (``default_caption`` when captions are missing), before any GPU time.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, ImageOps

from fluxserve import fetch, inputs
from fluxserve.request import InputError

FIELD = "image_data_url"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"})
SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
RATIO_FLOOR = 1024**2  # entries below 1 MiB are not held to the ratio: short captions compress very well
INDEX_BYTES_PER_ENTRY = 1024  # an archive's index may hold 1 KiB per allowed entry (names are short)
SPOOL_BYTES = 32 * 1024**2  # a downloaded archive stays in memory up to this size, then goes to a temp file
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class DatasetLimits:
    """What a dataset may hold. ``min_side``: the trainer resizes images to its training resolution (1024 by
    default); a side below 256 px would be upscaled at least 4x, and 256 px is 16 image tokens, the least
    that still carries a composition. Images beyond ``max_side`` are downscaled (aspect kept) when loaded,
    which bounds the memory a dataset takes without losing anything a 2048 px training resolution uses."""

    max_files: int = 1000  # files in the archive or folder (skipped ones included, folders not)
    max_archive_bytes: int = 1024**3  # the zip itself (a download stops there)
    max_total_bytes: int = 4 * 1024**3  # all images and captions, uncompressed
    max_entry_bytes: int = 64 * 1024**2  # one image or caption, uncompressed
    max_ratio: float = 100.0  # uncompressed / compressed, per entry and for the archive
    min_side: int = 256  # pixels, each side of each image
    max_megapixels: float = inputs.DEFAULT_MAX_INPUT_MEGAPIXELS  # one image, from its header
    max_side: int = 2048  # larger images are downscaled to this long side
    max_total_megapixels: float = 1024.0  # all images as kept (3 GiB of RGB pixels)


@dataclass
class Example:
    """One training example: for edit datasets ``image`` is the END image (the target), ``starts`` the inputs
    (``ROOT_start``, then ``ROOT_start2`` ... ``ROOT_start4`` where given); empty for text-to-image."""

    image: Image.Image
    caption: str
    starts: list[Image.Image] = field(default_factory=list)
    name: str = ""  # the entry's path without its extension (the pair's ROOT for edit datasets), for logs


@dataclass
class Dataset:
    examples: list[Example]
    notes: list[str]  # log lines: files skipped and why


@dataclass
class _Entry:
    name: str  # path inside the archive or folder, "/"-separated
    size: int  # uncompressed size as declared (zip) or seen (folder)
    compressed: int | None  # compressed size as declared; None for a folder's files
    read: Callable[[], bytes]


def load_dataset(source: str | os.PathLike | bytes, *, edit: bool = False, default_caption: str | None = None,
                 limits: DatasetLimits | None = None) -> Dataset:
    """Read a dataset from a zip file path, a folder path, zip bytes, an http(s) URL or a data URI (URLs go
    through the guarded fetcher with ``max_archive_bytes`` as the cap; API callers may only give URLs and data
    URIs: see ``check_api_source``). Examples come sorted by name, so the same data trains the same LoRA."""
    limits = limits or DatasetLimits()
    default_caption = (default_caption or "").strip() or None
    notes: list[str] = []
    with ExitStack() as stack:
        entries = _open(source, limits, notes, stack)
        images, captions = _classify(entries, notes)
        if not images:
            raise InputError(FIELD, "the archive holds no images (PNG, JPEG, WebP, AVIF, BMP, GIF or TIFF)")
        _check_sizes([*images.values(), *captions.values()], limits)
        groups = _pairs(images) if edit else {stem: (entry, []) for stem, entry in images.items()}
        texts = {stem: _caption(captions[stem]) for stem in groups if stem in captions}
        for stem in sorted(set(captions) - set(groups)):
            wanted = "image pair of that name (a pair's caption is ROOT.txt)" if edit else "image of that name"
            notes.append(f"skipped {_short(captions[stem].name)}: no {wanted}")
        missing = sorted(stem for stem in groups if not texts.get(stem))
        if missing and default_caption is None:
            raise InputError("default_caption", f"{len(missing)} of {len(groups)} "
                             f"{'image pairs' if edit else 'images'} have no caption (a same-named .txt file, "
                             f"e.g. {_missing_caption_name(missing[0], groups, edit)}); give default_caption "
                             "or add the captions")
        decoder = _Decoder(limits)
        examples = []
        for stem in sorted(groups):
            end, starts = groups[stem]
            examples.append(Example(image=decoder.decode(end), caption=texts.get(stem) or default_caption or "",
                                    starts=[decoder.decode(start) for start in starts], name=stem))
    return Dataset(examples, notes)


def check_api_source(source: object) -> None:
    """Refuse what an API caller may not give as ``image_data_url``: anything but an http(s) URL or a data URI
    (a caller must not name files or folders on the server)."""
    if not isinstance(source, str) or not source.strip().lower().startswith(("http://", "https://", "data:")):
        raise InputError(FIELD, "must be an http(s) URL or a data URI of a zip archive")


# Sources


def _open(source: object, limits: DatasetLimits, notes: list[str], stack: ExitStack) -> list[_Entry]:
    if isinstance(source, bytes | bytearray | memoryview):
        return _zip_entries(_capped(bytes(source), limits), limits, stack)
    if isinstance(source, os.PathLike):
        path = Path(source)
    elif isinstance(source, str) and source.strip():
        text = source.strip()
        if text.lower().startswith(("http://", "https://")):
            return _zip_entries(_download(text, limits, stack), limits, stack)
        if text.lower().startswith("data:"):
            if len(text) * 3 // 4 > limits.max_archive_bytes + 3:
                raise InputError(FIELD, f"the archive is larger than {_size(limits.max_archive_bytes)}")
            return _zip_entries(_capped(inputs.data_uri_bytes(text, FIELD), limits), limits, stack)
        path = Path(text.removeprefix("file://")).expanduser()
    else:
        raise InputError(FIELD, "must be an http(s) URL, a data URI, a zip file or a folder")
    if path.is_dir():
        return _folder_entries(path, limits, notes)
    if not path.is_file():
        raise InputError(FIELD, f"{_short(str(path))!r} is not an http(s) URL, a data URI, a zip file or a folder")
    if path.stat().st_size > limits.max_archive_bytes:
        raise InputError(FIELD, f"the archive is larger than {_size(limits.max_archive_bytes)}")
    return _zip_entries(stack.enter_context(path.open("rb")), limits, stack)


def _capped(data: bytes, limits: DatasetLimits) -> BinaryIO:
    if len(data) > limits.max_archive_bytes:
        raise InputError(FIELD, f"the archive is larger than {_size(limits.max_archive_bytes)}")
    return io.BytesIO(data)


def _download(url: str, limits: DatasetLimits, stack: ExitStack) -> BinaryIO:
    """The archive at ``url``, through the guarded fetcher (internal addresses refused, byte cap, and the
    deadline of LoRA downloads: datasets are large too)."""
    policy = fetch.current()
    spool = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES))  # noqa: SIM115
    try:
        with fetch.open_stream(url, max_bytes=limits.max_archive_bytes, deadline_s=policy.lora_deadline_s,
                               policy=policy) as body:
            for chunk in body:
                spool.write(chunk)
    except fetch.FetchError as exc:
        raise InputError(FIELD, f"could not download {_short(url)!r}: {exc.message}") from None
    spool.seek(0)
    return spool


def _zip_entries(file: BinaryIO, limits: DatasetLimits, stack: ExitStack) -> list[_Entry]:
    _check_index(file, limits)
    try:
        archive = stack.enter_context(zipfile.ZipFile(file))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError):
        file.seek(0)
        kind = inputs.image_type(file.read(64))
        hint = f" (it is one {kind.removeprefix('image/').upper()} image; give a zip of images)" if kind else ""
        raise InputError(FIELD, f"is not a zip archive{hint}") from None
    infos = [info for info in archive.infolist() if not info.is_dir()]
    if len(infos) > limits.max_files:
        raise InputError(FIELD, f"the archive holds {len(infos)} files; at most {limits.max_files} are allowed")
    reader = _MemberReader(archive, limits)
    entries = []
    for info in infos:
        _check_name(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise InputError(FIELD, f"{_short(info.filename)} is a symbolic link; links are not accepted")
        if kind not in (0, stat.S_IFREG):
            raise InputError(FIELD, f"{_short(info.filename)} is not a regular file")
        if info.flag_bits & 0x1:
            raise InputError(FIELD, f"{_short(info.filename)} is encrypted; encrypted archives are not accepted")
        entries.append(_Entry(info.filename, info.file_size, info.compress_size,
                              lambda info=info: reader.read(info)))
    return entries


def _check_index(file: BinaryIO, limits: DatasetLimits) -> None:
    """Read the entry count and index size from the archive's end record (zip64 too) and refuse an index too
    large for the limits before ``zipfile`` parses it: parsing millions of entries takes gigabytes."""
    file.seek(0, os.SEEK_END)
    size = file.tell()
    tail_size = min(size, 22 + 0xFFFF)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return  # not a zip archive: zipfile says so
    entries, index_size = struct.unpack("<4s4H2LH", tail[at:at + 22])[4:6]
    if (entries == 0xFFFF or index_size == 0xFFFFFFFF) and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        file.seek(struct.unpack("<4sLQL", tail[at - 20:at])[2])
        record = file.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            entries, index_size = struct.unpack("<4sQ2H2L4Q", record)[7:9]
    most = 2 * limits.max_files  # files and the folders holding them
    if entries > most or index_size > most * INDEX_BYTES_PER_ENTRY:
        raise InputError(FIELD, f"the archive lists {entries} entries in a {_size(index_size)} index; at most "
                         f"{limits.max_files} files are allowed")


def _check_name(name: str) -> None:
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts or "\0" in name:
        raise InputError(FIELD, f"the archive holds an entry named {_short(name)!r}; absolute paths, drive "
                         "letters and '..' are not accepted")


class _MemberReader:
    """Reads archive members in memory, holding each to its declared size, ``max_entry_bytes`` and, across
    members, ``max_total_bytes``: a header that lies about a size is caught here."""

    def __init__(self, archive: zipfile.ZipFile, limits: DatasetLimits):
        self.archive, self.limits, self.total = archive, limits, 0

    def read(self, info: zipfile.ZipInfo) -> bytes:
        limit = min(info.file_size, self.limits.max_entry_bytes)
        chunks, received = [], 0
        try:
            with self.archive.open(info) as member:
                while chunk := member.read(1024**2):
                    received += len(chunk)
                    self.total += len(chunk)
                    if received > limit or self.total > self.limits.max_total_bytes:
                        raise InputError(FIELD, f"{_short(info.filename)} holds more data than its header "
                                         "declares or the limits allow")
                    chunks.append(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise InputError(FIELD, f"{_short(info.filename)} could not be read: its data does not match its "
                             f"header ({exc})") from None
        return b"".join(chunks)


def _folder_entries(root: Path, limits: DatasetLimits, notes: list[str]) -> list[_Entry]:
    """A folder's files, with the same rules as an archive's members; links are followed only to files inside
    the folder, linked folders are not entered."""
    root = root.resolve()
    entries: list[_Entry] = []
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        for name in sorted(subfolders):
            path = Path(folder, name)
            if _is_system((relative / name).as_posix()) or path.is_symlink():
                subfolders.remove(name)
                reason = "a link to a folder" if path.is_symlink() else "a system or hidden folder"
                notes.append(f"skipped {(relative / name).as_posix()}/: {reason}")
        for name in sorted(files):
            path, entry_name = Path(folder, name), (relative / name).as_posix()
            if path.is_symlink() and not (path.resolve().is_relative_to(root) and path.resolve().is_file()):
                notes.append(f"skipped {entry_name}: a link to a file outside the folder")
                continue
            if len(entries) == limits.max_files:
                raise InputError(FIELD, f"the folder holds more than {limits.max_files} files")
            entries.append(_Entry(entry_name, path.stat().st_size, None,
                                  lambda path=path: _read_file(path, limits)))
    return entries


def _read_file(path: Path, limits: DatasetLimits) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(limits.max_entry_bytes + 1)
    except OSError as exc:
        raise InputError(FIELD, f"{path.name} could not be read: {exc.strerror}") from None
    if len(data) > limits.max_entry_bytes:
        raise InputError(FIELD, f"{path.name} is larger than {_size(limits.max_entry_bytes)}")
    return data


# Sorting the entries out


def _classify(entries: list[_Entry], notes: list[str]) -> tuple[dict[str, _Entry], dict[str, _Entry]]:
    """Images and captions by their path without extension; everything else is skipped with a note."""
    images: dict[str, _Entry] = {}
    captions: dict[str, _Entry] = {}
    system = []
    for entry in sorted(entries, key=lambda entry: entry.name):
        if _is_system(entry.name):
            system.append(entry.name)
            continue
        suffix = PurePosixPath(entry.name).suffix.lower()
        stem = entry.name[:len(entry.name) - len(suffix)]
        if suffix == ".txt":
            captions[stem] = entry
        elif suffix in IMAGE_SUFFIXES:
            if stem in images:
                raise InputError(FIELD, f"{_short(images[stem].name)} and {_short(entry.name)} have the same "
                                 "name; give each image its own name")
            images[stem] = entry
        elif suffix in ARCHIVE_SUFFIXES:
            notes.append(f"skipped {_short(entry.name)}: archives inside the archive are not opened")
        else:
            notes.append(f"skipped {_short(entry.name)}: not an image")
    if system:
        shown = ", ".join(_short(name, 40) for name in system[:3]) + (", ..." if len(system) > 3 else "")
        notes.append(f"skipped {len(system)} system or hidden file{'s' if len(system) > 1 else ''} "
                     f"(__MACOSX/, .DS_Store and the like): {shown}")
    return images, captions


def _is_system(name: str) -> bool:
    return any(part.startswith(".") or part.lower() in SYSTEM_NAMES for part in name.split("/")
               if part not in ("", "."))


def _check_sizes(entries: list[_Entry], limits: DatasetLimits) -> None:
    """Per-entry and total sizes and compression ratios, from the headers, before anything is read."""
    for entry in entries:
        if entry.size > limits.max_entry_bytes:
            raise InputError(FIELD, f"{_short(entry.name)} is {_size(entry.size)} uncompressed; at most "
                             f"{_size(limits.max_entry_bytes)} per file is allowed")
        if entry.compressed is not None and _over_ratio(entry.size, entry.compressed, limits):
            raise InputError(FIELD, f"{_short(entry.name)} expands {entry.size / max(entry.compressed, 1):.0f}"
                             f" times when uncompressed; at most {limits.max_ratio:g} times is allowed")
    total = sum(entry.size for entry in entries)
    if total > limits.max_total_bytes:
        raise InputError(FIELD, f"the images and captions total {_size(total)} uncompressed; at most "
                         f"{_size(limits.max_total_bytes)} is allowed")
    compressed = [entry.compressed for entry in entries if entry.compressed is not None]
    if compressed and _over_ratio(total, sum(compressed), limits):
        raise InputError(FIELD, f"the archive expands {total / max(sum(compressed), 1):.0f} times when "
                         f"uncompressed; at most {limits.max_ratio:g} times is allowed")


def _over_ratio(size: int, compressed: int, limits: DatasetLimits) -> bool:
    return size > RATIO_FLOOR and size > limits.max_ratio * max(compressed, 1)


MAX_STARTS = 4  # ROOT_start, ROOT_start2, ROOT_start3, ROOT_start4
_PAIR_PART = re.compile(r"^(.*)_(start([2-4])?|end)$", re.IGNORECASE)


def _pairs(images: dict[str, _Entry]) -> dict[str, tuple[_Entry, list[_Entry]]]:
    """Edit datasets: by ROOT, the ``ROOT_end`` image and its inputs ``ROOT_start`` (then ``ROOT_start2`` to
    ``ROOT_start4``, in that order), as (end, starts)."""
    starts: dict[str, dict[int, _Entry]] = {}
    ends: dict[str, _Entry] = {}
    for stem, entry in images.items():
        match = _PAIR_PART.match(stem)
        if not match:
            raise InputError(FIELD, f"{_short(entry.name)} is not named ROOT_start (ROOT_start2 to ROOT_start{MAX_STARTS} "
                             "for more inputs) or ROOT_end; an edit dataset holds pairs such as photo_start.jpg and "
                             "photo_end.jpg")
        root, part, number = match.groups()
        if part.lower() == "end":
            ends[root] = entry
        else:
            starts.setdefault(root, {})[int(number or 1)] = entry
    for root in sorted(set(starts) | set(ends)):
        if root not in ends:
            have = min(starts[root].items())[1]
            raise InputError(FIELD, f"{_short(have.name)} has no {_short(root)}_end image to pair with")
        if 1 not in starts.get(root, {}):
            raise InputError(FIELD, f"{_short(ends[root].name)} has no {_short(root)}_start image to pair with")
    return {root: (ends[root], [starts[root][n] for n in sorted(starts[root])]) for root in ends}


def _caption(entry: _Entry) -> str:
    return entry.read().decode("utf-8-sig", errors="replace").strip()


def _missing_caption_name(stem: str, groups: dict[str, tuple[_Entry, list[_Entry]]], edit: bool) -> str:
    return f"{stem}.txt for {groups[stem][0].name}" if not edit else f"{stem}.txt for the pair {stem}"


# Decoding


class _Decoder:
    """Checks each image's header (size, minimum side, aspect ratio) before decoding it under the reference
    images' decompression-bomb guard, applies its EXIF orientation, converts it to RGB and keeps at most
    ``max_side`` a side and ``max_total_megapixels`` in all."""

    def __init__(self, limits: DatasetLimits):
        self.limits, self.pixels = limits, 0

    def decode(self, entry: _Entry) -> Image.Image:
        limits, data = self.limits, entry.read()
        try:
            image = inputs.open_image_bytes(data, FIELD, limits.max_megapixels, kind="a training image")
            width, height = image.size
            if min(width, height) < limits.min_side:
                raise InputError(FIELD, f"image is {width}x{height}; each side of a training image must be at "
                                 f"least {limits.min_side} pixels")
            if max(width / height, height / width) > inputs.MAX_ASPECT:
                raise InputError(FIELD, f"image is {width}x{height}; the aspect ratio must be at most "
                                 f"{inputs.MAX_ASPECT:g}:1")
            image = _upright(inputs.decode_image(image, FIELD))
        except InputError as exc:
            raise InputError(FIELD, f"{_short(entry.name)}: {exc.message}") from None
        if max(image.size) > limits.max_side:
            image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        self.pixels += image.size[0] * image.size[1]
        if self.pixels > limits.max_total_megapixels * inputs.MEGAPIXEL:
            raise InputError(FIELD, f"the images total more than {limits.max_total_megapixels:g} MP (after "
                             f"downscaling to {limits.max_side} px a side); use fewer or smaller images")
        return image


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is when its EXIF data cannot be read."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken metadata is no reason to refuse the pixels
        return image


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.3g} GiB"
    return f"{n / 1024**2:.3g} MiB" if n >= 1024**2 else f"{n / 1024:.3g} KiB"
