"""fal's queue protocol as a client: submit, poll the status with logs, fetch the result, forward a cancel.

``base_url`` is the queue's root (``https://queue.fal.run``, or ``http://host:8000/queue`` for another
fluxserve): a request is ``POST {base_url}/{endpoint_id}``, and the answer names the status, result and cancel
URLs to use from then on. The key goes in ``Authorization: Key ...`` to that provider and nowhere else."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from fluxserve.request import GenerationCancelled
from fluxserve.upstream.errors import UpstreamError, from_status

TRANSPORT_ERRORS = (httpx.TransportError,)  # connection refused or reset, timeouts, protocol errors


class FalUpstream:
    name = "fal"

    def __init__(self, base_url: str, key: str | None, *, timeout_s: float = 600.0, poll_s: float = 0.25,
                 connect_timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        headers = {"Authorization": f"Key {key}"} if key else {}
        timeout = httpx.Timeout(60.0, connect=connect_timeout_s)
        self._client = httpx.Client(headers=headers, timeout=timeout, follow_redirects=False)
        self._files = httpx.Client(timeout=timeout, follow_redirects=True)  # outputs: the key never goes there

    def __repr__(self) -> str:  # never the key
        return f"FalUpstream({self.base_url!r})"

    def close(self) -> None:
        self._client.close()
        self._files.close()

    def run(self, endpoint_id: str, arguments: dict[str, Any], *, on_log: Callable[[str], None],
            should_cancel: Callable[[], bool]) -> dict[str, Any]:
        """Submit ``arguments`` to ``endpoint_id`` and wait for its output (fal's output JSON). Raises
        ``UpstreamError`` (``retryable`` when another route should be tried) or ``GenerationCancelled`` once
        ``should_cancel`` answers True (the cancel is forwarded)."""
        submitted = self._call("POST", f"{self.base_url}/{endpoint_id}", json=arguments)
        urls = {name: submitted.get(name) for name in ("status_url", "response_url", "cancel_url")}
        if not urls["status_url"] or not urls["response_url"]:
            raise UpstreamError(f"fal answered a submit without status and response URLs: {submitted}",
                                retryable=True)
        on_log(f"queued upstream at fal as {submitted.get('request_id')}")
        deadline = time.monotonic() + self.timeout_s
        seen = 0
        while True:
            if should_cancel():
                self._cancel(urls["cancel_url"])
                raise GenerationCancelled("cancelled; the cancel was forwarded to fal")
            status = self._call("GET", urls["status_url"], params={"logs": 1})
            logs = status.get("logs") or []
            for line in logs[seen:]:
                if isinstance(line, dict) and line.get("message"):
                    on_log(str(line["message"]))
            seen = max(seen, len(logs))
            if status.get("status") == "COMPLETED":
                break
            if time.monotonic() > deadline:
                self._cancel(urls["cancel_url"])
                raise UpstreamError(f"fal did not finish within {self.timeout_s:.0f} s", retryable=True)
            time.sleep(self.poll_s)
        return self._call("GET", urls["response_url"])

    def fetch(self, url: str) -> tuple[bytes, str]:
        """An output file the provider returned (its content type from the answer)."""
        try:
            response = self._files.get(url)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"fal's output could not be fetched: {type(exc).__name__}", retryable=True) from None
        if response.status_code >= 400:
            raise UpstreamError(f"fal's output {url} answered {response.status_code}",
                                retryable=response.status_code >= 500, status=response.status_code)
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def _cancel(self, url: str | None) -> None:
        if url:
            try:
                self._client.put(url)
            except httpx.HTTPError:
                pass  # the request is abandoned here either way

    def _call(self, method: str, url: str, **kwargs) -> dict[str, Any]:
        response = self._send(method, url, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise from_status("fal", response.status_code, body)
        if not isinstance(body, dict):
            raise UpstreamError(f"fal answered {method} {url} with something other than a JSON object",
                                retryable=True)
        return body

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return self._client.request(method, url, **kwargs)
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"fal could not be reached: {type(exc).__name__}: {exc}", retryable=True) from None
