"""fal's queue protocol as a client: submit, poll the status with logs, fetch the result, forward a cancel.

``base_url`` is the queue's root (``https://queue.fal.run``, or ``http://host:8000/queue`` for another
fluxserve): a request is ``POST {base_url}/{endpoint_id}``, and the answer names the status, result and cancel
URLs to use from then on. The key goes in ``Authorization: Key ...`` to that provider and nowhere else."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fluxserve.request import GenerationCancelled
from fluxserve.upstream.client import HttpUpstream
from fluxserve.upstream.errors import UpstreamError


class FalUpstream(HttpUpstream):
    name = "fal"

    def __init__(self, base_url: str, key: str | None, *, timeout_s: float = 600.0, poll_s: float = 0.25,
                 connect_timeout_s: float = 10.0):
        super().__init__(base_url, {"Authorization": f"Key {key}"} if key else {}, timeout_s=timeout_s,
                         poll_s=poll_s, read_timeout_s=60.0, connect_timeout_s=connect_timeout_s)

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
                self._cancel("PUT", urls["cancel_url"])
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
                self._cancel("PUT", urls["cancel_url"])
                raise UpstreamError(f"fal did not finish within {self.timeout_s:.0f} s", retryable=True)
            time.sleep(self.poll_s)
        return self._call("GET", urls["response_url"])
