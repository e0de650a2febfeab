"""fal's platform API for request history, at fal's paths (``api.fal.ai/v1/...``):

* ``GET /v1/models/requests/by-endpoint`` lists the requests sent to one or more endpoints (``endpoint_id``,
  comma-separated or repeated, up to 50), of every dialect, newest end first (``sort_by=duration``: longest
  first), filtered by the time they were sent (``start`` / ``end``; by default the last 24 hours, 90 days with
  ``request_id``), ``status`` (``success``, ``error``, ``user_error``) and ``request_id``; ``expand=payloads``
  adds each request's ``json_input`` and ``json_output``. Pages of ``limit`` (1-100, default 50) items follow
  ``next_cursor`` (opaque; requests sent meanwhile never shift a later page).
* ``DELETE /v1/models/requests/{request_id}/payloads`` deletes a finished request's input, output and output
  files; the request stays in the history without its payloads.

A key sees only its own requests; an admin key (or keyless local use) sees everyone's. Bad parameters are a 422
naming the query field, in fal's validation shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from fluxserve.api import fal
from fluxserve.api.auth import caller, require_key
from fluxserve.api.common import base_url, image_url
from fluxserve.api.errors import ApiError, documented, query_error, query_time
from fluxserve.jobs.store import TERMINAL

MAX_ENDPOINTS = 50
DEFAULT_WINDOW = timedelta(hours=24)
REQUEST_ID_WINDOW = timedelta(days=90)
EXPANSIONS = ("payloads",)

router = APIRouter(prefix="/v1/models/requests", tags=["fal platform"],
                   dependencies=[Depends(require_key(fal.DIALECT))], responses=documented(401, 404, 422))


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def split_values(values: list[str]) -> list[str]:
    """``?a=x,y&a=z`` -> ``[x, y, z]``, without blanks."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def encode_cursor(sort: str, key: Any, job: Any) -> str:
    """The opaque ``next_cursor``: the sort order and the (sort key, sent time, id) of a page's last row."""
    value = key.isoformat() if isinstance(key, datetime) else key
    return base64.urlsafe_b64encode(json.dumps([sort, value, job.created_at.isoformat(), job.id]).encode()).decode()


def _aware(value: Any) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("naive time")
    return parsed.astimezone(UTC)  # OverflowError for a time that is out of range in UTC


