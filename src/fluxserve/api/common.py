"""Small helpers every dialect uses: the base URL the client used, file URLs, data URIs."""

from __future__ import annotations

import base64

from fastapi import Request

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
