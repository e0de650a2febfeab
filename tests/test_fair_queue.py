"""Fair scheduling between API keys, on SQLite and PostgreSQL: a claim takes the next job of the key served least
recently (round robin), each key's own jobs in order; priorities, model and kind filters and requeued jobs as
before; concurrent claimers (threads and processes) never take one job twice."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter

pytest_plugins = ["db_fixtures"]

from fluxserve.jobs.store import JobStore

REQUEST = {"model": "dev", "prompt": "a lighthouse", "steps": 2}


def submit(store: JobStore, owner: str | None, **kwargs):
    kwargs.setdefault("request", REQUEST)
    return store.submit(endpoint="fal-ai/flux-2", dialect="fal", owner=owner, **kwargs)


def finish(store: JobStore, job) -> None:
    assert store.complete(job.id, job.worker_id, {"images": []}) is not None


def test_a_small_keys_job_starts_before_a_big_keys_backlog_drains(store):
    a, b = store.create_key("big")[0], store.create_key("small")[0]
    backlog = [submit(store, a) for _ in range(30)]
    first = store.claim("w")  # A's first job is running when B submits
    assert first.id == backlog[0].id
    small = submit(store, b)
    assert store.queue_position(small.id) == 0
    assert store.queue_position(backlog[5].id) == 4 + 1  # A's four before it, and B's one
    finish(store, first)
    following = [store.claim("w") for _ in range(2)]
    assert small.id in [job.id for job in following]
    rest = []
    while (job := store.claim("w")) is not None:
        rest.append(job.id)
    assert [job.id for job in following if job.id != small.id] + rest == [job.id for job in backlog[1:]]


def test_keys_take_turns_and_each_keys_jobs_keep_their_order(store):
    jobs = {owner: [submit(store, owner) for _ in range(count)] for owner, count in (("A", 5), ("B", 4), ("C", 2))}
    positions = {owner: [store.queue_position(job.id) for job in submitted] for owner, submitted in jobs.items()}
    assert positions == {"A": [0, 3, 6, 8, 10], "B": [0, 3, 6, 8], "C": [0, 3]}  # low by the turns of a round
    order = []
    while (job := store.claim("w")) is not None:
        order.append(job)
    assert "".join(job.owner for job in order) == "ABCABCABABA"
    for owner, submitted in jobs.items():
        assert [job.id for job in order if job.owner == owner] == [job.id for job in submitted]


def test_the_key_that_waited_longest_goes_first(store):
    """Round robin by the last start: a key whose job started most recently waits for the others' turns."""
    first, second = submit(store, "A"), submit(store, "B")
    for job in (first, second):
        claimed = store.claim("w")
        assert claimed.id == job.id
        finish(store, claimed)
    b, a = submit(store, "B"), submit(store, "A")  # B submits first, but A was served longer ago
    assert [store.claim("w").id for _ in range(2)] == [a.id, b.id]


def test_without_keys_the_queue_is_first_in_first_out(store):
    submitted = [submit(store, None) for _ in range(5)]
    claimed = [store.claim("w").id for _ in range(5)]
    assert claimed == [job.id for job in submitted]


def test_priority_goes_before_fairness(store):
    low = submit(store, "B", priority="low")
    normal = [submit(store, "A") for _ in range(3)]
    other_low = submit(store, "C", priority="low")
    claimed = [store.claim("w").id for _ in range(5)]
    assert claimed == [job.id for job in normal] + [low.id, other_low.id]


def test_fairness_among_the_jobs_a_worker_may_take(store):
    """A worker for one model alternates between the keys that have jobs for it; other models' jobs wait."""
    klein = {"model": "klein-4b", "prompt": "x"}
    a = [submit(store, "A") for _ in range(3)]
    a_klein = [submit(store, "A", request=klein) for _ in range(2)]
    b_klein = [submit(store, "B", request=klein) for _ in range(2)]
    claimed = [store.claim("w", models=["klein-4b"]).id for _ in range(4)]
    assert claimed == [a_klein[0].id, b_klein[0].id, a_klein[1].id, b_klein[1].id]
    assert store.claim("w", models=["klein-4b"]) is None
    assert [store.claim("w", models=["dev"]).id for _ in range(3)] == [job.id for job in a]


def test_a_job_given_back_stays_its_keys_next_job(store):
    """A released job started once (its key was served), so the other key goes first; then it runs again
    before its key's later jobs."""
    a = [submit(store, "A") for _ in range(3)]
    b = submit(store, "B")
    running = store.claim("w")
    assert running.id == a[0].id
    assert store.release(running.id, "w")
    assert [store.claim("w").id for _ in range(4)] == [b.id, a[0].id, a[1].id, a[2].id]


def test_an_expired_lease_is_taken_again_before_new_work(store):
    import time

    dead = submit(store, "A")
    assert store.claim("dying", lease_s=0.1).id == dead.id
    fresh = submit(store, "B")
    time.sleep(0.3)
    again = store.claim("w")
    assert again.id == dead.id and again.attempts == 2
    assert store.claim("w").id == fresh.id


def _claim_until_empty(stores: list[JobStore]) -> list[str]:
    """Claim and complete jobs from one thread per store until none are left; every claimed id."""
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(store: JobStore, name: str) -> None:
        try:
            for _ in range(1000):  # bounded: more than the jobs submitted
                job = store.claim(name, lease_s=60)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)
                assert store.complete(job.id, name, {"images": []}) is not None
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return claimed


