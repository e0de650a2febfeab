"""Per-request LoRAs: resolve, cache, apply to a pipeline for one request, and remove without a trace.

A LoRA ``path`` is one of

* a local file path (or ``file://`` URL), used in place;
* an ``http(s)://`` URL, streamed once into ``<cache_dir>/loras/<sha256>.safetensors``; the URL is remembered in
  ``<cache_dir>/loras/urls/`` so a later request for the same URL does not download it again;
* ``hf://owner/repo[@revision]/path/in/repo.safetensors``, fetched with ``huggingface_hub`` into
  ``<cache_dir>/loras/hf`` (``HF_TOKEN`` is used for gated or private repositories);
* a ``data:`` URI (the API's form of a LoRA this server trained or stored, read from a storage without local
  files), written once into ``<cache_dir>/loras/<sha256>.safetensors``.

Only safetensors files are accepted (the header is checked, not the name): pickled checkpoints can run code
when loaded. The file's sha256 is its identity (adapter names are derived from it). The cache is bounded
(``lora_cache.LoraCache``: least recently used first, never a LoRA a running job holds).

``applied_loras(pipe, loras, cache_dir)`` loads every LoRA as its own adapter with its scale, yields, and on
exit deletes the adapters again; when no adapter is left the PEFT layers are unloaded entirely, so the next
request runs the untouched base model (bit-identical outputs). A LoRA none of whose layers the model has is an
``InputError`` naming ``loras[i].path``, like one whose shapes do not fit. A lock per pipeline keeps two requests from
mixing adapters should a caller ever share one pipeline between threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from fluxserve import fetch
from fluxserve.engine.lora_cache import CacheTooSmall, LoraCache
from fluxserve.request import InputError, LoraSpec

MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors format's own limit
_CHUNK = 1024 * 1024
_HINT = "give a local path, an http(s) URL or hf://owner/repo/path/to/file.safetensors"

_hash_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()
_url_locks: dict[str, threading.Lock] = {}


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str


@contextmanager
def applied_loras(pipe, loras: list[LoraSpec], cache_dir: Path, token: str | None = None,
                  max_cache_bytes: int | None = None) -> Iterator[list[str]]:
    """Apply ``loras`` (with their scales) to ``pipe`` for the body of the ``with``; yield the adapter names.
    The cached files are held (never evicted) until the adapters are removed; the cache holds at most
    ``max_cache_bytes`` besides the LoRAs running jobs hold (None: no bound).

    Bad paths, failed downloads, non-safetensors files and LoRAs that do not fit the model raise
    ``InputError("loras[i].path", ...)``. Adapters already on the pipeline stay active at scale 1.0.
    """
    if not loras:
        yield []
        return
    cache = LoraCache(Path(cache_dir) / "loras", max_cache_bytes)
    with ExitStack() as held:
        files = [resolve_lora(spec.path, cache_dir, f"loras[{i}].path", token=token, cache=cache, held=held)
                 for i, spec in enumerate(loras)]
        with _pipe_lock(pipe):
            before = _adapter_names(pipe)
            kept = [name for name in pipe.get_active_adapters() if name in before] if before else []
            names: list[str] = []
            try:
                for i, (spec, file) in enumerate(zip(loras, files)):
                    names.append(_load_adapter(pipe, i, spec, file))
                pipe.set_adapters(kept + names, [1.0] * len(kept) + [float(spec.scale) for spec in loras])
                yield names
            finally:
                _remove_adapters(pipe, before, kept)


def _load_adapter(pipe, index: int, spec: LoraSpec, file: LoraFile) -> str:
    """Load one LoRA as its own adapter; its name. ``InputError`` naming ``loras[index].path`` when the model
    cannot load it, or when none of its layers are the model's (diffusers then loads nothing, silently)."""
    name = f"fluxserve_{index}_{file.sha256[:12]}"
    field = f"loras[{index}].path"
    try:
        pipe.load_lora_weights(str(file.path), adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(field, f"{spec.path} is not a LoRA this model can load: {exc}") from exc
    if name not in _adapter_names(pipe):
        raise InputError(field, f"{spec.path} is not a LoRA for this model: none of its layers are the "
                                "model's (a LoRA made for another model, or keys in a format this server does not "
                                "read; expected diffusers/PEFT keys such as transformer.<module>.lora_A.weight)")
    return name


def resolve_lora(ref: str, cache_dir: Path, field: str = "loras[0].path", token: str | None = None, *,
                 cache: LoraCache | None = None, held: ExitStack | None = None) -> LoraFile:
    """Turn a LoRA reference into a checked local safetensors file (downloading it once if needed). A cached
    file is held on ``held`` (eviction skips it until ``held`` closes); ``cache`` bounds the cache."""
    ref = ref.strip()
    if not ref:
        raise InputError(field, f"empty LoRA path; {_HINT}")
    cache = cache or LoraCache(Path(cache_dir) / "loras")
    with ExitStack() as own:
        try:
            return _resolve(ref, cache, field, token, held if held is not None else own)
        except CacheTooSmall as exc:
            raise InputError(field, f"{ref}: {exc}") from None


def _resolve(ref: str, cache: LoraCache, field: str, token: str | None, held: ExitStack) -> LoraFile:
    scheme = urlparse(ref).scheme.lower()
    if scheme in ("http", "https"):
        return _download(ref, cache, field, token, held)
    if scheme == "data":
        return _from_data_uri(ref, cache, field, held)
    if scheme == "hf":
        path = _hf_download(ref, cache, field, token, held)
    elif scheme == "file":
        path = Path(unquote(urlparse(ref).path))
    elif scheme and len(scheme) > 1:  # one letter: a Windows drive
        raise InputError(field, f"unsupported LoRA location {ref!r}; {_HINT}")
    else:
        path = Path(ref).expanduser()
    if not path.is_file():
        raise InputError(field, f"no such file: {ref}; {_HINT}")
    check_safetensors(path, field, ref)
    return LoraFile(path, _file_sha256(path))


def check_safetensors(path: Path, field: str, name: str | None = None) -> list[str]:
    """Raise ``InputError`` unless ``path`` is a well-formed safetensors file with tensors; return its keys."""
    from safetensors import safe_open

    name = name or str(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
            raise InputError(field, _not_safetensors(name, "no safetensors header"))
        header = fh.read(header_len)
    if not header.lstrip().startswith(b"{"):
        raise InputError(field, _not_safetensors(name, "the header is not JSON"))
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError and plain OSErrors
        raise InputError(field, _not_safetensors(name, str(exc))) from exc
    if not keys:
        raise InputError(field, f"{name} holds no tensors")
    return keys


def _not_safetensors(name: str, reason: str) -> str:
    return (f"{name} is not a safetensors file ({reason}); only .safetensors LoRAs are accepted "
            "(pickled .ckpt/.pt/.bin checkpoints are refused because loading them can run code)")


# ---- downloads -------------------------------------------------------------------------------------------
def _download(url: str, cache: LoraCache, field: str, token: str | None, held: ExitStack) -> LoraFile:
    policy = fetch.current()
    root = cache.root
    index = root / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"
    with _memo_lock:
        url_lock = _url_locks.setdefault(url, threading.Lock())
    with url_lock:
        cached = _cached_url(index, cache, held)
        if cached is not None:
            return cached
        root.mkdir(parents=True, exist_ok=True)
        headers = hub_headers(url, token or os.environ.get("HF_TOKEN"))
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, fetch.open_stream(
                    url, max_bytes=policy.max_lora_bytes, deadline_s=policy.lora_deadline_s, policy=policy,
                    headers=headers) as body:
                head = b""
                for chunk in body:
                    if len(head) < 8:  # refuse an HTML page or a pickle before downloading all of it
                        head += chunk[:8]
                        if len(head) >= 8 and not 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES:
                            raise InputError(field, _not_safetensors(url, "no safetensors header"))
                    digest.update(chunk)
                    out.write(chunk)
            check_safetensors(tmp, field, url)
            sha = digest.hexdigest()
            final = root / f"{sha}.safetensors"
            held.enter_context(cache.in_use(sha))
            cache.admit(tmp, final)
        except fetch.FetchError as exc:
            raise InputError(field, f"could not download {url}: {exc.message}") from None
        finally:
            tmp.unlink(missing_ok=True)
        _write_atomic(index, json.dumps({"url": url, "sha256": sha}))
        _remember_hash(final, sha)
        return LoraFile(final, sha)


def hub_headers(url: str, token: str | None) -> dict[str, str]:
    """The ``Authorization`` header for a LoRA URL on the Hugging Face Hub: only over https to the hub's own
    origins (``huggingface.co``, ``hf.co``, the ``HF_ENDPOINT`` an operator set), as ``huggingface_hub`` sends
    it; never over plain http, to another port, or to the CDN hosts a download is redirected to (those URLs
    are signed, and redirects off the origin drop the header)."""
    if not token:
        return {}
    try:
        parts = urlparse(url)
        wanted = (parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or 443)
    except ValueError:
        return {}
    hub = {("https", "huggingface.co", 443), ("https", "hf.co", 443)}
    if endpoint := os.environ.get("HF_ENDPOINT"):
        try:
            own = urlparse(endpoint)
            hub.add((own.scheme.lower(), (own.hostname or "").lower(), own.port or 443))
        except ValueError:
            pass
    return {"Authorization": f"Bearer {token}"} if wanted[0] == "https" and wanted in hub else {}


def _from_data_uri(ref: str, cache: LoraCache, field: str, held: ExitStack) -> LoraFile:
    from fluxserve.inputs import data_uri_bytes

    data = data_uri_bytes(ref, field)
    sha = hashlib.sha256(data).hexdigest()
    root = cache.root
    final = root / f"{sha}.safetensors"
    held.enter_context(cache.in_use(sha))
    if final.is_file():
        cache.touch(final)
    else:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".data-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            check_safetensors(tmp, field, "the data URI")
            cache.admit(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    _remember_hash(final, sha)
    return LoraFile(final, sha)


def _cached_url(index: Path, cache: LoraCache, held: ExitStack) -> LoraFile | None:
    """The cached file of a URL downloaded before, held; None when there is none (or it was evicted)."""
    try:
        sha = json.loads(index.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None
    if not isinstance(sha, str) or not sha.isalnum():
        return None
    path = cache.root / f"{sha}.safetensors"
    held.enter_context(cache.in_use(sha))  # held before looking: an evictor cannot delete it after the look
    if not path.is_file():
        return None
    cache.touch(path)
    return LoraFile(path, sha)


def _hf_download(ref: str, cache: LoraCache, field: str, token: str | None, held: ExitStack) -> Path:
    """The file from the hub (or its cache), held; room is made for it in the LoRA cache's bound."""
    for _attempt in range(2):  # evicted between the download and the hold: fetched once more
        path = _hf_fetch(ref, cache.root / "hf", field, token)
        name = cache.lock_name(path)
        if name is None:
            return path
        held.enter_context(cache.in_use(name))
        if path.is_file():
            cache.touch(path.resolve())
            cache.make_room()
            return path
    raise InputError(field, f"{ref} was evicted from the LoRA cache while it was being fetched; try again")


def _hf_fetch(ref: str, cache: Path, field: str, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    parts = ref[len("hf://"):].strip("/").split("/")
    if len(parts) < 3:
        raise InputError(field, f"{ref!r}: expected hf://owner/repo/path/to/file.safetensors")
    repo, _, revision = parts[1].partition("@")
    repo_id, filename = f"{parts[0]}/{repo}", "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache,
                                    token=token or None))
    except LocalEntryNotFoundError as exc:
        raise InputError(field, f"{ref} is not in the local cache and the hub cannot be reached "
                                f"(HF_HUB_OFFLINE or no network): {exc}") from exc
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise InputError(field, f"could not fetch {ref} from the Hugging Face hub ({type(exc).__name__}: "
                                f"{exc}); set HF_TOKEN for gated or private repositories") from exc


# ---- hashing ---------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _memo_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    with _memo_lock:
        _hash_memo[key] = sha
    return sha


def _remember_hash(path: Path, sha: str) -> None:
    stat = path.stat()
    with _memo_lock:
        _hash_memo[(str(path.resolve()), stat.st_size, stat.st_mtime_ns)] = sha


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".index-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ---- adapters on the pipeline ----------------------------------------------------------------------------
def _pipe_lock(pipe) -> threading.RLock:
    with _memo_lock:
        return pipe.__dict__.setdefault("_fluxserve_lora_lock", threading.RLock())


def _adapter_names(pipe) -> set[str]:
    try:
        listed = pipe.get_list_adapters()
    except ValueError:  # no PEFT config yet
        return set()
    return {name for names in listed.values() for name in names}


def _remove_adapters(pipe, before: set[str], kept: list[str]) -> None:
    added = sorted(_adapter_names(pipe) - before)
    if added:
        pipe.delete_adapters(added)
    if not before:
        # Nothing was loaded before this request: remove the PEFT layers themselves (also any half-loaded
        # adapter a failed load left behind), so the model is exactly the base model again.
        pipe.unload_lora_weights()
    elif kept:
        pipe.set_adapters(kept, [1.0] * len(kept))
