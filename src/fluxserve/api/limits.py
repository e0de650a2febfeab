"""Limits at the edge: request body size, prompt length and the seed range, the same in every dialect.

- Body size: ``BodyLimitMiddleware`` refuses a body larger than ``FLUXSERVE_MAX_BODY_MB`` (uploads:
  ``FLUXSERVE_MAX_UPLOAD_MB``) with a 413 before it is read: at once when ``Content-Length`` says so, else as
  soon as the bytes received pass the limit. The route that reads the body answers the 413 in its dialect's
  error format.
- Prompt length: ``FLUXSERVE_MAX_PROMPT_CHARS`` characters (FLUX.2 reads at most 512 tokens of a prompt; a
  token is 3-5 characters of ordinary text, so the default of 8192 refuses only prompts whose tail the model
  would never see).
- Seeds: 0 to ``MAX_SEED`` (2**63 - 1), what the engine's torch generators take (``fluxserve.request``).
"""

from __future__ import annotations

import re

from fluxserve.api.errors import ApiError
from fluxserve.request import MAX_SEED

__all__ = ["MAX_SEED", "BodyLimitMiddleware", "body_limit_for", "prompt_error", "too_large"]

MIB = 1024 * 1024
# Routes whose bodies carry files: fal storage uploads, Replicate's file upload, OpenAI's multipart edits.
UPLOAD_PATHS = re.compile(r"^(/files/upload|/storage/upload/[^/]+|/v1/files|/v1/images/edits)/?$")


def upload_limit() -> int:
    """The upload cap of ``api/files.py`` (``FLUXSERVE_MAX_UPLOAD_MB``)."""
    from fluxserve.api import files

    return files.MAX_UPLOAD_BYTES


def body_limit_for(path: str, max_body_bytes: int) -> int:
    """The body limit of one request path: uploads get the (larger) upload cap."""
    if UPLOAD_PATHS.match(path):
        return max(max_body_bytes, upload_limit())
    return max_body_bytes


def too_large(limit: int) -> ApiError:
    """The 413 every dialect answers; OpenAI and Replicate routes re-render it in their own shape."""
    size = f"{limit // MIB} MiB" if limit % MIB == 0 else f"{limit} bytes"
    return ApiError(413, f"Request body too large: this server accepts at most {size}",
                    error_type="request_too_large")


class BodyLimitMiddleware:
    """Counts the bytes of every request body and honours ``Content-Length``: a body over the limit is never
    read in full. The route sees a 413 ``ApiError`` from its first (or next) read of the body, so the answer
    comes in the route's dialect; a body nobody reads is simply left unread."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit_for(scope["path"], self.max_body_bytes)
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        received = 0
        refused = response_started = False

        async def limited_receive():
            nonlocal received, refused
            if declared is not None and declared > limit:
                return refuse()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    return refuse()
            return message

        def refuse():
            nonlocal refused
            refused = True
            if response_started:  # a route answering without the body, now waiting for a disconnect
                return {"type": "http.disconnect"}
            raise too_large(limit)

        async def watching_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if refused or (declared is not None and declared > limit):
                    # close the connection after the answer: the server reads no more of the body
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, limited_receive, watching_send)
        except ApiError as exc:  # raised by limited_receive outside any route (e.g. in a middleware)
            if exc.status != 413 or response_started:
                raise
            from fluxserve.api.errors import render

            await render(exc)(scope, receive, watching_send)


def prompt_error(prompt: object, max_chars: int) -> str | None:
    """Why ``prompt`` is too long, or None."""
    if isinstance(prompt, str) and len(prompt) > max_chars:
        return (f"the prompt is {len(prompt)} characters long; the limit is {max_chars} (FLUX.2 reads at most "
                "512 tokens of a prompt)")
    return None
