"""The probe paths on the API port: ``GET /health/live`` and ``GET /health/ready`` (``fluxserve.health``).
No key needed: probes carry none, and the answers say nothing about anyone's work."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fluxserve.health import LIVE_PATH, READY_PATH, readiness

router = APIRouter(tags=["operations"])


@router.get(LIVE_PATH, summary="Liveness: 200 while the process runs")
async def live() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(READY_PATH, summary="Readiness: 200 when the job store answers and the workers run; 503 with the reason",
            responses={503: {"description": "Not ready: `reason` says what failed"}})
async def ready(request: Request) -> JSONResponse:
    state = await asyncio.to_thread(readiness, request.app.state.store, request.app.state.workers)
    return JSONResponse(state.body(), status_code=state.status_code)
