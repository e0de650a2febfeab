"""``GET /api/stats``: p50 / p95 generation time, time to first byte and queue wait, success rate and throughput
per endpoint, model or dialect over the last hour, day or 30 days (``jobs/stats.py``), and ``GET /stats``, the
page that shows them. A key sees the figures of its own jobs; an admin key (or keyless local use) everyone's.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from fluxserve.api.auth import caller, require_key
from fluxserve.api.errors import query_error
from fluxserve.jobs.stats import GROUPS, WINDOWS, window_stats

router = APIRouter(tags=["operations"])


def _choice(field: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise query_error(field, f"Input should be one of {', '.join(choices)}, not {value!r}")
    return value


@router.get("/stats", include_in_schema=False)
async def stats_page() -> Response:
    page = (resources.files("fluxserve") / "web" / "stats.html").read_bytes()
    return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/api/stats", dependencies=[Depends(require_key("fal"))],
            summary="Generation time, time to first byte, queue wait, success rate and throughput per group")
async def stats(
    request: Request,
    window: str = Query("24h", description="How far back: 1h, 24h or 30d", json_schema_extra={"enum": [*WINDOWS]}),
    group_by: str = Query("endpoint", description="One row per endpoint, model, dialect or provider (local and "
                          "each upstream the gateway called)",
                          json_schema_extra={"enum": [*GROUPS]}),
) -> JSONResponse:
    _choice("window", window, tuple(WINDOWS))
    _choice("group_by", group_by, GROUPS)
    groups = await asyncio.to_thread(window_stats, request.app.state.store, window, group_by,
                                     owner=caller(request).list_owner)
    return JSONResponse({"window": window, "group_by": group_by, "groups": groups})
