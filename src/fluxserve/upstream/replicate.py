"""Replicate's predictions API as a client: create with ``Prefer: wait``, poll ``urls.get``, forward a cancel.

``base_url`` is the API root (``https://api.replicate.com``, or another fluxserve's root): a request is
``POST {base_url}/v1/models/{owner}/{name}/predictions`` with ``{"input": ...}``. The token goes in
``Authorization: Bearer ...`` to that provider and nowhere else (outputs are fetched without it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fluxserve.request import GenerationCancelled
from fluxserve.upstream.client import HttpUpstream
from fluxserve.upstream.errors import UpstreamError

TERMINAL = ("succeeded", "failed", "canceled")
WAIT_S = 60  # Replicate holds a create for at most a minute with Prefer: wait


class ReplicateUpstream(HttpUpstream):
    name = "replicate"

    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = 600.0, poll_s: float = 0.25,
                 connect_timeout_s: float = 10.0):
        super().__init__(base_url, {"Authorization": f"Bearer {token}"} if token else {}, timeout_s=timeout_s,
                         poll_s=poll_s, read_timeout_s=WAIT_S + 30.0, connect_timeout_s=connect_timeout_s)

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
                self._cancel("POST", urls.get("cancel"))
                raise GenerationCancelled("cancelled; the cancel was forwarded to replicate")
            if time.monotonic() > deadline:
                self._cancel("POST", urls.get("cancel"))
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
