"""Latency and success figures per endpoint, model, dialect or provider over a recent window, read from the job
store. By provider: ``local`` (this server's GPU workers) and each upstream the gateway called (one row per call,
``upstream_calls``), so a provider's failures count even when the next route served the request.

For the jobs submitted in the window that have finished (completed, failed or cancelled):

- generation time: start to end of each completed job (its time on a worker);
- queue wait: submit to start, for every job that started;
- time to first byte: submit to the first progress event for queued calls, submit to the response for
  synchronous calls (OpenAI's, fal's ``/run``), whose first byte is the answer itself (completed jobs only);
- success rate: completed / (completed + failed); cancelled jobs count for neither;
- throughput: completed jobs per minute, averaged over the window.

Counts are computed in SQL on both databases. Percentiles (p50, p95; linear interpolation, as PostgreSQL's
``percentile_cont``) are computed in SQL on PostgreSQL and in Python on SQLite, which has no such function,
over the window's newest ``MAX_SAMPLES`` finished jobs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text

from fluxserve.jobs.models import UTCDateTime
from fluxserve.jobs.store import JobStore, utcnow

WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "30d": timedelta(days=30)}
GROUPS = ("endpoint", "model", "dialect", "provider")
PERCENTILES = (0.5, 0.95)
MAX_SAMPLES = 50_000  # SQLite: percentiles over at most this many of the window's newest jobs
FIGURES = ("generation", "queue_wait", "ttfb")

# a synchronous call: the caller's connection waits for the result (OpenAI's API is synchronous only)
SYNC_SQL = "(caller IS NOT NULL OR dialect = 'openai')"


def is_sync(job: Any) -> bool:
    """``SYNC_SQL`` for one job."""
    return bool(job.caller) or job.dialect == "openai"


def time_to_first_byte(job: Any) -> float | None:
    """Seconds from submit to the first progress event (a queued call) or to the response (a synchronous
    call); None when the job has none."""
    end = (job.completed_at if job.status == "completed" else None) if is_sync(job) else job.first_progress_at
    if end is None or job.created_at is None:
        return None
    return max(0.0, (end - job.created_at).total_seconds())


@dataclass
class GroupStats:
    key: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    # figure -> {"p50": ms, "p95": ms}; None when no job of the group has that figure
    percentiles: dict[str, dict[str, float] | None] = field(default_factory=dict)

    @property
    def success_rate(self) -> float | None:
        decided = self.completed + self.failed
        return self.completed / decided if decided else None

    def as_dict(self, window: timedelta) -> dict[str, Any]:
        return {
            "key": self.key, "jobs": self.jobs, "completed": self.completed, "failed": self.failed,
            "cancelled": self.cancelled,
            "success_rate": round(self.success_rate, 4) if self.success_rate is not None else None,
            "generation_ms": self.percentiles.get("generation"),
            "ttfb_ms": self.percentiles.get("ttfb"),
            "queue_wait_ms": self.percentiles.get("queue_wait"),
            "throughput_per_min": round(self.completed / (window.total_seconds() / 60), 4),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """``percentile_cont(q)`` of ascending values: linear interpolation between the closest ranks."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _seconds(end: str, start: str, postgres: bool) -> str:
    if postgres:
        return f"EXTRACT(EPOCH FROM ({end} - {start}))::float8"
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def _window_sql(group_by: str, postgres: bool, owner: str | None) -> str:
    """The window's finished jobs with their key and durations in seconds (NULL where a job has none)."""
    generation = f"CASE WHEN status = 'completed' THEN {_seconds('completed_at', 'started_at', postgres)} END"
    ttfb = (f"CASE WHEN {SYNC_SQL} THEN (CASE WHEN status = 'completed' THEN "
            f"{_seconds('completed_at', 'created_at', postgres)} END) "
            f"ELSE {_seconds('first_progress_at', 'created_at', postgres)} END")
    by_owner = " AND owner = :owner" if owner is not None else ""
    if group_by == "provider":
        return (f"SELECT 'local' AS key, status, created_at, {generation} AS generation, "
                f"{_seconds('started_at', 'created_at', postgres)} AS queue_wait, {ttfb} AS ttfb FROM jobs "
                "WHERE kind = 'generate' AND created_at >= :since AND status IN ('completed', 'failed', "
                f"'cancelled'){by_owner} UNION ALL {_calls_sql(postgres)}{by_owner}")
    return (f"SELECT {group_by} AS key, status, created_at, {generation} AS generation, "
            f"{_seconds('started_at', 'created_at', postgres)} AS queue_wait, {ttfb} AS ttfb FROM jobs "
            f"WHERE created_at >= :since AND status IN ('completed', 'failed', 'cancelled'){by_owner}")


