"""The job store on SQLite and PostgreSQL: submit, claim, leases, priorities, timeouts, cancel, wait, keys."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

pytest_plugins = ["db_fixtures"]

from fluxserve.jobs.store import JobStore, normalize_db_url, utcnow

REQUEST = {"model": "dev", "prompt": "a lighthouse", "steps": 2}


def submit(store: JobStore, **kwargs):
    kwargs.setdefault("endpoint", "fal-ai/flux-2")
    kwargs.setdefault("dialect", "fal")
    kwargs.setdefault("request", REQUEST)
    return store.submit(**kwargs)


def test_submit_and_get_round_trip(store):
    job = submit(store, input={"prompt": "a lighthouse"}, priority="low", timeout_s=60,
                 webhook={"url": "http://127.0.0.1:1/hook", "dialect": "fal"}, store_io=False)
    got = store.get(job.id)
    assert got.status == "queued"
    assert got.endpoint == "fal-ai/flux-2" and got.dialect == "fal" and got.model == "dev"
    assert got.request == REQUEST and got.input == {"prompt": "a lighthouse"}
    assert got.priority == "low" and got.store_io is False
    assert got.webhook == {"url": "http://127.0.0.1:1/hook", "dialect": "fal"}
    assert got.created_at.tzinfo is not None
    assert 59 < (got.timeout_at - got.created_at).total_seconds() <= 60
    assert got.attempts == 0 and got.cancel_requested is False and got.result is None
    assert store.get("no-such-job") is None


def test_submit_with_an_existing_id_returns_the_existing_job(store):
    first = submit(store, job_id="fixed-id")
    again = submit(store, job_id="fixed-id", request={"model": "klein-4b", "prompt": "other"})
    assert again.id == first.id and again.request == REQUEST
    assert len(store.list()) == 1


def test_bad_priority_is_rejected(store):
    try:
        submit(store, priority="urgent")
    except ValueError as e:
        assert "priority" in str(e)
    else:
        raise AssertionError("priority 'urgent' was accepted")


def test_priority_then_age_decides_order_and_queue_position(store):
    low = submit(store, priority="low")
    first = submit(store)
    second = submit(store)
    assert [store.queue_position(j.id) for j in (first, second, low)] == [0, 1, 2]
    assert store.claim("w").id == first.id
    assert store.queue_position(first.id) is None  # running
    assert store.queue_position(second.id) == 0 and store.queue_position(low.id) == 1
    assert store.claim("w").id == second.id
    assert store.claim("w").id == low.id
    assert store.claim("w") is None


def test_claim_filters_by_model(store):
    klein = submit(store, request={"model": "klein-4b", "prompt": "x"})
    assert store.claim("w", models=["dev"]) is None
    assert store.claim("w", models=["klein-4b", "dev"]).id == klein.id


def test_claim_records_the_worker_and_lease(store):
    job = submit(store)
    claimed = store.claim("worker-a", lease_s=30)
    assert claimed.id == job.id and claimed.status == "running" and claimed.worker_id == "worker-a"
    assert claimed.attempts == 1 and claimed.started_at is not None
    assert 25 < (claimed.lease_expires_at - utcnow()).total_seconds() <= 30


def _claim_all(stores: list[JobStore], total: int) -> list[str]:
    """Claim and complete jobs from several threads (one store each, or shared) until none are left."""
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(store: JobStore, name: str) -> None:
        try:
            while True:
                job = store.claim(name, lease_s=30)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)
                assert store.heartbeat(job.id, name, 1, 1)
                assert store.complete(job.id, name, {"images": []})
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return claimed


def test_concurrent_claims_never_hand_out_a_job_twice(store, db_url):
    ids = {submit(store).id for _ in range(40)}
    others = [JobStore(db_url) for _ in range(3)]  # separate connection pools, as separate processes would
    try:
        claimed = _claim_all([store, store, *others], len(ids))
    finally:
        for other in others:
            other.close()
    assert sorted(claimed) == sorted(ids)
    assert {j.status for j in store.list(limit=100)} == {"completed"}
    assert all(j.attempts == 1 for j in store.list(limit=100))


def test_an_expired_lease_is_claimed_again(store):
    job = submit(store)
    assert store.claim("dead-worker", lease_s=0.2).id == job.id
    assert store.claim("w2") is None  # lease still valid
    time.sleep(0.35)
    again = store.claim("w2", lease_s=30)
    assert again.id == job.id and again.worker_id == "w2" and again.attempts == 2
    assert store.heartbeat(job.id, "dead-worker") is False  # the old worker lost it
    assert store.complete(job.id, "dead-worker", {"images": []}) is None
    assert store.complete(job.id, "w2", {"images": []}).status == "completed"
    assert any("stopped responding" in line.message for line in store.logs(job.id))
    assert store.get(job.id).status == "completed"


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(db_url):
    store = JobStore(db_url, max_attempts=2)
    try:
        job = submit(store)
        for _ in range(2):
            assert store.claim("dying", lease_s=0.1).id == job.id
            time.sleep(0.2)
        assert store.claim("w") is None
        failed = store.get(job.id)
        assert failed.status == "failed" and failed.error_type == "internal_error"
        assert "stopped responding 2 times" in failed.error
    finally:
        store.close()


def test_heartbeat_extends_the_lease(store):
    job = submit(store)
    store.claim("w", lease_s=0.5)
    for _ in range(4):
        time.sleep(0.2)
        assert store.heartbeat(job.id, "w", step=1, total=4)
    assert store.claim("other") is None
    got = store.get(job.id)
    assert got.step == 1 and got.total_steps == 4 and got.worker_id == "w"


def test_a_queued_job_past_its_timeout_fails_instead_of_running(store):
    job = submit(store, timeout_s=0.2)
    time.sleep(0.3)
    got = store.get(job.id)
    assert got.status == "failed"
    assert got.error == "Request timed out" and got.error_type == "request_timeout"
    assert store.claim("w") is None


def test_cancel_a_queued_job(store):
    job = submit(store)
    assert store.request_cancel(job.id) == "CANCELLATION_REQUESTED"
    assert store.get(job.id).status == "cancelled"
    assert store.claim("w") is None
    assert store.request_cancel(job.id) == "ALREADY_COMPLETED"
    assert store.request_cancel("missing") == "NOT_FOUND"


def test_cancel_a_running_job_is_seen_by_its_worker_in_another_process(store, db_url):
    job = submit(store)
    worker_store = JobStore(db_url)
    try:
        assert worker_store.claim("w").id == job.id
        assert worker_store.heartbeat(job.id, "w") is True
        assert store.request_cancel(job.id) == "CANCELLATION_REQUESTED"
        assert store.get(job.id).cancel_requested is True
        assert store.get(job.id).status == "running"
        assert worker_store.heartbeat(job.id, "w") is False
        assert worker_store.fail(job.id, "Request was cancelled", "cancelled", status="cancelled", worker_id="w")
        assert store.get(job.id).status == "cancelled"
        assert store.request_cancel(job.id) == "ALREADY_COMPLETED"
    finally:
        worker_store.close()


def test_a_cancelled_job_whose_worker_died_ends_cancelled_not_rerun(store):
    job = submit(store)
    store.claim("dying", lease_s=0.1)
    store.request_cancel(job.id)
    time.sleep(0.2)
    assert store.claim("w") is None
    assert store.get(job.id).status == "cancelled"


def test_complete_and_fail_are_final(store):
    job = submit(store)
    store.claim("w")
    result = {"images": [{"key": "outputs/x.png", "width": 8, "height": 8}], "seed": 1}
    assert store.complete(job.id, "w", result)
    got = store.get(job.id)
    assert got.status == "completed" and got.result == result and got.completed_at is not None
    assert store.fail(job.id, "late") is None
    assert store.get(job.id).status == "completed"


def test_logs_and_changes_after_a_sequence_number(store):
    job = submit(store)
    store.claim("w")
    assert store.progress(job.id, "w", 1, 2, "step 1/2")
    store.log(job.id, "a preview", preview_key="previews/p.png")
    lines = store.logs(job.id)
    assert [line.message for line in lines] == ["step 1/2", "a preview"]
    assert lines[1].preview_key == "previews/p.png" and lines[0].level == "INFO"
    assert lines[0].seq < lines[1].seq
    current, new = store.changes(job.id, lines[0].seq)
    assert current.step == 1 and current.total_steps == 2
    assert [line.message for line in new] == ["a preview"]
    assert store.logs(job.id, after=lines[1].seq) == []


def test_wait_returns_when_the_job_finishes_in_this_process(store):
    job = submit(store)
    store.claim("w")
    timer = threading.Timer(0.3, lambda: store.complete(job.id, "w", {"images": []}))
    timer.start()
    assert store.wait(job.id, timeout=30).status == "completed"
    assert store.wait(job.id, timeout=0).status == "completed"


def test_wait_sees_changes_made_by_another_process(store, db_url):
    job = submit(store)
    other = JobStore(db_url)
    try:
        other.claim("w")
        timer = threading.Timer(0.3, lambda: other.complete(job.id, "w", {"images": []}))
        timer.start()
        assert store.wait(job.id, timeout=30).status == "completed"
    finally:
        other.close()


def test_wait_times_out_with_the_current_state(store):
    job = submit(store)
    assert store.wait(job.id, timeout=0.2).status == "queued"
    assert store.wait("missing", timeout=0.1) is None


def test_wait_for_work_wakes_on_submit(store):
    version = store.work_version()
    threading.Timer(0.2, lambda: submit(store)).start()
    assert store.wait_for_work(version, timeout=30) is True
    assert store.wait_for_work(store.work_version(), timeout=0.05) is False


def test_forget_io_drops_bodies(store):
    job = submit(store, input={"prompt": "secret"})
    store.claim("w")
    store.complete(job.id, "w", {"images": [], "prompt": "secret"})
    store.forget_io(job.id)
    got = store.get(job.id)
    assert got.request == {} and got.input is None and got.result is None
    assert got.status == "completed"


def test_list_newest_first_with_filters(store):
    a = submit(store, dialect="fal")
    time.sleep(0.01)
    b = submit(store, dialect="openai")
    time.sleep(0.01)
    c = submit(store, dialect="fal")
    assert [j.id for j in store.list()] == [c.id, b.id, a.id]
    assert [j.id for j in store.list(dialect="fal")] == [c.id, a.id]
    assert [j.id for j in store.list(limit=1)] == [c.id]
    assert [j.id for j in store.list(before=c.created_at)] == [b.id, a.id]
    assert store.counts()["queued"] == 3


def test_list_filters_combine_and_page(store):
    def finished(prompt, dialect, endpoint, status):
        job = submit(store, dialect=dialect, endpoint=endpoint, request={"model": "dev", "prompt": prompt})
        time.sleep(0.01)
        if status == "cancelled":
            store.request_cancel(job.id)
        elif status != "queued":
            assert store.claim("w").id == job.id
            if status == "completed":
                store.complete(job.id, "w", {"images": []})
            elif status == "failed":
                store.fail(job.id, "boom")
        return job.id

    red = finished("A Red Fox", "fal", "fal-ai/flux-2/flash", "completed")
    percent = finished("100% red_ish", "openai", "fal-ai/flux-2", "failed")
    blue = finished("a blue fox", "replicate", "fal-ai/flux-2/flash", "cancelled")
    waiting = finished("red queued fox", "fal", "fal-ai/flux-2", "queued")
    ids = lambda **kw: [j.id for j in store.list(**kw)]
    assert ids(prompt_contains="RED") == [waiting, percent, red]  # case-insensitive, anywhere in the prompt
    assert ids(prompt_contains="fox", status="completed") == [red]
    assert ids(prompt_contains="fox", dialect="replicate") == [blue]
    assert ids(prompt_contains="fox", endpoint="fal-ai/flux-2") == [waiting]
    assert ids(status="failed") == [percent] and ids(status="cancelled") == [blue]
    assert ids(prompt_contains="0%") == [percent]  # % and _ are literal characters, not wildcards
    assert ids(prompt_contains="d_i") == [percent] and ids(prompt_contains="%x") == []
    first = store.list(prompt_contains="fox", limit=1)
    assert [j.id for j in first] == [waiting]
    assert ids(prompt_contains="fox", limit=1, before=first[0].created_at) == [blue]


def test_delete_job_removes_a_finished_job_only(store):
    done = submit(store)
    store.claim("w")
    store.progress(done.id, "w", 1, 2, "step 1/2", preview_key="previews/p.png")
    store.complete(done.id, "w", {"images": [{"key": "outputs/a.png"}]})
    running = submit(store)
    store.claim("w")
    assert store.job_files(done.id) == ["outputs/a.png", "previews/p.png"]
    assert store.status(done.id, max_age_s=60).status == "completed"  # cached
    assert store.delete_job(running.id) == "ACTIVE" and store.get(running.id).status == "running"
    assert store.delete_job(done.id) == "DELETED"
    assert store.get(done.id) is None and store.logs(done.id) == [] and store.status(done.id, max_age_s=60) is None
    assert store.delete_job(done.id) == "NOT_FOUND"


def test_a_job_survives_a_restart(db_url):
    first = JobStore(db_url)
    job = submit(first, input={"prompt": "durable"})
    first.close()
    second = JobStore(db_url)
    try:
        claimed = second.claim("new-worker")
        assert claimed.id == job.id and claimed.input == {"prompt": "durable"}
        assert second.complete(job.id, "new-worker", {"images": []})
    finally:
        second.close()


def test_a_terminal_job_with_a_webhook_queues_one_delivery(store):
    hooked = submit(store, webhook={"url": "http://127.0.0.1:9/hook", "dialect": "fal"})
    plain = submit(store)
    for _ in range(2):
        job = store.claim("w")
        store.complete(job.id, "w", {"images": []})
    delivery = store.delivery(hooked.id)
    assert delivery["status"] == "pending" and delivery["dialect"] == "fal" and delivery["attempts"] == 0
    assert store.delivery(plain.id) is None


def test_cancelling_a_queued_job_queues_its_webhook(store):
    job = submit(store, webhook={"url": "http://127.0.0.1:9/hook", "dialect": "fal"})
    store.request_cancel(job.id)
    assert store.delivery(job.id)["status"] == "pending"


def test_api_keys(store):
    assert store.has_keys() is False
    key_id, secret = store.create_key("ci")
    assert secret.startswith(key_id + ":")
    assert store.verify_key(secret) is True
    assert store.verify_key(secret + "x") is False and store.verify_key("") is False
    [key] = store.list_keys()
    assert key.id == key_id and key.name == "ci" and key.active and key.last_used_at is not None
    assert store.has_keys() is True
    assert store.revoke_key(key_id) is True
    assert store.revoke_key(key_id) is False
    assert store.verify_key(secret) is False
    assert store.has_keys() is False


def test_delete_before_removes_old_terminal_jobs(store):
    done = submit(store)
    store.claim("w")
    store.complete(done.id, "w", {"images": []})
    store.log(done.id, "line")
    queued = submit(store)
    assert store.delete_before(utcnow() + timedelta(seconds=1)) == 1
    assert store.get(done.id) is None and store.logs(done.id) == []
    assert store.get(queued.id) is not None


def test_database_urls_are_normalised():
    assert normalize_db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_uses_wal_and_creates_its_directory(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'new' / 'dir' / 'jobs.db'}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        store.close()
    assert (tmp_path / "new" / "dir" / "jobs.db").exists()


def test_columns_added_later_are_added_to_an_older_database(db_url, monkeypatch):
    """A database made before a column existed gets it at start (``models.ADDED_COLUMNS``)."""
    from sqlalchemy import Column, Integer, String, create_engine, inspect

    from fluxserve.jobs import models
    from fluxserve.jobs import store as store_module

    url = db_url
    JobStore(url).close()  # today's schema
    extra = [Column("test_added", String(32), nullable=True), Column("test_counted", Integer, nullable=False,
                                                                      server_default="0")]
    for column in extra:
        models.api_keys.append_column(column)
    monkeypatch.setattr(store_module, "ADDED_COLUMNS", [("api_keys", "test_added"), ("api_keys", "test_counted")])
    try:
        reopened = JobStore(url)
        _, secret = reopened.create_key("old")
        assert reopened.verify_key(secret)
        reopened.close()
        columns = {c["name"]: c for c in inspect(create_engine(url)).get_columns("api_keys")}
        assert "test_added" in columns and "test_counted" in columns
        JobStore(url).close()  # a second start finds them present
    finally:
        for column in extra:
            models.api_keys._columns.remove(column)


def test_indexes_added_later_are_made_in_an_older_database(db_url):
    """A database made before an index was declared gets it at start; a second start finds it present."""
    from sqlalchemy import create_engine, inspect, text

    JobStore(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_jobs_owner_created"))
    assert "ix_jobs_owner_created" not in {i["name"] for i in inspect(engine).get_indexes("jobs")}
    JobStore(db_url).close()
    JobStore(db_url).close()
    assert "ix_jobs_owner_created" in {i["name"] for i in inspect(engine).get_indexes("jobs")}
    engine.dispose()
