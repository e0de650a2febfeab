"""Claiming due webhook rows (terminal deliveries or event webhooks) fairly between API keys.

``claim`` runs on the job store's write transaction. Invariant: a claim never gives one key (the owner of the
job, ``jobs.owner``) more rows than ``per_owner`` less what that key already has in flight in the claiming
process (``busy``); jobs without an owner (a server without keys: one tenant) are not limited. Within that, the
earliest due rows go first, one of each key before the second of any, so a key with a thousand due webhooks
does not push another key's single one behind them. Each claimed row is leased (its ``next_attempt_at`` moves
``lease_s`` ahead), so other senders skip it until the attempt ends or the lease runs out (a sender that died).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, or_, select, update
from sqlalchemy.engine import Connection, Row

from fluxserve.jobs.models import jobs


def claim(conn: Connection, table: Table, due: ColumnElement[bool], *, now: datetime, limit: int,
          lease_s: float, per_owner: int | None = None, busy: Mapping[str | None, int] | None = None,
          busy_jobs: Collection[str] = ()) -> list[tuple[Row[Any], str | None]]:
    """Lease up to ``limit`` rows of ``table`` (``webhook_deliveries`` or ``webhook_events``) that ``due``
    selects, fairly between keys (see the module), none of the ``busy_jobs`` (whose webhooks the claiming
    process is sending now: one at a time per job keeps them in order); returns (row, owner) pairs.
    ``per_owner`` None: no limit per key (earliest due first)."""
    if limit <= 0:
        return []
    busy = busy or {}
    if busy_jobs:
        due = and_(due, table.c.job_id.not_in(list(busy_jobs)))
    rank = func.row_number().over(partition_by=jobs.c.owner, order_by=(table.c.next_attempt_at, table.c.id))
    ranked = (select(table.c.id, table.c.next_attempt_at, jobs.c.owner, rank.label("rank"))
              .select_from(table.join(jobs, jobs.c.id == table.c.job_id)).where(due).subquery())
    candidates = select(ranked.c.id, ranked.c.owner)
    if per_owner is None:
        candidates = candidates.order_by(ranked.c.next_attempt_at, ranked.c.id).limit(limit)
    else:
        # each key's first per_owner rows, round by round; the keys in flight drop at most sum(busy) of them
        candidates = (candidates.where(or_(ranked.c.rank <= per_owner, ranked.c.owner.is_(None)))
                      .order_by(ranked.c.rank, ranked.c.next_attempt_at, ranked.c.id)
                      .limit(limit + sum(busy.values())))
    taken: Counter[str | None] = Counter(busy)
    chosen: dict[int, str | None] = {}
    for row in conn.execute(candidates):
        if per_owner is not None and row.owner is not None and taken[row.owner] >= per_owner:
            continue
        taken[row.owner] += 1
        chosen[row.id] = row.owner
        if len(chosen) == limit:
            break
    if not chosen:
        return []
    # lock in id order (two claimers never wait on each other in a circle); a row another claimer took since
    # is no longer due, or is locked and skipped
    locked = conn.execute(select(table.c.id).where(table.c.id.in_(chosen), due).order_by(table.c.id)
                          .with_for_update(skip_locked=True)).scalars().all()
    if not locked:
        return []
    conn.execute(update(table).where(table.c.id.in_(locked))
                 .values(next_attempt_at=now + timedelta(seconds=lease_s)))
    rows = conn.execute(select(table).where(table.c.id.in_(locked)).order_by(table.c.id)).all()
    return [(row, chosen[row.id]) for row in rows]
