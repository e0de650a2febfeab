"""The playground: a static page (``web/``) at ``GET /`` and ``/playground``, ``GET /api/history`` and
``GET /api/info``.

The page is plain HTML, a few JS modules and one CSS file shipped inside the package; it talks to the server the way
a client does (fal's queue API and request history, ``/api/endpoints``, the per-endpoint OpenAPI documents).
``/api/history`` lists the caller's recent jobs of every dialect (an admin key's: everyone's), newest first, filtered
by endpoint, dialect, status or prompt text, for its gallery; ``DELETE /api/history/{id}`` deletes one finished job
and its images.
``/api/info`` tells the page, without a key, whether the tiny demo models stand in for the real weights.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from fluxserve.api.auth import caller, require_key
from fluxserve.api.common import image_url
from fluxserve.api.errors import ApiError, query_error, query_time
from fluxserve.jobs.retention import delete_job

WEB = resources.files("fluxserve") / "web"
TYPES = {".js": "text/javascript", ".css": "text/css"}
ASSETS = {item.name: TYPES[item.name[item.name.rfind("."):]] for item in WEB.iterdir()
          if item.is_file() and item.name[item.name.rfind("."):] in TYPES}  # web/'s scripts and styles, by name
MAX_HISTORY = 200
Dialect = Literal["fal", "openai", "replicate"]
Status = Literal["queued", "running", "completed", "failed", "cancelled"]

router = APIRouter(tags=["playground"])


def _asset(name: str) -> bytes:
    return (WEB / name).read_bytes()


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def playground() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return Response("Not found", status_code=404, media_type="text/plain")
    return Response(_asset(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/api/info", summary="What the playground shows about this server: whether demo weights are loaded")
async def info(request: Request) -> JSONResponse:
    return JSONResponse({"demo": bool(request.app.state.settings.demo)})


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def history_item(request: Request, job: Any) -> dict[str, Any]:
    """One job as the history panel shows it. Jobs stored without their bodies (``store_io`` off) keep only
    their status and timing: no prompt, input or images."""
    item: dict[str, Any] = {
        "id": job.id, "endpoint": job.endpoint, "dialect": job.dialect, "status": job.status,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at), "step": job.step, "total_steps": job.total_steps,
        "error": job.error, "error_type": job.error_type, "store_io": job.store_io,
        "prompt": None, "input": None, "request": None, "images": [], "seed": None, "timings": None,
    }
    if not job.store_io:
        return item
    canonical = job.request or {}
    result = job.result or {}
    item.update(
        prompt=result.get("prompt") or canonical.get("prompt") or (job.input or {}).get("prompt"),
        input=job.input, request=canonical or None, seed=result.get("seed", canonical.get("seed")),
        timings=result.get("timings"),
        images=[{"url": image_url(request, image["key"]), "width": image.get("width"),
                 "height": image.get("height"), "content_type": image.get("content_type")}
                for image in result.get("images", []) if image.get("key")],
    )
    return item


@router.get("/api/history", dependencies=[Depends(require_key("fal"))],
            summary="Recent jobs of every dialect, newest first (the playground's history)")
async def history(request: Request, limit: int = Query(50, ge=1, le=MAX_HISTORY),
                  before: str | None = Query(None, description="ISO 8601: only jobs created before it"),
                  endpoint: str | None = Query(None, description="Only this endpoint's jobs"),
                  dialect: Annotated[Dialect | None, Query(description="Only jobs made through this API")] = None,
                  status: Annotated[Status | None, Query(description="Only jobs in this state")] = None,
                  q: str | None = Query(None, max_length=200, description="Only jobs whose prompt contains this "
                                        "text (ignoring case)")) -> JSONResponse:
    cutoff = query_time("before", before)
    if endpoint and endpoint not in request.app.state.catalog.endpoints:
        raise query_error("endpoint", f"Unknown endpoint: {endpoint!r}")
    if q and "\x00" in q:  # no database text holds it
        raise query_error("q", "The search text must not contain NUL characters")
    jobs = await asyncio.to_thread(request.app.state.store.list, limit=limit, before=cutoff,
                                   owner=caller(request).list_owner, endpoint=endpoint or None, dialect=dialect,
                                   status=status, prompt_contains=(q or "").strip() or None)
    items = [history_item(request, job) for job in jobs]
    next_before = items[-1]["created_at"] if len(items) == limit else None
    return JSONResponse({"items": items, "next_before": next_before})


@router.delete("/api/history/{job_id}", dependencies=[Depends(require_key("fal"))], status_code=204,
               summary="Delete a finished job with its images and previews")
async def delete_history(request: Request, job_id: str) -> Response:
    store = request.app.state.store
    job = await asyncio.to_thread(store.get, job_id)
    if job is None or not caller(request).may_see(job.owner):
        raise ApiError(404, f"Request {job_id} not found", error_type="not_found")
    outcome = await asyncio.to_thread(delete_job, store, request.app.state.storage, job_id)
    if outcome == "ACTIVE":
        raise ApiError(409, f"Request {job_id} is {job.status}: cancel it first, then delete it",
                       error_type="conflict")
    if outcome == "NOT_FOUND":  # deleted meanwhile
        raise ApiError(404, f"Request {job_id} not found", error_type="not_found")
    return Response(status_code=204)
