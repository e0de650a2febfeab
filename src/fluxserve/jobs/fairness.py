"""Fair scheduling between API keys: which queued job a claim takes, and where a queued job stands.

Invariant: a claim takes a job of the best priority a worker may run; among the keys that have such jobs, the key
whose last job started longest ago (a key that never ran one first; ties: the oldest waiting job), and that key's
oldest job. So keys take turns (round robin): one key's burst never puts another key behind all of it, and each
key's own jobs run in the order they were submitted. Jobs without a key (a server without keys) are one key of
their own, so such a server stays first in, first out. A job whose worker died (its lease expired) is taken again
before new work of the same priority.

A queued job's position (``POSITION``: how many jobs start before it, 0 = next) follows the same turns: the
queued jobs of a better priority, its own key's jobs before it (k), and from every other key with queued jobs
of its priority as many as will have had their turn by then, min(that key's queued jobs, k). It leaves out whose
turn comes first in the job's own round, so it may be low by one per other key with a longer queue.

The claim's queries run on the store's raw write transaction and use the jobs table's indexes:
``ix_jobs_owner_queue`` (status, owner, priority_rank, created_at, id) lists the keys with queued jobs, one index
probe each (a recursive skip scan), and finds each key's oldest job; ``ix_jobs_owner_started`` (owner,
started_at) finds each key's last start. A claim costs a few probes per key with queued jobs, not a scan of the
backlog (the position, like the first-in-first-out one before it, counts the jobs before the job). On PostgreSQL
the job is taken with ``FOR UPDATE SKIP LOCKED``: concurrent claimers never take one job twice; one that finds a
key's oldest job locked takes that key's next one (or the next key's). Concurrent claimers read the same last
starts, so for an instant two of them may serve one key in a row: the turns are exact with one claimer at a time
(as on SQLite, whose claims hold the write lock) and off by at most one turn per concurrent claimer on
PostgreSQL.
"""

from __future__ import annotations

from typing import Any

# The keys with queued jobs (a skip scan of ix_jobs_owner_queue: one probe per key, then the jobs without a key),
# each key's oldest job the claim may take ({claimable}: a condition on q with placeholders) and its last start.
# The head's columns are read by its primary key (a join would let the planner hash the whole table).
_TURNS_SQL = """
WITH RECURSIVE owners(owner) AS (
    SELECT min(owner) FROM jobs WHERE status = 'queued'
    UNION ALL
    SELECT (SELECT min(n.owner) FROM jobs n WHERE n.status = 'queued' AND n.owner > o.owner)
    FROM owners o WHERE o.owner IS NOT NULL
), heads(owner, head) AS (
    SELECT o.owner, (SELECT q.id FROM jobs q WHERE q.status = 'queued' AND q.owner = o.owner AND {claimable}
                     ORDER BY q.priority_rank, q.created_at, q.id LIMIT 1)
    FROM owners o WHERE o.owner IS NOT NULL
    UNION ALL
    SELECT NULL, (SELECT q.id FROM jobs q WHERE q.status = 'queued' AND q.owner IS NULL AND {claimable}
                  ORDER BY q.priority_rank, q.created_at, q.id LIMIT 1)
)
SELECT owner, priority_rank FROM (
    SELECT h.owner, h.head, (SELECT j.priority_rank FROM jobs j WHERE j.id = h.head) AS priority_rank,
        (SELECT j.created_at FROM jobs j WHERE j.id = h.head) AS created_at, CASE WHEN h.owner IS NULL
        THEN (SELECT max(s.started_at) FROM jobs s WHERE s.owner IS NULL)
        ELSE (SELECT max(s.started_at) FROM jobs s WHERE s.owner = h.owner) END AS served
    FROM heads h WHERE h.head IS NOT NULL
) turns ORDER BY priority_rank, served IS NOT NULL, served, created_at, head
"""

# One key's oldest job the claim may take ({owner}: that key, {claimable} as above, {lock} on PostgreSQL).
_NEXT_OF_OWNER_SQL = ("SELECT q.id FROM jobs q WHERE q.status = 'queued' AND {owner} AND {claimable} "
                      "ORDER BY q.priority_rank, q.created_at, q.id LIMIT 1{lock}")

# A running job whose lease expired ({expired}: a condition on q with placeholders), of this priority or better.
_EXPIRED_SQL = ("SELECT q.id FROM jobs q WHERE q.status = 'running' AND {expired} AND q.priority_rank <= ? "
                "ORDER BY q.priority_rank, q.created_at, q.id LIMIT 1{lock}")


# Where a queued job stands. ``AHEAD``: its own key's queued jobs before it, an expression on the job's row ``t``
# (NULL unless it is queued). ``POSITION``: an expression on ``j``, a one-row CTE of the job with that column as
# ``ahead`` and its priority_rank and owner; the other keys' queue lengths are counted only when ``ahead`` > 0.
# Both read ix_jobs_owner_queue.
_BEFORE = "q.priority_rank = t.priority_rank AND (q.created_at, q.id) < (t.created_at, t.id)"
AHEAD = f"""CASE WHEN t.status <> 'queued' THEN NULL
    WHEN t.owner IS NULL THEN (SELECT count(*) FROM jobs q WHERE q.status = 'queued' AND q.owner IS NULL AND {_BEFORE})
    ELSE (SELECT count(*) FROM jobs q WHERE q.status = 'queued' AND q.owner = t.owner AND {_BEFORE}) END"""
POSITION = """(SELECT count(*) FROM jobs q WHERE q.status = 'queued' AND q.priority_rank < j.priority_rank)
       + j.ahead + CASE WHEN j.ahead > 0 THEN (
           SELECT COALESCE(sum(CASE WHEN o.queued < j.ahead THEN o.queued ELSE j.ahead END), 0) FROM (
               SELECT count(*) AS queued FROM jobs q WHERE q.status = 'queued' AND q.priority_rank = j.priority_rank
                   AND COALESCE(q.owner, '') <> COALESCE(j.owner, '') GROUP BY q.owner) o) ELSE 0 END"""


def pick(raw: Any, claimable: str, params: list[Any], expired: str, expired_params: list[Any]) -> str | None:
    """The id of the job a claim takes (locked on PostgreSQL until the transaction ends), or None.

    ``claimable`` is the SQL condition on ``q`` (with ``?`` placeholders for ``params``) that a queued job must
    meet for this worker (not cancelled, not timed out, of its models and kinds); ``expired`` (with
    ``expired_params``) the one a running job whose worker died must meet to be taken again."""
    lock = " FOR UPDATE SKIP LOCKED" if raw.postgres else ""
    turns = raw.execute(_TURNS_SQL.format(claimable=claimable), [*params, *params]).fetchall()
    best_rank = turns[0][1] if turns else 32767
    row = raw.execute(_EXPIRED_SQL.format(expired=expired, lock=lock), [*expired_params, best_rank]).fetchone()
    if row is not None:
        return row[0]
    for owner, _rank in turns:
        where = "q.owner IS NULL" if owner is None else "q.owner = ?"
        row = raw.execute(_NEXT_OF_OWNER_SQL.format(owner=where, claimable=claimable, lock=lock),
                          [*([] if owner is None else [owner]), *params]).fetchone()
        if row is not None:  # None: another claimer holds or took every job of this key the claim may take
            return row[0]
    return None
