"""What can go wrong upstream, and whether the next route should be tried."""

from __future__ import annotations


class UpstreamError(Exception):
    """A route that did not serve the request. ``retryable``: the provider could not (connection error, timeout,
    5xx, 429): the next route is tried. Otherwise the provider refused the request itself (a 4xx): that answer
    goes back to the caller, naming ``field`` when the provider did."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.field = field


def from_status(provider: str, status: int, body: object) -> UpstreamError:
    """The error for an HTTP answer ``status`` with JSON ``body`` (fal's ``{"detail": ...}``, Replicate's
    ``{"detail": ..., "title": ...}``)."""
    message, field = _detail(body)
    retryable = status >= 500 or status in (408, 429)
    return UpstreamError(f"{provider} answered {status}: {message}", retryable=retryable, status=status,
                         field=field)


def _detail(body: object) -> tuple[str, str | None]:
    if isinstance(body, dict) and isinstance(body.get("invalid_fields"), list) and body["invalid_fields"]:
        first = body["invalid_fields"][0]  # Replicate's problem details
        if isinstance(first, dict):
            field = str(first.get("field") or "").removeprefix("input.").removeprefix("input") or None
            return str(first.get("description") or body.get("detail") or "invalid input"), field
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body.get("title", "")))
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            first = detail[0]
            loc = [str(part) for part in first.get("loc", []) if part not in ("body", "input")]
            return str(first.get("msg", "invalid input")), ".".join(loc) or None
        if detail:
            return str(detail)[:500], None
    return (str(body)[:500] if body else "no details"), None