def _calls_sql(postgres: bool) -> str:
    """The gateway's calls to providers as rows of the same shape: a call that served is completed, one after
    which the next route was tried failed; a request the provider refused (4xx) or that was cancelled counts for
    neither. Generation: start to end of the call, outputs fetched; time to first byte: start to the provider's
    answer."""
    served = "outcome = 'served'"
    return (f"SELECT provider AS key, CASE outcome WHEN 'served' THEN 'completed' WHEN 'failed' THEN 'failed' "
            "ELSE outcome END AS status, started_at AS created_at, "
            f"CASE WHEN {served} THEN {_seconds('ended_at', 'started_at', postgres)} END AS generation, "
            "CAST(NULL AS DOUBLE PRECISION) AS queue_wait, "
            f"CASE WHEN {served} THEN {_seconds('answered_at', 'started_at', postgres)} END AS ttfb "
            "FROM upstream_calls WHERE started_at >= :since")


def _ms(seconds: Any) -> float:
    return round(max(0.0, float(seconds)) * 1000, 1)


def window_stats(store: JobStore, window: str, group_by: str, *, owner: str | None = None,
                 now: datetime | None = None) -> list[dict[str, Any]]:
    """One dict per group (``GroupStats.as_dict``), fastest p50 generation time first. ``owner``: only that
    API key's jobs (None: everyone's)."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}, not {group_by!r}")
    postgres = not store.is_sqlite
    params: dict[str, Any] = {"since": (now or utcnow()) - WINDOWS[window]}
    if owner is not None:
        params["owner"] = owner
    since = bindparam("since", type_=UTCDateTime())
    rows = _window_sql(group_by, postgres, owner)
    counts = ("SELECT key, count(*), sum(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), "
              "sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), "
              "sum(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END)")
    if postgres:
        quantiles = f"ARRAY[{', '.join(str(q) for q in PERCENTILES)}]::float8[]"
        counts += "".join(f", percentile_cont({quantiles}) WITHIN GROUP (ORDER BY {name})" for name in FIGURES)
    groups: dict[str, GroupStats] = {}
    with store.engine.connect() as conn:
        for key, jobs, completed, failed, cancelled, *figures in conn.execute(
                text(f"{counts} FROM ({rows}) AS w GROUP BY key").bindparams(since), params):
            stats = groups[key] = GroupStats(key, int(jobs), int(completed), int(failed), int(cancelled))
            for name, values in zip(FIGURES, figures):
                stats.percentiles[name] = None if values is None else {
                    f"p{round(q * 100)}": _ms(v) for q, v in zip(PERCENTILES, values)}
        if not postgres:
            samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for key, *figures in conn.execute(text(
                    f"SELECT key, {', '.join(FIGURES)} FROM ({rows}) AS w ORDER BY created_at DESC "
                    f"LIMIT {MAX_SAMPLES}").bindparams(since), params):
                for name, value in zip(FIGURES, figures):
                    if value is not None:
                        samples[key][name].append(float(value))
            for key, stats in groups.items():
                for name in FIGURES:
                    values = sorted(samples[key][name])
                    stats.percentiles[name] = {f"p{round(q * 100)}": _ms(percentile(values, q))
                                               for q in PERCENTILES} if values else None

    def rank(stats: GroupStats) -> tuple:
        generation = stats.percentiles.get("generation")
        return (generation is None, generation["p50"] if generation else 0.0, stats.key)

    return [stats.as_dict(WINDOWS[window]) for stats in sorted(groups.values(), key=rank)]
