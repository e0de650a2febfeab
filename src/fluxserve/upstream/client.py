"""What the fal and Replicate clients share: an HTTP client that carries the provider's credentials to its API,
a plain one for the outputs it returns (the credentials never go there), and JSON calls whose errors say
whether the next route should be tried."""

from __future__ import annotations

from typing import Any

import httpx

from fluxserve.upstream.errors import UpstreamError, from_status

TRANSPORT_ERRORS = (httpx.TransportError,)  # connection refused or reset, timeouts, protocol errors


class HttpUpstream:
    name = ""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout_s: float, poll_s: float,
                 read_timeout_s: float, connect_timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s  # a whole request, polling included
        self.poll_s = poll_s
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._client = httpx.Client(headers=headers, timeout=timeout, follow_redirects=False)
        self._files = httpx.Client(timeout=timeout, follow_redirects=True)

    def __repr__(self) -> str:  # never the credentials
        return f"{type(self).__name__}({self.base_url!r})"

    def close(self) -> None:
        self._client.close()
        self._files.close()

    def fetch(self, url: str) -> tuple[bytes, str]:
        """An output file the provider returned, and its content type as answered."""
        try:
            response = self._files.get(url)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"{self.name}'s output could not be fetched: {type(exc).__name__}",
                                retryable=True) from None
        if response.status_code >= 400:
            raise UpstreamError(f"{self.name}'s output {url} answered {response.status_code}",
                                retryable=response.status_code >= 500, status=response.status_code)
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def _cancel(self, method: str, url: str | None) -> None:
        if url:
            try:
                self._client.request(method, url)
            except httpx.HTTPError:
                pass  # the request is abandoned here either way

    def _call(self, method: str, url: str, **kwargs) -> dict[str, Any]:
        try:
            response = self._client.request(method, url, **kwargs)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"{self.name} could not be reached: {type(exc).__name__}: {exc}",
                                retryable=True) from None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise from_status(self.name, response.status_code, body)
        if not isinstance(body, dict):
            raise UpstreamError(f"{self.name} answered {method} {url} with something other than a JSON object",
                                retryable=True)
        return body
