"""Errors in each dialect's own shape.

fal (FastAPI's shape): validation ``422 {"detail": [{"loc": ["body", field], "msg", "type"}]}``, others
``{"detail": message, "error_type": ...}`` plus ``X-Fal-Error-Type``. OpenAI: ``{"error": {"message", "type",
"param", "code"}}``. Replicate: ``{"title", "detail", "status"}``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fluxserve.request import InputError
from fluxserve.sizes import SizeError


class ApiError(Exception):
    """Raise anywhere in a route: rendered by ``api_error_handler`` in the dialect's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        dialect: str = "fal",
        error_type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.dialect = dialect
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}
        self.code = code or error_type


class FalValidationError(Exception):
    """A fal 422 with FastAPI-shaped ``detail`` entries."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["msg"] if errors else "invalid input")
        self.errors = errors


def field_error(loc: list[str | int], msg: str, error_type: str = "value_error") -> dict[str, Any]:
    """One FastAPI-style validation entry; ``loc`` is relative to the body."""
    return {"loc": ["body", *loc], "msg": msg, "type": error_type}


def query_error(field: str, message: str) -> FalValidationError:
    """A fal 422 naming query parameter ``field``."""
    return FalValidationError([{"loc": ["query", field], "msg": message, "type": "value_error"}])


def query_time(field: str, value: str | None) -> datetime | None:
    """Query parameter ``field`` as an ISO 8601 date or time in UTC (a time without a zone is UTC); None when
    absent or empty; a 422 naming ``field`` when it is no time."""
    if value is None or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # not a time, or out of range once in UTC
        raise query_error(field, f"must be an ISO 8601 date or time such as 2025-01-01T00:00:00Z, not {value!r}"
                          ) from None


def _loc(path: str) -> list[str | int]:
    """'image_size.width' / 'image_urls[1]' -> ['image_size', 'width'] / ['image_urls', 1]."""
    parts: list[str | int] = []
    for piece in path.replace("]", "").split("."):
        name, _, index = piece.partition("[")
        if name:
            parts.append(name)
        if index:
            parts.append(int(index))
    return parts


def _union_member(part: Any) -> bool:
    """pydantic names the union member in ``loc`` ('ImageSize', "literal['a','b']"); fal's locs do not."""
    return isinstance(part, str) and (part[:1].isupper() or part.startswith(("literal[", "function-")))


def from_pydantic(exc: ValidationError, body: Any = None) -> list[dict[str, Any]]:
    """pydantic errors -> fal entries. For a union field (``image_size``: object or enum name) keep only the
    errors of the member the input looks like, and drop the member's name from ``loc``."""
    errors = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        if len(loc) >= 2 and _union_member(loc[1]):
            value = body.get(loc[0]) if isinstance(body, dict) else None
            is_object_member = loc[1][:1].isupper()
            if isinstance(value, dict) != is_object_member:
                continue
            loc = [loc[0], *loc[2:]]
        entry = field_error(loc, err["msg"], err["type"])
        if err.get("ctx"):
            entry["ctx"] = {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in err["ctx"].items()}
        errors.append(entry)
    return errors


def from_field_error(exc: SizeError | InputError) -> list[dict[str, Any]]:
    return [field_error(_loc(exc.field), exc.message)]


def fal_error(
    status: int, detail: Any, error_type: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    headers = dict(headers or {})
    if error_type:
        body["error_type"] = error_type
        headers["X-Fal-Error-Type"] = error_type
    return JSONResponse(body, status_code=status, headers=headers)


def render(exc: ApiError) -> JSONResponse:
    if exc.dialect == "openai":
        body: dict[str, Any] = {
            "error": {
                "message": exc.message,
                "type": exc.error_type or ("invalid_request_error" if exc.status < 500 else "server_error"),
                "param": exc.param,
                "code": exc.code,
            }
        }
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)
    if exc.dialect == "replicate":
        titles = {401: "Unauthenticated", 403: "Forbidden", 404: "Not found", 422: "Invalid input"}
        body = {"title": titles.get(exc.status, "Error"), "detail": exc.message, "status": exc.status}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)
    return fal_error(exc.status, exc.message, exc.error_type, exc.headers)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return render(exc)


async def fal_validation_handler(request: Request, exc: FalValidationError) -> JSONResponse:
    return JSONResponse({"detail": exc.errors}, status_code=422)


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router: the error answers its routes can give, for the OpenAPI document."""
    text = {
        400: "Bad request: a parameter of the wrong type or value, named in the answer",
        401: "No valid API key",
        404: "Unknown model, endpoint, request or prediction",
        413: "The request body is larger than the server accepts",
        415: "An upload that is not an image or safetensors file",
        422: "Invalid input: the answer names each field",
        429: "The queue is full for this key or for the server, or the key is over one of its quotas; retry "
             "after the Retry-After seconds",
    }
    return {code: {"description": text[code]} for code in codes}
