"""The files of a training dataset, from a zip archive (a path, bytes, a data URI or an http(s) URL) or a folder,
read safely: never extracted, each member streamed in small chunks and held to its declared size.

Everything an archive's headers tell is checked before any member is read: the entry count and index size
(from the end record, before ``zipfile`` parses the index), names, links, encryption. ``Entry.chunks`` holds
every read to the entry's declared size and ``max_entry_bytes`` (``zipfile`` checks the data against its size
and checksum as it goes), so a header that lies is caught by whoever reads the entry. An opened archive stays
open while its entries are referenced (the worker reads images from it one at a time) and closes when
``Opened.close`` is called or the last reference goes. Every refusal is an ``InputError`` on ``image_data_url``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import tempfile
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fluxserve import fetch, inputs
from fluxserve.request import InputError
from fluxserve.training.limits import DatasetLimits

FIELD = "image_data_url"
CHUNK = 1024**2  # bytes read from a member at a time
INDEX_BYTES_PER_ENTRY = 1024  # an archive's index may hold 1 KiB per allowed entry (names are short)
SPOOL_BYTES = 32 * 1024**2  # a downloaded archive stays in memory up to this size, then goes to a temp file
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class Entry:
    """One file of the dataset: its path inside the archive or folder ("/"-separated), its uncompressed size as
    declared (zip) or seen (folder), its compressed size as declared (None for a folder's files), and
    ``chunks(limit)``, which streams its bytes and refuses more than ``min(size, limit)`` of them."""

    name: str
    size: int
    compressed: int | None
    chunks: Callable[[int], Iterator[bytes]]

    def read(self, limit: int) -> bytes:
        return b"".join(self.chunks(limit))


@dataclass
class Opened:
    """A source's entries, and ``close`` for what they read from (an archive, a downloaded copy)."""

    entries: list[Entry]
    close: Callable[[], None]


def open_source(source: object, limits: DatasetLimits, notes: list[str]) -> Opened:
    """The entries of a zip file path, a folder path, zip bytes, an http(s) URL or a data URI (URLs go through the
    guarded fetcher with ``max_archive_bytes`` as the cap)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return _zip(_capped(bytes(source), limits), limits, ExitStack())
    if isinstance(source, os.PathLike):
        path = Path(source)
    elif isinstance(source, str) and source.strip():
        text = source.strip()
        if text.lower().startswith(("http://", "https://")):
            stack = ExitStack()
            try:
                return _zip(_download(text, limits, stack), limits, stack)
            except BaseException:
                stack.close()
                raise
        if text.lower().startswith("data:"):
            if len(text) * 3 // 4 > limits.max_archive_bytes + 3:
                raise InputError(FIELD, f"the archive is larger than {size_text(limits.max_archive_bytes)}")
            return _zip(_capped(inputs.data_uri_bytes(text, FIELD), limits), limits, ExitStack())
        path = Path(text.removeprefix("file://")).expanduser()
    else:
        raise InputError(FIELD, "must be an http(s) URL, a data URI, a zip file or a folder")
    if path.is_dir():
        return Opened(_folder_entries(path, limits, notes), lambda: None)
    if not path.is_file():
        raise InputError(FIELD, f"{short(str(path))!r} is not an http(s) URL, a data URI, a zip file or a folder")
    if path.stat().st_size > limits.max_archive_bytes:
        raise InputError(FIELD, f"the archive is larger than {size_text(limits.max_archive_bytes)}")
    stack = ExitStack()
    try:
        return _zip(stack.enter_context(path.open("rb")), limits, stack)
    except BaseException:
        stack.close()
        raise


def _capped(data: bytes, limits: DatasetLimits) -> BinaryIO:
    if len(data) > limits.max_archive_bytes:
        raise InputError(FIELD, f"the archive is larger than {size_text(limits.max_archive_bytes)}")
    return io.BytesIO(data)


def _download(url: str, limits: DatasetLimits, stack: ExitStack) -> BinaryIO:
    """The archive at ``url``, through the guarded fetcher (internal addresses refused, byte cap, and the
    deadline of dataset downloads)."""
    policy = fetch.current()
    spool = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES))  # noqa: SIM115
    try:
        with fetch.open_stream(url, max_bytes=limits.max_archive_bytes, deadline_s=policy.dataset_deadline_s,
                               policy=policy) as body:
            for chunk in body:
                spool.write(chunk)
    except fetch.FetchError as exc:
        raise InputError(FIELD, f"could not download {short(url)!r}: {exc.message}") from None
    spool.seek(0)
    return spool


class _Archive:
    """An open zip archive; ``stack`` closes it and the file it reads, when asked or when no entry refers to
    the archive any more."""

    def __init__(self, file: BinaryIO, stack: ExitStack):
        try:
            self.zip = stack.enter_context(zipfile.ZipFile(file))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError):
            file.seek(0)
            kind = inputs.image_type(file.read(64))
            hint = f" (it is one {kind.removeprefix('image/').upper()} image; give a zip of images)" if kind else ""
            raise InputError(FIELD, f"is not a zip archive{hint}") from None
        self.close = weakref.finalize(self, stack.close)

    def chunks(self, info: zipfile.ZipInfo, limit: int) -> Iterator[bytes]:
        limit, received = min(info.file_size, limit), 0
        try:
            with self.zip.open(info) as member:
                while chunk := member.read(CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise InputError(FIELD, f"{short(info.filename)} holds more data than its header "
                                         "declares or the limits allow")
                    yield chunk
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise InputError(FIELD, f"{short(info.filename)} could not be read: its data does not match its "
                             f"header ({exc})") from None


def _zip(file: BinaryIO, limits: DatasetLimits, stack: ExitStack) -> Opened:
    _check_index(file, limits)
    archive = _Archive(file, stack)
    infos = [info for info in archive.zip.infolist() if not info.is_dir()]
    if len(infos) > limits.max_files:
        archive.close()
        raise InputError(FIELD, f"the archive holds {len(infos)} files; at most {limits.max_files} are allowed")
    entries = []
    for info in infos:
        try:
            _check_member(info)
        except InputError:
            archive.close()
            raise
        entries.append(Entry(info.filename, info.file_size, info.compress_size,
                             lambda limit, info=info: archive.chunks(info, limit)))
    return Opened(entries, archive.close)


def _check_member(info: zipfile.ZipInfo) -> None:
    _check_name(info.filename)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise InputError(FIELD, f"{short(info.filename)} is a symbolic link; links are not accepted")
    if kind not in (0, stat.S_IFREG):
        raise InputError(FIELD, f"{short(info.filename)} is not a regular file")
    if info.flag_bits & 0x1:
        raise InputError(FIELD, f"{short(info.filename)} is encrypted; encrypted archives are not accepted")


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
        raise InputError(FIELD, f"the archive lists {entries} entries in a {size_text(index_size)} index; at "
                         f"most {limits.max_files} files are allowed")


def _check_name(name: str) -> None:
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts or "\0" in name:
        raise InputError(FIELD, f"the archive holds an entry named {short(name)!r}; absolute paths, drive "
                         "letters and '..' are not accepted")


def _folder_entries(root: Path, limits: DatasetLimits, notes: list[str]) -> list[Entry]:
    """A folder's files, with the same rules as an archive's members; links are followed only to files inside
    the folder, linked folders are not entered."""
    root = root.resolve()
    entries: list[Entry] = []
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        for name in sorted(subfolders):
            path = Path(folder, name)
            if is_system((relative / name).as_posix()) or path.is_symlink():
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
            entries.append(Entry(entry_name, path.stat().st_size, None,
                                 lambda limit, path=path: _file_chunks(path, limit)))
    return entries


def _file_chunks(path: Path, limit: int) -> Iterator[bytes]:
    received = 0
    try:
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                received += len(chunk)
                if received > limit:
                    raise InputError(FIELD, f"{path.name} is larger than {size_text(limit)}")
                yield chunk
    except OSError as exc:
        raise InputError(FIELD, f"{path.name} could not be read: {exc.strerror}") from None


SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})


def is_system(name: str) -> bool:
    """System and hidden files and folders (``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``, dot files)."""
    return any(part.startswith(".") or part.lower() in SYSTEM_NAMES for part in name.split("/")
               if part not in ("", "."))


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def size_text(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.3g} GiB"
    return f"{n / 1024**2:.3g} MiB" if n >= 1024**2 else f"{n / 1024:.3g} KiB"
