"""Request bodies never stall the event loop: a bound on their JSON values, and large ones decoded and
validated in threads of their own.

Decoding JSON (``json.loads``) and validating it (pydantic) run in C or Rust without releasing the GIL: a
thread alone does not keep them from stalling the event loop, since the loop cannot run until such a call
returns. What a call costs grows with the number of JSON values in the body, not its bytes (a 30 MB data URI
is one string and decodes in milliseconds; 25 MB of LoRA entries is 1.8 million values and took seconds), so:

- ``JsonValueLimit`` (middleware) counts, as the body arrives, an upper bound on its JSON values (commas and
  opening brackets: every value but the first of a container follows a comma) and refuses a body past
  ``FLUXSERVE_MAX_JSON_VALUES`` with a 413 before anything parses it, in the calling API's error format.
  Multipart bodies and raw file uploads are not JSON and are not counted.
- ``off_loop`` runs a body's decoding and validation inline when the body is small (no thread hop for the
  common request) and on ``BODY_THREADS`` threads of their own when it is large: a large body waits behind
  other large bodies, never in the pools every request shares, and the loop runs between its steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from fluxserve.api.errors import ApiError, render
from fluxserve.api.limits import UPLOAD_PATHS

T = TypeVar("T")

LARGE_BODY = 256 * 1024  # bytes: bodies at least this large are decoded and validated off the event loop
BODY_THREADS = 2
_executor = ThreadPoolExecutor(max_workers=BODY_THREADS, thread_name_prefix="fluxserve-bodies")


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` for a body of ``size`` bytes: inline when small, else on the body threads."""
    if size < LARGE_BODY:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor, partial(fn, *args, **kwargs))


def too_many_values(limit: int) -> ApiError:
    """The 413 every dialect answers (OpenAI and Replicate routes re-render it in their own shape)."""
    return ApiError(413, f"Request body too complex: this server accepts at most {limit} JSON values in a "
                    "request (FLUXSERVE_MAX_JSON_VALUES)", error_type="request_too_large")


def counted(path: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a body may be read as JSON: anything but multipart, and on the upload routes only JSON."""
    media = next((value for name, value in headers if name == b"content-type"), b"").split(b";")[0].strip().lower()
    if media.startswith(b"multipart/"):
        return False
    return b"json" in media or not UPLOAD_PATHS.match(path)


def values_bound(chunk: bytes) -> int:
    """An upper bound on the JSON values a chunk of a body adds (strings' commas and brackets count too)."""
    return chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")


class JsonValueLimit:
    """Refuses a body with more than ``max_values`` JSON values (``values_bound``) while it arrives: the
    route sees a 413 ``ApiError`` from its read of the body and answers it in its dialect's format. A route
    that never reads the body is not affected."""

    def __init__(self, app, max_values: int):
        self.app = app
        self.max_values = max_values

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.max_values <= 0 or not counted(scope["path"], scope["headers"]):
            return await self.app(scope, receive, send)
        seen, refused, response_started = 1, False, False

        async def counting_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += values_bound(message.get("body", b""))
                if seen > self.max_values:
                    refused = True
                    raise too_many_values(self.max_values)
            return message

        async def watching_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if refused:  # close after the answer: the rest of the body is never read
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except ApiError as exc:  # raised by counting_receive outside any route (e.g. in a middleware)
            if not refused or response_started:
                raise
            await render(exc)(scope, receive, watching_send)
