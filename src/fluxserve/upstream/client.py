"""What the fal and Replicate clients share: an HTTP client that carries the provider's credentials to its API,
a plain one for the outputs it returns (the credentials never go there), and JSON calls whose errors say
whether the next route should be tried.

Invariant: a request with the credentials goes only to the configured provider's origin (the scheme, host and
port of ``base_url``). A status, result or cancel URL that a provider's answer names elsewhere is not
requested at all (a call fails as retryable, a cancel is dropped): with the key it would hand the key to
that host, and without it, it would let an answer point this server at any address."""

from __future__ import annotations

from typing import Any

import httpx

from fluxserve.upstream.errors import UpstreamError, from_status

TRANSPORT_ERRORS = (httpx.TransportError,)  # connection refused or reset, timeouts, protocol errors
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of ``url``, lower-cased, with the scheme's default port; None if unparsable."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    scheme = parsed.scheme.lower()
    return scheme, parsed.host.lower(), parsed.port or _DEFAULT_PORTS.get(scheme, 0)


class HttpUpstream:
    name = ""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout_s: float, poll_s: float,
                 read_timeout_s: float, connect_timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self._origin = origin(self.base_url)
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

    def _own(self, url: str) -> bool:
        """Whether ``url`` is on the provider's origin, where its credentials may go."""
        return self._origin is not None and origin(url) == self._origin

    def _cancel(self, method: str, url: str | None) -> None:
        if url and self._own(url):  # a cancel URL elsewhere is dropped: the request is abandoned either way
            try:
                self._client.request(method, url)
            except httpx.HTTPError:
                pass

    def _call(self, method: str, url: str, **kwargs) -> dict[str, Any]:
        if not self._own(url):
            shown = url if origin(url) is not None else repr(url[:80])
            raise UpstreamError(f"{self.name} answered with a URL outside its API ({shown}); it is not "
                                f"requested: the key goes to {self.base_url} only", retryable=True)
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
