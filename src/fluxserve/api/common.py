"""Small helpers every dialect uses: the base URL the client used, file URLs, data URIs, references to this
server's own files."""

from __future__ import annotations

import base64
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request

from fluxserve.api import file_urls
from fluxserve.api.file_urls import file_url


def base_url(request: Request) -> str:
    """Scheme and host the client used (``X-Forwarded-Proto`` / ``X-Forwarded-Host`` from a reverse
    proxy win), plus the ASGI root path when the app is mounted below one. No trailing slash."""
    headers = request.headers
    scheme = headers.get("x-forwarded-proto", "").split(",")[0].strip() or request.url.scheme
    host = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host")
    if not host:
        host = request.url.netloc
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{scheme}://{host}{root}"


def image_url(request: Request, key: str) -> str:
    """The absolute URL of a stored file, signed (``file_urls``): it works without an API key until it expires."""
    return file_url(base_url(request), key)


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def is_url_or_data_uri(ref: object) -> bool:
    """What an API caller may give as a reference: an http(s) URL or a data URI (never a path on this server)."""
    return isinstance(ref, str) and ref.strip().lower().startswith(("http://", "https://", "data:"))


class OwnFileMissing(LookupError):
    """A reference to one of this server's files that does not exist, or is another key's."""


def own_file_key(request: Request, url: str) -> str | None:
    """The storage key when ``url`` points at this server's ``/files/``, else None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None
    own = urlsplit(base_url(request))
    prefix = f"{own.path}/files/"
    if parts.netloc != own.netloc or not parts.path.startswith(prefix):
        return None
    return parts.path[len(prefix):]


def may_reference(request: Request, url: str, key: str) -> bool:
    """A reference to one of this server's files needs its signed URL, or the file must be the caller's."""
    from fluxserve.api.auth import caller

    if file_urls.check(dict(parse_qsl(urlsplit(url).query)).get("token"), key):
        return True
    identity = caller(request)
    return identity.sees_all or identity.may_see(request.app.state.store.file_owner(key)[1])


def resolve_own_file(request: Request, url: str) -> str:
    """A URL of this server's own files (an upload, an earlier output) as a local path or a data URI, read from
    storage: the worker then needs no HTTP round trip, and the outbound address guard (which refuses this
    server's own private address) is not involved. Any other URL comes back unchanged. Raises
    ``OwnFileMissing`` for a file that does not exist or is another key's (blocking: storage and store reads)."""
    key = own_file_key(request, url)
    if key is None:
        return url
    storage = request.app.state.storage
    path = getattr(storage, "path", None)
    try:
        if not may_reference(request, url, key):
            raise KeyError(key)  # another key's file: as if it did not exist
        if path is not None:
            local = path(key)
            if local.is_file():
                return str(local)
            raise KeyError(key)
        data, content_type = storage.get(key)
    except KeyError:
        raise OwnFileMissing(f"file {key!r} not found on this server") from None
    return data_uri(data, content_type)


def tenant(request: Request) -> str | None:
    """Whose share of the fetch pools a request's work takes (``fetch.run_blocking``): its API key's id, None
    without keys."""
    from fluxserve.api.auth import caller

    return caller(request).key_id


class BadReference(ValueError):
    """A caller's reference that cannot be used: ``index`` in the list, ``message`` without the field name."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


async def resolve_references(request: Request, urls: list[str]) -> list[str]:
    """A caller's references with this server's own files read from storage (``resolve_own_file``), on the
    fetch pool for work without network (it never waits behind downloads). Raises ``BadReference`` for one that is not an http(s) URL or data URI, or a missing or foreign
    own file; the dialect names the field in its own error shape."""
    from fluxserve import fetch

    def work() -> list[str]:
        resolved = []
        for index, url in enumerate(urls):
            if not is_url_or_data_uri(url):
                raise BadReference(index, "must be an http(s) URL or a data URI")
            try:
                resolved.append(resolve_own_file(request, url))
            except OwnFileMissing as exc:
                raise BadReference(index, str(exc)) from None
        return resolved

    return await fetch.run_blocking(work, tenant=tenant(request), network=False)
