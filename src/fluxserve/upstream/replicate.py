"""Replicate's predictions API as a client: create with ``Prefer: wait``, poll ``urls.get``, forward a cancel.

``base_url`` is the API root (``https://api.replicate.com``, or another fluxserve's root): a request is
``POST {base_url}/v1/models/{owner}/{name}/predictions`` with ``{"input": ...}``. The token goes in
``Authorization: Bearer ...`` to that provider and nowhere else (outputs are fetched without it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from fluxserve.request import GenerationCancelled
from fluxserve.upstream.errors import UpstreamError, from_status

TRANSPORT_ERRORS = (httpx.TransportError,)
TERMINAL = ("succeeded", "failed", "canceled")
WAIT_S = 60  # Replicate holds a create for at most a minute with Prefer: wait


class ReplicateUpstream:
    name = "replicate"

    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = 600.0, poll_s: float = 0.25,
                 connect_timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(WAIT_S + 30.0, connect=connect_timeout_s)
        self._client = httpx.Client(headers=headers, timeout=timeout, follow_redirects=False)
        self._files = httpx.Client(timeout=timeout, follow_redirects=True)  # outputs: the token never goes there

    def __repr__(self) -> str:  # never the token
        return f"ReplicateUpstream({self.base_url!r})"

    def close(self) -> None:
        self._client.close()
        self._files.close()

    def run(self, model: str, arguments: dict[str, Any], *, on_log: Callable[[str], None],
            should_cancel: Callable[[], bool]) -> dict[str, Any]:
        """Run ``model`` (``owner/name``) on ``arguments``; the finished prediction. Raises ``UpstreamError``
        (``retryable`` when another route should be tried) or ``GenerationCancelled`` (the cancel forwarded)."""
        prediction = self._call("POST", f"{self.base_url}/v1/models/{model}/predictions",
                                json={"input": arguments}, headers={"Prefer": f"wait={WAIT_S}"})
        urls = prediction.get("urls") or {}
        if not urls.get("get"):
            raise UpstreamError("replicate answered a prediction without its URL", retryable=True)
        on_log(f"queued upstream at replicate as {prediction.get('id')}")
        deadline = time.monotonic() + self.timeout_s
        seen = 0
        while True:
            logs = str(prediction.get("logs") or "")
            for line in logs[seen:].splitlines():
                if line.strip():
                    on_log(line.strip())
            seen = len(logs)
            status = prediction.get("status")
            if status in TERMINAL:
                break
            if should_cancel():
                self._cancel(urls.get("cancel"))
                raise GenerationCancelled("cancelled; the cancel was forwarded to replicate")
            if time.monotonic() > deadline:
                self._cancel(urls.get("cancel"))
                raise UpstreamError(f"replicate did not finish within {self.timeout_s:.0f} s", retryable=True)
            time.sleep(self.poll_s)
            prediction = self._call("GET", urls["get"])
        if status == "canceled":
            raise UpstreamError("replicate cancelled the prediction", retryable=True)
        if status == "failed":
            raise UpstreamError(f"replicate's prediction failed: {prediction.get('error') or 'no details'}",
                                retryable=True)
        output = prediction.get("output")
        images = [output] if isinstance(output, str) else [url for url in output or [] if isinstance(url, str)]
        return {"images": [{"url": url} for url in images], "seed": (prediction.get("input") or {}).get("seed")}

    def fetch(self, url: str) -> tuple[bytes, str]:
        try:
            response = self._files.get(url)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"replicate's output could not be fetched: {type(exc).__name__}",
                                retryable=True) from None
        if response.status_code >= 400:
            raise UpstreamError(f"replicate's output {url} answered {response.status_code}",
                                retryable=response.status_code >= 500, status=response.status_code)
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def _cancel(self, url: str | None) -> None:
        if url:
            try:
                self._client.post(url)
            except httpx.HTTPError:
                pass

    def _call(self, method: str, url: str, **kwargs) -> dict[str, Any]:
        try:
            response = self._client.request(method, url, **kwargs)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"replicate could not be reached: {type(exc).__name__}: {exc}",
                                retryable=True) from None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise from_status("replicate", response.status_code, body)
        if not isinstance(body, dict):
            raise UpstreamError(f"replicate answered {method} {url} with something other than a JSON object",
                                retryable=True)
        return body
