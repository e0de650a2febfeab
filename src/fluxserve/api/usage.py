"""``GET /api/usage``: billed images, megapixels, engine time and cost of the caller's finished jobs (an admin
key's: everyone's), per key, endpoint or day; see docs/usage.md."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from fluxserve.api.auth import caller, require_key
from fluxserve.api.errors import documented, query_error, query_time
from fluxserve.jobs import ledger

router = APIRouter(tags=["usage"], responses=documented(401, 422))


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value is not None else None


@router.get("/api/usage", dependencies=[Depends(require_key("fal"))],
            summary="Usage by the megapixel: the caller's finished jobs (an admin key: everyone's) in totals")
async def usage(
    request: Request,
    from_: str | None = Query(None, alias="from", description="ISO 8601: jobs finished at or after it"),
    to: str | None = Query(None, description="ISO 8601: jobs finished before it"),
    group_by: str = Query("endpoint", description="key | endpoint | day (UTC) | provider (local or the gateway's "
                          "upstream that served it)"),
) -> JSONResponse:
    since, until = query_time("from", from_), query_time("to", to)
    if since is not None and until is not None and until <= since:
        raise query_error("to", "'to' must be later than 'from'")
    if group_by not in ledger.GROUPS:
        raise query_error("group_by", f"group_by must be one of: {', '.join(ledger.GROUPS)}")
    catalog, store = request.app.state.catalog, request.app.state.store
    groups, total = await asyncio.to_thread(ledger.report, store, group_by=group_by, since=since, until=until,
                                            owner=caller(request).list_owner, prices=catalog.prices)
    items = [totals.as_dict() for totals in groups]
    if group_by == "key":  # the keys' names too (a key id alone is hard to recognise)
        names = {key.id: key.name for key in await asyncio.to_thread(store.list_keys)}
        items = [item | {"name": names.get(item["group"])} for item in items]
    body: dict[str, Any] = {"from": _iso(since), "to": _iso(until), "group_by": group_by,
                            "currency": catalog.currency or None, "groups": items, "total": total.as_dict()}
    return JSONResponse(body)
