"""No other site may frame the server's pages (clickjacking: the playground, with a key in its storage, shown
invisibly under another site's buttons).

``NoFraming`` is a pure ASGI middleware, outermost, so every HTTP answer carries it: ``X-Frame-Options: DENY``
(older browsers) and ``frame-ancestors 'none'`` in the ``Content-Security-Policy``, joined to the policy a route
set itself (files keep theirs). Nothing else in a page's policy changes: the pages load their scripts, styles
and images as before. The server's own pages use no frames.
"""

from __future__ import annotations

from typing import Any

FRAME_ANCESTORS = b"frame-ancestors 'none'"


def no_framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``X-Frame-Options: DENY`` and ``frame-ancestors 'none'`` in the one CSP header."""
    out: list[tuple[bytes, bytes]] = []
    has_policy = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-frame-options":
            continue
        if lowered == b"content-security-policy" and not has_policy:
            has_policy = True
            if b"frame-ancestors" not in value:
                value = value.rstrip(b"; ") + b"; " + FRAME_ANCESTORS
        out.append((name, value))
    out.append((b"x-frame-options", b"DENY"))
    if not has_policy:
        out.append((b"content-security-policy", FRAME_ANCESTORS))
    return out


class NoFraming:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_unframable(message):
            if message["type"] == "http.response.start":
                message["headers"] = no_framing(list(message.get("headers", ())))
            await send(message)

        await self.app(scope, receive, send_unframable)
