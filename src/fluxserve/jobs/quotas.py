"""Quotas per API key: jobs at once, jobs per minute, billed megapixels per day.

Limits live on the key's row in ``api_keys`` (NULL: unlimited) and every count is read from the job store in the
submit's own transaction, so they hold across API replicas: SQLite's write lock serializes submits; on
PostgreSQL the key's row is locked (``FOR UPDATE``) while its counts are read and the job is inserted. Admin keys
and servers without keys are never limited.

* ``max_concurrent``: the key's queued and running jobs, plus the new one.
* ``rpm``: the key's jobs created in the last 60 s, plus the new one.
* ``mp_per_day``: the billed megapixels (``job_usage``) of the key's jobs that finished in the last 24 h, plus an
  estimate for its queued and running jobs and for the new one (``estimate_megapixels``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fluxserve.usage import megapixels

LIMITS = ("max_concurrent", "rpm", "mp_per_day")
MINUTE = timedelta(seconds=60)
DAY = timedelta(hours=24)
CONCURRENCY_RETRY_AFTER_S = 5  # a job usually finishes within seconds: ask the client to try again then


@dataclass(frozen=True)
class Limits:
    max_concurrent: int | None = None
    rpm: int | None = None
    mp_per_day: int | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMITS)

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in LIMITS if getattr(self, name) is not None]
        return " ".join(parts) or "-"


def validate(limits: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first entry that is not a limit: a known name with a whole number of at
    least 1, or None (unlimited)."""
    for name, value in limits.items():
        if name not in LIMITS:
            raise ValueError(f"unknown limit {name!r}: use {', '.join(LIMITS)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number of at least 1, or None for no limit, not {value!r}")


@dataclass(frozen=True)
class Exceeded:
    """Why a submit is refused: ``limit`` names the limit, ``retry_after_s`` says when the submit may pass."""

    message: str
    retry_after_s: int
    limit: str


def estimate_megapixels(request: dict[str, Any]) -> int:
    """What a canonical request will bill at least: each output image at its size (1 MP while the size is
    decided from a reference), each reference 1 MP (its size is known only once it is fetched)."""
    width, height = request.get("width"), request.get("height")
    each = megapixels(width, height) if isinstance(width, int) and isinstance(height, int) else 1
    return each * int(request.get("num_images") or 1) + len(request.get("image_urls") or [])


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, math.ceil((moment - now).total_seconds()))


def check(raw: Any, owner: str | None, request: dict[str, Any], now: datetime) -> Exceeded | None:
    """Why one more job for ``owner`` would pass a limit of its key, or None when it may be queued (on the
    store's raw write transaction ``raw``, before the job is inserted)."""
    if owner is None:
        return None
    row = raw.execute("SELECT admin, max_concurrent, rpm, mp_per_day FROM api_keys WHERE id = ?", (owner,)).fetchone()
    if row is None or row[0]:
        return None
    limits = Limits(*row[1:])
    if not limits.any:
        return None
    if raw.postgres:  # submits of this key in other processes wait here until this one commits
        raw.execute("SELECT id FROM api_keys WHERE id = ? FOR UPDATE", (owner,))
    if limits.max_concurrent is not None and (refused := _concurrent(raw, owner, limits.max_concurrent)):
        return refused
    if limits.rpm is not None and (refused := _rpm(raw, owner, limits.rpm, now)):
        return refused
    if limits.mp_per_day is not None:
        return _megapixels(raw, owner, limits.mp_per_day, estimate_megapixels(request), now)
    return None


def _concurrent(raw: Any, owner: str, limit: int) -> Exceeded | None:
    active = raw.execute("SELECT count(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')",
                         (owner,)).fetchone()[0]
    if active + 1 <= limit:
        return None
    return Exceeded(f"This API key has {active} requests queued or running, its limit (max_concurrent {limit}); "
                    "try again when one finishes.", CONCURRENCY_RETRY_AFTER_S, "max_concurrent")


def _rpm(raw: Any, owner: str, limit: int, now: datetime) -> Exceeded | None:
    since = raw.time(now - MINUTE)
    recent = raw.execute("SELECT count(*) FROM jobs WHERE owner = ? AND created_at > ?", (owner, since)).fetchone()[0]
    if recent + 1 <= limit:
        return None
    # the window admits one more once the oldest (recent + 1 - limit) submissions in it have aged out
    freeing = raw.execute("SELECT created_at FROM jobs WHERE owner = ? AND created_at > ? ORDER BY created_at "
                          "LIMIT 1 OFFSET ?", (owner, since, recent - limit)).fetchone()
    retry = _seconds_until(_as_time(freeing[0]) + MINUTE, now) if freeing else 1
    return Exceeded(f"This API key made {recent} requests in the last minute, its limit (rpm {limit}); "
                    f"try again in {retry} s.", retry, "rpm")


def _megapixels(raw: Any, owner: str, limit: int, needed: int, now: datetime) -> Exceeded | None:
    since = raw.time(now - DAY)
    used = int(raw.execute("SELECT COALESCE(SUM(megapixels), 0) FROM job_usage WHERE owner = ? AND finished_at > ?",
                           (owner, since)).fetchone()[0])
    pending = sum(estimate_megapixels(_as_dict(request)) for (request,) in raw.execute(
        "SELECT request FROM jobs WHERE owner = ? AND status IN ('queued', 'running')", (owner,)).fetchall())
    if used + pending + needed <= limit:
        return None
    if needed > limit:
        return Exceeded(f"This request needs {needed} megapixels, more than this API key may use in 24 hours "
                        f"(mp_per_day {limit}).", int(DAY.total_seconds()), "mp_per_day")
    retry = int(DAY.total_seconds())  # at the latest: the unfinished jobs' megapixels age out a day after they end
    excess = used + pending + needed - limit
    for finished_at, billed in raw.execute(
            "SELECT finished_at, megapixels FROM job_usage WHERE owner = ? AND finished_at > ? AND megapixels > 0 "
            "ORDER BY finished_at", (owner, since)):
        excess -= int(billed)
        if excess <= 0:
            retry = _seconds_until(_as_time(finished_at) + DAY, now)
            break
    return Exceeded(f"This API key used {used} of its {limit} megapixels in the last 24 hours (mp_per_day {limit})"
                    + (f" and has {pending} more queued or running" if pending else "")
                    + f"; this request needs {needed}. Try again in {retry} s.", retry, "mp_per_day")


def _as_time(value: Any) -> datetime:
    """A raw DBAPI time (SQLite: text; PostgreSQL: naive datetime) as an aware UTC datetime."""
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _as_dict(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else value or {}