def test_concurrent_claimers_in_threads_never_take_a_job_twice(store, db_url):
    ids = {submit(store, owner).id for owner in ("A",) * 30 + ("B", "C") * 5 + (None,) * 5}
    others = [JobStore(db_url) for _ in range(3)]  # separate connections, as separate processes have
    try:
        claimed = _claim_until_empty([store, store, *others])
    finally:
        for other in others:
            other.close()
    assert sorted(claimed) == sorted(ids)
    jobs = store.list(limit=100)
    assert {job.status for job in jobs} == {"completed"} and all(job.attempts == 1 for job in jobs)


def _claim_in_process(url: str, name: str, results) -> None:
    store = JobStore(url)
    try:
        claimed = []
        for _ in range(1000):
            job = store.claim(name, lease_s=60)
            if job is None:
                break
            claimed.append(job.id)
            store.complete(job.id, name, {"images": []})
        results.put(claimed)
    finally:
        store.close()


def test_concurrent_claimers_in_processes_never_take_a_job_twice(store, db_url):
    ids = {submit(store, owner).id for owner in ("A",) * 40 + ("B",) * 10 + ("C",) * 10}
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_claim_in_process, args=(db_url, f"p{n}", results)) for n in range(4)]
    for proc in procs:
        proc.start()
    claimed = [job_id for _ in procs for job_id in results.get(timeout=120)]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert Counter(claimed).most_common(1)[0][1] == 1
    assert sorted(claimed) == sorted(ids)
    assert all(job.attempts == 1 and job.status == "completed" for job in store.list(limit=100))


def _fill_backlog(store: JobStore, queued_a: int, history_a: int) -> None:
    """``queued_a`` queued jobs of key A, three each of B and C, and ``history_a`` finished jobs of A (bulk)."""
    from datetime import timedelta

    from fluxserve.jobs.store import db_time, utcnow

    postgres = not store.is_sqlite
    now = utcnow()
    rows = [(f"a-{n:06d}", "A", "queued", now + timedelta(microseconds=n), None) for n in range(queued_a)]
    rows += [(f"{o}-{n}", o, "queued", now + timedelta(seconds=1, microseconds=n), None) for o in "BC" for n in range(3)]
    rows += [(f"old-{n:06d}", "A", "completed", now - timedelta(days=1, microseconds=n),
              now - timedelta(days=1, microseconds=n)) for n in range(history_a)]
    with store._raw_write() as raw:
        raw.executemany(
            "INSERT INTO jobs (id, endpoint, dialect, model, status, priority, priority_rank, created_at, updated_at, "
            "started_at, attempts, cancel_requested, store_io, owner, kind) VALUES "
            "(?, 'fal-ai/flux-2', 'fal', 'dev', ?, 'normal', 0, ?, ?, ?, 0, ?, ?, ?, 'generate')",
            [(job_id, status, db_time(at, postgres), db_time(at, postgres), db_time(started, postgres), False, True,
              owner) for job_id, owner, status, at, started in rows])
    if postgres:  # the planner's statistics, as autovacuum keeps them
        store._postgres_connection().execute("VACUUM ANALYZE jobs")


def test_a_claim_reads_indexes_not_the_backlog(store, monkeypatch):
    """With 10,000 queued jobs of one key and a few of others, no statement of a claim reads the jobs table
    through (on PostgreSQL ``EXPLAIN``: no Seq Scan; on SQLite ``EXPLAIN QUERY PLAN``: no SCAN of a jobs alias),
    and the claim takes the other keys' jobs first."""
    import re
    import time

    from fluxserve.jobs import store as store_module

    _fill_backlog(store, 10_000, 10_000)
    statements: list[tuple[str, tuple]] = []
    execute, query = store_module._Raw.execute, store._raw_query

    def recorded_execute(raw, sql, params=()):
        statements.append((sql, tuple(params)))
        return execute(raw, sql, params)

    def recorded_query(sqlite_sql, postgres_sql, params):
        statements.append((sqlite_sql, tuple(params)))
        return query(sqlite_sql, postgres_sql, params)

    monkeypatch.setattr(store_module._Raw, "execute", recorded_execute)
    monkeypatch.setattr(store, "_raw_query", recorded_query)
    store._last_sweep = time.monotonic()  # the periodic sweep is not the claim
    owners = [store.claim("w").owner for _ in range(3)]
    monkeypatch.undo()
    assert sorted(owners[:2]) == ["B", "C"] and owners[2] == "A"

    claim_statements = statements[: len(statements) // 3]
    assert any("WITH RECURSIVE" in sql for sql, _ in claim_statements)
    for sql, params in claim_statements:
        if store.is_sqlite:
            plan = [row[3] for row in store._thread_connection().execute("EXPLAIN QUERY PLAN " + sql, params)]
            full_scans = [step for step in plan if re.match(r"SCAN (jobs|[a-z])\b", step) and
                          not re.match(r"SCAN (o|h|turns|CONSTANT ROW)\b", step)]
        else:
            plan = [row[0] for row in store._postgres_connection().execute(
                "EXPLAIN " + sql.replace("?", "%s"), params)]
            full_scans = [step for step in plan if "Seq Scan" in step]
        assert not full_scans, (sql, plan)
