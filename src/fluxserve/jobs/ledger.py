"""The usage ledger: one ``job_usage`` row per finished job, and its totals per key, endpoint, day or provider.

``record`` runs inside the job store's transaction that makes a job terminal, so every finished job has its row
and no job has two. Only completed jobs bill: the images and megapixels of failed and cancelled jobs are 0
whatever the worker reports; their GPU seconds and steps are kept (the operator's cost, not the caller's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from fluxserve.jobs.models import job_usage
from fluxserve.usage import Price

GROUPS = ("key", "endpoint", "day", "provider")
BILLED = ("input_images", "input_megapixels", "output_images", "output_megapixels", "megapixels")
_INSERT_SQL = (
    "INSERT INTO job_usage (job_id, owner, endpoint, model, dialect, status, finished_at, input_images, "
    "input_megapixels, output_images, output_megapixels, megapixels, gpu_seconds, steps, provider) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING"
)


def record(raw: Any, job: Any, now: datetime, usage: dict[str, Any] | None) -> None:
    """Write the usage row of ``job``, just made terminal, on the store's raw transaction ``raw``."""
    usage = usage or {}
    billed = [int(usage.get(name) or 0) if job.status == "completed" else 0 for name in BILLED]
    raw.execute(_INSERT_SQL, (
        job.id, job.owner, job.endpoint, job.model or "", job.dialect, job.status, raw.time(now), *billed,
        float(usage.get("gpu_seconds") or 0.0), int(usage.get("steps") or 0), usage.get("provider"),
    ))


def job_usage_row(store: Any, job_id: str) -> dict[str, Any] | None:
    """One job's usage row, or None before it finished."""
    with store.engine.connect() as conn:
        row = conn.execute(select(job_usage).where(job_usage.c.job_id == job_id)).mappings().first()
    return dict(row) if row is not None else None


@dataclass
class Totals:
    """The usage of one group (or of everything): jobs by outcome, billed images and megapixels, engine time,
    and the cost at the catalogue's prices (None when no endpoint in it has a price)."""

    group: str | None = None
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    input_images: int = 0
    input_megapixels: int = 0
    output_images: int = 0
    output_megapixels: int = 0
    megapixels: int = 0
    gpu_seconds: float = 0.0
    steps: int = 0
    cost: float | None = None
    unpriced_megapixels: int = 0  # billed megapixels of endpoints without a price

    def add(self, endpoint_row: dict[str, Any], price: Price | None) -> None:
        self.jobs += endpoint_row["jobs"]
        setattr(self, endpoint_row["status"], getattr(self, endpoint_row["status"]) + endpoint_row["jobs"])
        for name in (*BILLED, "steps"):
            setattr(self, name, getattr(self, name) + int(endpoint_row[name] or 0))
        self.gpu_seconds += float(endpoint_row["gpu_seconds"] or 0.0)
        if price is None:
            self.unpriced_megapixels += int(endpoint_row["megapixels"] or 0)
        else:
            cost = price.cost(int(endpoint_row["output_images"] or 0), int(endpoint_row["megapixels"] or 0))
            self.cost = (self.cost or 0.0) + cost

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu_seconds"] = round(self.gpu_seconds, 3)
        if self.cost is not None:
            data["cost"] = round(self.cost, 6)
        return data


def _group_column(store: Any, group_by: str) -> Any:
    if group_by == "key":
        return job_usage.c.owner
    if group_by == "endpoint":
        return job_usage.c.endpoint
    if group_by == "provider":
        return job_usage.c.provider
    if store.is_sqlite:  # times are stored as text, 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC
        return func.substr(job_usage.c.finished_at, 1, 10)
    return func.to_char(job_usage.c.finished_at, "YYYY-MM-DD")


def report(store: Any, *, group_by: str = "endpoint", since: datetime | None = None, until: datetime | None = None,
           owner: str | None = None, prices: dict[str, Price] | None = None) -> tuple[list[Totals], Totals]:
    """Usage of the jobs finished in ``[since, until)`` (given ``owner``, only that key's), per ``group_by``
    (``key``, ``endpoint``, ``day`` (UTC) or ``provider``: who served it) in order of the group, and in all."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}, not {group_by!r}")
    prices = prices or {}
    group = _group_column(store, group_by).label("grp")
    sums = [func.sum(job_usage.c[name]).label(name) for name in (*BILLED, "gpu_seconds", "steps")]
    stmt = (select(group, job_usage.c.endpoint, job_usage.c.status, func.count().label("jobs"), *sums)
            .group_by(group, job_usage.c.endpoint, job_usage.c.status))
    if since is not None:
        stmt = stmt.where(job_usage.c.finished_at >= since)
    if until is not None:
        stmt = stmt.where(job_usage.c.finished_at < until)
    if owner is not None:
        stmt = stmt.where(job_usage.c.owner == owner)
    with store.engine.connect() as conn:
        rows = [dict(row) for row in conn.execute(stmt).mappings()]
    groups: dict[str | None, Totals] = {}
    total = Totals()
    for row in rows:
        price = prices.get(row["endpoint"])
        groups.setdefault(row["grp"], Totals(group=row["grp"])).add(row, price)
        total.add(row, price)
    ordered = sorted(groups.values(), key=lambda t: (t.group is None, t.group or ""))
    return ordered, total