def decode_cursor(cursor: str, sort: str) -> tuple[Any, datetime, str]:
    """The (sort key, sent time, id) of a ``next_cursor`` made for a listing in the same order, or a 422."""
    try:
        kind, value, sent, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4)))
        if kind != sort or not isinstance(job_id, str):
            raise ValueError("another listing's cursor")
        if sort == "ended_at":
            key: Any = _aware(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            key = float(value)
        else:
            raise ValueError("not a duration")
        return key, _aware(sent), job_id
    except (ValueError, TypeError, UnicodeError, binascii.Error, OverflowError, RecursionError):
        raise query_error("cursor", "is not a cursor of this listing: pass next_cursor as it was returned, "
                                    "with the same sort_by") from None


def status_code(job: Any) -> int | None:
    """The HTTP status the request's result answers with (None while it is in flight)."""
    if job.status not in TERMINAL:
        return None
    return 200 if job.status == "completed" else fal.error_response(job).status_code


def json_output(request: Request, job: Any) -> Any:
    """The endpoint's output JSON (its error body for a failed request), or None when it was not kept."""
    if job.status not in TERMINAL:
        return None
    if job.status != "completed":
        return json.loads(fal.error_response(job).body)
    if job.result is None or not job.store_io:
        return None
    try:
        spec = request.app.state.catalog.endpoint(job.endpoint)
    except KeyError:  # an endpoint no longer in the catalogue
        return None
    return fal.output_body(request.app.state.storage, base_url(request), job, spec)


def history_item(request: Request, job: Any, payloads: bool) -> dict[str, Any]:
    ended = job.completed_at if job.status in TERMINAL else None
    item: dict[str, Any] = {
        "request_id": job.id,
        "endpoint_id": job.endpoint,
        "sent_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(ended),
        "status_code": status_code(job),
        "duration": round((ended - job.created_at).total_seconds(), 3) if ended and job.created_at else None,
    }
    if payloads:
        kept = job.store_io and job.input is not None
        item["json_input"] = ({k: v for k, v in job.input.items() if not k.startswith("__")} if kept else None)
        item["json_output"] = json_output(request, job) if kept else None
    return item


@router.get("/by-endpoint", summary="List requests by endpoint(s) (fal's request history)")
async def by_endpoint(
    request: Request,
    endpoint_id: Annotated[list[str], Query(description="Endpoint id(s): comma-separated or repeated, up to 50")],
    start: str | None = Query(None, description="ISO 8601; requests sent at or after it (default: 24 hours ago, "
                              "90 days with request_id)"),
    end: str | None = Query(None, description="ISO 8601, exclusive; requests sent before it (default: now)"),
    status: Literal["success", "error", "user_error"] | None = Query(None, description="Filter by outcome"),
    request_id: str | None = Query(None, description="Only this request"),
    expand: Annotated[list[str] | None, Query(description="payloads: include json_input and json_output")] = None,
    sort_by: Literal["ended_at", "duration"] = Query("ended_at", description="Latest end or longest first"),
    limit: int = Query(50, ge=1, le=100, description="Items per page"),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
) -> JSONResponse:
    endpoints = split_values(endpoint_id)
    if not endpoints:
        raise query_error("endpoint_id", "must name at least one endpoint")
    if len(endpoints) > MAX_ENDPOINTS:
        raise query_error("endpoint_id", f"names {len(endpoints)} endpoints; at most {MAX_ENDPOINTS}")
    expansions = split_values(expand or [])
    if unknown := [name for name in expansions if name not in EXPANSIONS]:
        raise query_error("expand", f"unknown expansion {unknown[0]!r}; known: {', '.join(EXPANSIONS)}")
    now = datetime.now(UTC)
    until = query_time("end", end) or now
    since = query_time("start", start) or until - (REQUEST_ID_WINDOW if request_id else DEFAULT_WINDOW)
    if since >= until:
        raise query_error("start", "must be before end")
    after = decode_cursor(cursor, sort_by) if cursor else None
    rows = await asyncio.to_thread(
        request.app.state.store.history, endpoints=endpoints, start=since, end=until,
        owner=caller(request).list_owner, outcome=status, request_id=request_id, sort=sort_by, after=after,
        limit=limit + 1)
    page = rows[:limit]
    items = await asyncio.to_thread(lambda: [history_item(request, job, "payloads" in expansions)
                                             for _, job in page])
    more = len(rows) > limit
    next_cursor = encode_cursor(sort_by, page[-1][0], page[-1][1]) if more else None
    return JSONResponse({"items": items, "next_cursor": next_cursor, "has_more": more})


def _delete_files(request: Request, job: Any) -> list[dict[str, Any]]:
    """Delete a request's output and preview files and forget its payloads; one result per output file."""
    store, storage = request.app.state.store, request.app.state.storage
    result = job.result or {}
    outputs = [output["key"] for output in (*result.get("images", []), *result.get("files", [])) if output.get("key")]
    previews = [line.preview_key for line in store.logs(job.id) if line.preview_key]
    results = []
    for key in outputs:
        link = image_url(request, key)
        try:
            with contextlib.suppress(KeyError, FileNotFoundError):  # already gone
                storage.delete(key)
            results.append({"link": link, "exception": None})
        except Exception as exc:  # noqa: BLE001 - reported per file, as fal does
            results.append({"link": link, "exception": f"{type(exc).__name__}: {exc}"})
    for key in previews:
        with contextlib.suppress(Exception):  # a preview is best effort; the output files are what counts
            storage.delete(key)
    store.forget_files(outputs + previews)
    store.forget_io(job.id)
    return results


@router.delete("/{request_id}/payloads", summary="Delete a finished request's input, output and output files",
               responses={409: {"description": "The request has not ended yet"}})
async def delete_payloads(request: Request, request_id: str) -> JSONResponse:
    store = request.app.state.store
    job = await asyncio.to_thread(store.get, request_id)
    if job is None or not caller(request).may_see(job.owner):
        raise ApiError(404, f"Request {request_id!r} not found", error_type="not_found")
    if job.status not in TERMINAL:
        raise ApiError(409, f"Request {request_id!r} is still in progress; delete its payloads once it ended",
                       error_type="request_in_progress")
    results = await asyncio.to_thread(_delete_files, request, job)
    return JSONResponse({"cdn_delete_results": results})

