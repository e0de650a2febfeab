"""Stats from the job store on SQLite and PostgreSQL: jobs with set timestamps give exact p50 / p95 generation
time, queue wait and time to first byte, success rates, throughput, per endpoint, model and dialect, per key;
the worker's first progress event is recorded on the job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, inspect, text, update

pytest_plugins = ["db_fixtures"]

from fluxserve.jobs.models import jobs
from fluxserve.jobs.stats import percentile, window_stats
from fluxserve.jobs.store import JobStore, utcnow

FLASH = "fal-ai/flux-2/flash"
DEV = "fal-ai/flux-2"
S = timedelta(seconds=1)


def finished(store: JobStore, now, *, endpoint=FLASH, dialect="fal", model="klein-4b", status="completed",
             queue=0.5, generation=1.0, first_progress=None, age=timedelta(minutes=10), owner=None,
             caller=None) -> str:
    """A job that ended with the given durations (seconds); ``generation`` None: it never started."""
    job = store.submit(endpoint=endpoint, dialect=dialect, request={"model": model, "prompt": "p"}, owner=owner,
                       caller=caller)
    created = now - age
    started = created + queue * S if generation is not None else None
    values = {"status": status, "model": model, "created_at": created, "started_at": started,
              "completed_at": (started + generation * S) if started else created + queue * S,
              "first_progress_at": created + first_progress * S if first_progress is not None else None}
    with store.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(**values))
    return job.id


def by_key(rows):
    return {row["key"]: row for row in rows}


def test_percentile_interpolates_like_percentile_cont():
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    assert percentile([0.5, 1.5], 0.5) == 1.0


def test_figures_per_endpoint_with_exact_percentiles(store):
    now = utcnow().replace(microsecond=0)
    for i in range(1, 6):  # queued calls: 1-5 s on the worker, 0.1-0.5 s in the queue, first progress 0.2-1.0 s
        finished(store, now, queue=i / 10, generation=float(i), first_progress=i / 5)
    finished(store, now, status="failed", queue=0.2, generation=0.3, first_progress=0.4)
    finished(store, now, status="cancelled", queue=2.0, generation=None)  # cancelled while queued
    finished(store, now, age=timedelta(hours=2), generation=100.0)  # outside the hour
    store.submit(endpoint=FLASH, dialect="fal", request={"model": "klein-4b", "prompt": "still queued"})
    # synchronous calls: the first byte is the response
    finished(store, now, endpoint=DEV, dialect="openai", model="dev", queue=1.0, generation=0.5)
    finished(store, now, endpoint=DEV, dialect="fal", model="dev", queue=0.0, generation=1.5, caller="proc-1",
             first_progress=0.1)

    rows = window_stats(store, "1h", "endpoint", now=now)
    assert [row["key"] for row in rows] == [DEV, FLASH]  # fastest p50 generation first
    flash, dev = by_key(rows)[FLASH], by_key(rows)[DEV]
    assert (flash["jobs"], flash["completed"], flash["failed"], flash["cancelled"]) == (7, 5, 1, 1)
    assert flash["success_rate"] == pytest.approx(5 / 6, abs=1e-4)
    assert flash["generation_ms"] == {"p50": 3000.0, "p95": 4800.0}
    assert flash["queue_wait_ms"] == {"p50": 250.0, "p95": 475.0}  # 0.1-0.5 s and the failed job's 0.2 s
    assert flash["ttfb_ms"] == {"p50": 500.0, "p95": 950.0}  # 0.2-1.0 s and the failed job's 0.4 s
    assert flash["throughput_per_min"] == pytest.approx(5 / 60, abs=1e-4)
    assert dev["generation_ms"] == {"p50": 1000.0, "p95": 1450.0}
    assert dev["ttfb_ms"] == {"p50": 1500.0, "p95": 1500.0}  # submit to response: 1.0 + 0.5 and 0.0 + 1.5
    assert dev["success_rate"] == 1.0

    day = by_key(window_stats(store, "24h", "endpoint", now=now))[FLASH]
    assert day["completed"] == 6 and day["generation_ms"]["p50"] == 3500.0
    assert day["throughput_per_min"] == pytest.approx(6 / (24 * 60), abs=1e-4)

    dialects = by_key(window_stats(store, "1h", "dialect", now=now))
    assert set(dialects) == {"fal", "openai"} and dialects["fal"]["completed"] == 6
    assert dialects["openai"]["generation_ms"] == {"p50": 500.0, "p95": 500.0}
    models = by_key(window_stats(store, "30d", "model", now=now))
    assert set(models) == {"klein-4b", "dev"} and models["klein-4b"]["completed"] == 6


def test_a_key_sees_its_own_jobs(store):
    now = utcnow().replace(microsecond=0)
    finished(store, now, owner="key_alice", generation=2.0)
    finished(store, now, owner="key_bob", generation=4.0, status="failed")
    alice = window_stats(store, "1h", "endpoint", owner="key_alice", now=now)
    assert len(alice) == 1 and alice[0]["jobs"] == 1 and alice[0]["success_rate"] == 1.0
    assert alice[0]["generation_ms"] == {"p50": 2000.0, "p95": 2000.0}
    everyone = window_stats(store, "1h", "endpoint", now=now)
    assert everyone[0]["jobs"] == 2 and everyone[0]["success_rate"] == 0.5
    assert window_stats(store, "1h", "endpoint", owner="key_carol", now=now) == []


def test_a_group_without_completed_jobs_has_no_generation_time(store):
    now = utcnow()
    finished(store, now, status="failed", generation=None)
    [row] = window_stats(store, "24h", "dialect", now=now)
    assert row["success_rate"] == 0.0 and row["generation_ms"] is None and row["ttfb_ms"] is None
    assert row["throughput_per_min"] == 0.0


def test_bad_window_or_grouping_is_refused(store):
    with pytest.raises(ValueError, match="window"):
        window_stats(store, "7d", "endpoint")
    with pytest.raises(ValueError, match="group_by"):
        window_stats(store, "1h", "owner")


def test_first_progress_event_is_recorded_once(store):
    job = store.submit(endpoint=FLASH, dialect="fal", request={"model": "klein-4b", "prompt": "p"})
    store.claim("w")
    assert store.get(job.id).first_progress_at is None
    store.heartbeat(job.id, "w")  # a heartbeat alone is no progress event
    assert store.get(job.id).first_progress_at is None
    first = utcnow() - timedelta(seconds=3)
    store.report(job.id, "w", 1, 4, [{"message": "step 1/4", "timestamp": first},
                                     {"message": "step 2/4", "timestamp": first + S}])
    store.progress(job.id, "w", 3, 4, "step 3/4")
    done = store.complete(job.id, "w", {"images": []}, lines=[{"message": "step 4/4", "timestamp": utcnow()}])
    assert abs((done.first_progress_at - first).total_seconds()) < 0.001

    # a job faster than one heartbeat: its progress lines arrive with its result
    quick = store.submit(endpoint=FLASH, dialect="fal", request={"model": "klein-4b", "prompt": "p"})
    store.claim("w")
    stamp = utcnow() - timedelta(seconds=1)
    done = store.complete(quick.id, "w", {"images": []}, lines=[{"message": "step 1/1", "timestamp": stamp}])
    assert abs((done.first_progress_at - stamp).total_seconds()) < 0.001

    # an error line at the end is not progress
    failing = store.submit(endpoint=FLASH, dialect="fal", request={"model": "klein-4b", "prompt": "p"})
    store.claim("w")
    assert store.fail(failing.id, "boom", worker_id="w", lines=[{"message": "boom", "level": "ERROR"}]) \
        .first_progress_at is None


def test_first_progress_column_is_added_to_an_older_database(db_url):
    JobStore(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN first_progress_at"))
    store = JobStore(db_url)
    try:
        assert "first_progress_at" in {c["name"] for c in inspect(engine).get_columns("jobs")}
        job = store.submit(endpoint=FLASH, dialect="fal", request={})
        assert store.get(job.id).first_progress_at is None
    finally:
        store.close()
    engine.dispose()


def test_figures_per_provider_count_every_call_to_an_upstream(store):
    now = utcnow().replace(microsecond=0)
    for i in (1, 2, 3):  # three requests served on this server's GPUs
        finished(store, now, endpoint=DEV, model="dev", generation=float(i), first_progress=0.5)
    upstream_job = store.submit(endpoint="fal-ai/flux-2-pro", dialect="fal", request={"model": "dev", "prompt": "p"})
    start = now - timedelta(minutes=5)
    for seconds, answered, outcome in ((10.0, 9.0, "served"), (20.0, 18.0, "served"), (30.0, 28.0, "served"),
                                       (5.0, None, "failed"), (1.0, None, "refused"), (2.0, None, "cancelled")):
        store.record_upstream_call(upstream_job.id, None, "fal-ai/flux-2-pro", "fal", "fal-ai/flux-2-pro", start,
                                   start + answered * S if answered else None, start + seconds * S, outcome,
                                   None if outcome == "served" else "went wrong")
    store.record_upstream_call(upstream_job.id, None, "fal-ai/flux-2-pro", "replicate",
                               "black-forest-labs/flux-2-pro", start, start + 4 * S, start + 6 * S, "served")
    store.record_upstream_call(upstream_job.id, None, "fal-ai/flux-2-pro", "fal", "fal-ai/flux-2-pro",
                               now - timedelta(hours=3), None, now - timedelta(hours=3), "failed")  # outside

    rows = window_stats(store, "1h", "provider", now=now)
    assert [row["key"] for row in rows] == ["local", "replicate", "fal"]  # fastest p50 generation first
    local, fal, replicate = (by_key(rows)[key] for key in ("local", "fal", "replicate"))
    assert (local["jobs"], local["completed"]) == (3, 3) and local["generation_ms"]["p50"] == 2000.0
    assert (fal["jobs"], fal["completed"], fal["failed"], fal["cancelled"]) == (6, 3, 1, 1)
    assert fal["success_rate"] == 0.75  # the refused (4xx) and the cancelled call count for neither
    assert fal["generation_ms"] == {"p50": 20000.0, "p95": 29000.0}
    assert fal["ttfb_ms"] == {"p50": 18000.0, "p95": 27000.0} and fal["queue_wait_ms"] is None
    assert replicate["generation_ms"]["p50"] == 6000.0 and replicate["ttfb_ms"]["p50"] == 4000.0
