"""The LoRA cache's bound: at most ``max_bytes`` of cached LoRA files, least recently used evicted first, never
one that a running job holds.

What counts: every cached LoRA under ``<cache_dir>/loras`` (``<sha256>.safetensors``: downloads and data URIs)
and the files of the Hugging Face cache under ``loras/hf`` (``hf://`` references). Files a caller names on the
server's own disk are used in place and never counted or deleted.

Invariants, across the threads of a process and across processes sharing the cache directory (advisory
``flock`` locks, as the demo weights' builder uses):

* a job holds a *shared* lock on each of its LoRAs (``locks/<name>.lock``) from before it checks that the file
  exists until its adapters are removed (``in_use``); eviction takes an *exclusive* lock without waiting, so a
  held LoRA is skipped, never deleted under a job;
* one process at a time admits or evicts (``.evict.lock``); a new file is admitted (moved into place) only
  after room was made for it, so the cache exceeds ``max_bytes`` only by LoRAs that running jobs hold;
* a file's modification time is its last use (``touch`` on every use).
Lock files are empty and never deleted (deleting one could let two holders lock different files).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locks; a thread of this process may still evict
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
GIB = 1024**3


class CacheTooSmall(ValueError):
    """A LoRA larger than the whole cache bound."""


@dataclass(frozen=True)
class Entry:
    path: Path
    name: str  # the lock's name
    size: int
    used: float  # last use (modification time)


class LoraCache:
    """``LoraCache(root, max_bytes)``: ``root`` is ``<cache_dir>/loras``; ``max_bytes`` None or 0: no bound."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes or None

    # ---- holding -----------------------------------------------------------------------------------------
    def lock_name(self, path: Path) -> str | None:
        """The lock name of a cached file (None for a file outside the cache): its sha256 for a cached LoRA,
        ``hf-<blob>`` for a Hugging Face cache file (a snapshot link is followed to its blob)."""
        path = Path(path)
        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        if relative.parts[:1] == ("hf",):
            return f"hf-{relative.name}"
        return relative.stem if len(relative.parts) == 1 else None

    @contextmanager
    def in_use(self, name: str) -> Iterator[None]:
        """Hold LoRA ``name`` (a shared lock) for the body: eviction skips it."""
        with self._flock(self.root / "locks" / f"{name}.lock", shared=True):
            yield

    @staticmethod
    def touch(path: Path) -> None:
        """Record a use (the file's modification time): the least recently used file is evicted first."""
        try:
            os.utime(path)
        except OSError:  # gone or read-only: its age stays as it was
            pass

    # ---- admitting and evicting ------------------------------------------------------------------------------
    def admit(self, staged: Path, final: Path) -> None:
        """Move the downloaded ``staged`` file to ``final`` once room is made for it (evicting unused LoRAs);
        the caller holds ``final``'s lock (``in_use``). ``CacheTooSmall`` when it alone exceeds the bound."""
        size = staged.stat().st_size
        if self.max_bytes is not None and size > self.max_bytes:
            raise CacheTooSmall(f"the LoRA is {size / GIB:.2f} GiB, more than the whole LoRA cache holds "
                                f"({self.max_bytes / GIB:.2f} GiB, FLUXSERVE_LORA_CACHE_GB)")
        with self._flock(self.root / ".evict.lock", shared=False):
            if final.is_file():  # another worker placed the same content meanwhile
                staged.unlink(missing_ok=True)
            else:
                self._make_room(size, keep=final)
                os.replace(staged, final)
        self.touch(final)

    def make_room(self, incoming: int = 0) -> int:
        """Evict unused LoRAs until ``incoming`` more bytes fit; the bytes the cache holds afterwards."""
        with self._flock(self.root / ".evict.lock", shared=False):
            return self._make_room(incoming)

    def entries(self) -> list[Entry]:
        """Every cached file, oldest use first."""
        found = []
        candidates = list(self.root.glob("*.safetensors")) + list(self.root.glob("hf/*/blobs/*"))
        for path in candidates:
            if path.name.endswith(".incomplete"):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            name = path.stem if path.parent == self.root else f"hf-{path.name}"
            found.append(Entry(path, name, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda entry: entry.used)

    def _make_room(self, incoming: int, keep: Path | None = None) -> int:
        entries = self.entries()
        total = sum(entry.size for entry in entries)
        if self.max_bytes is None:
            return total
        for entry in entries:
            if total + incoming <= self.max_bytes:
                break
            if keep is not None and entry.path == keep:
                continue
            if self._evict(entry):
                total -= entry.size
        if total + incoming > self.max_bytes:
            log.warning("LoRA cache: %.2f GiB held by running jobs; admitting %.2f GiB more over the bound of "
                        "%.2f GiB", total / GIB, incoming / GIB, self.max_bytes / GIB)
        return total

    def _evict(self, entry: Entry) -> bool:
        """Delete one entry unless a job holds it (an exclusive lock, not waited for)."""
        try:
            with self._flock(self.root / "locks" / f"{entry.name}.lock", shared=False, wait=False):
                entry.path.unlink(missing_ok=True)
        except BlockingIOError:
            return False
        log.info("LoRA cache: evicted %s (%.1f MiB, least recently used)", entry.path.name, entry.size / 2**20)
        return True

    @contextmanager
    def _flock(self, path: Path, *, shared: bool, wait: bool = True) -> Iterator[None]:
        """An advisory lock on ``path`` (made if missing); ``BlockingIOError`` when ``wait`` is False and it
        is held. In a cache this process cannot write (a read-only, pre-filled one) nothing can be evicted, so
        holding needs no lock there, and an eviction is refused as if the file were held."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if not wait:
                raise BlockingIOError(f"cannot lock {path}") from None
            yield
            return
        try:
            if fcntl is not None:
                mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases its lock
