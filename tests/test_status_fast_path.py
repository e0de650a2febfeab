"""The cheap status read (``JobStore.status``) on SQLite and PostgreSQL, and the fal status fast path
(``api.fal.StatusFastPath``): what it answers itself, what it leaves to the route, and that both agree."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fal_helpers import Server, settings_for

from fluxserve.api import fal
from fluxserve.config import Settings
from fluxserve.jobs.store import JobStore

pytest_plugins = ["db_fixtures"]

REQUEST = {"model": "dev", "prompt": "a lighthouse", "steps": 2}
FLASH = "fal-ai/flux-2/flash"


def submit(store: JobStore, **kwargs):
    kwargs.setdefault("endpoint", "fal-ai/flux-2")
    kwargs.setdefault("dialect", "fal")
    kwargs.setdefault("request", REQUEST)
    return store.submit(**kwargs)


# ---- JobStore.status -----------------------------------------------------------------------------------------
def test_status_reads_fields_position_and_inference_time(store):
    first, second = submit(store), submit(store)
    low = submit(store, priority="low")
    assert [store.status(j.id).queue_position for j in (first, second, low)] == [0, 1, 2]
    assert [store.queue_position(j.id) for j in (first, second, low)] == [0, 1, 2]
    snapshot = store.status(second.id)
    assert (snapshot.id, snapshot.endpoint, snapshot.dialect, snapshot.status) == (
        second.id, "fal-ai/flux-2", "fal", "queued")
    assert store.status("no-such-job") is None

    claimed = store.claim("w1")
    assert claimed.id == first.id
    running = store.status(first.id)
    assert running.status == "running" and running.queue_position is None and running.started_at is not None
    assert store.status(second.id).queue_position == 0 and store.status(low.id).queue_position == 1
    store.report(first.id, "w1", step=1, total=4)
    assert (store.status(first.id).step, store.status(first.id).total_steps) == (1, 4)

    store.complete(first.id, "w1", {"images": [], "timings": {"inference": 1.25}})
    done = store.status(first.id)
    assert done.status == "completed" and done.terminal and done.inference == 1.25
    assert done.completed_at is not None and done.completed_at >= done.started_at
    assert store.request_cancel(second.id) == "CANCELLATION_REQUESTED"
    cancelled = store.status(second.id)
    assert cancelled.status == "cancelled" and cancelled.error and cancelled.error_type and cancelled.inference is None


def test_status_finishes_a_timed_out_queued_job_like_get(store):
    job = submit(store, timeout_s=0.05)
    time.sleep(0.15)
    snapshot = store.status(job.id)
    assert snapshot.status == "failed" and snapshot.error_type == "request_timeout"
    assert store.get(job.id).status == "failed"


def test_status_snapshots_are_reused_only_until_this_store_changes_something(store, db_url):
    job = submit(store)
    assert store.status(job.id, max_age_s=60).status == "queued"
    other_process = JobStore(db_url)  # another store object: its changes do not reach this one's counter
    try:
        assert other_process.request_cancel(job.id) == "CANCELLATION_REQUESTED"
        assert store.cached_status(job.id, 60).status == "queued"  # stale for at most max_age_s (documented)
        assert store.status(job.id, max_age_s=60).status == "queued"
        assert store.status(job.id).status == "cancelled"  # max_age_s=0 always reads
        assert store.cached_status(job.id, 0.0) is None
    finally:
        other_process.close()
    queued = submit(store)
    assert store.status(queued.id, max_age_s=60).queue_position == 0
    assert store.request_cancel(queued.id) == "CANCELLATION_REQUESTED"  # a change through this store
    assert store.cached_status(queued.id, 60) is None
    assert store.status(queued.id, max_age_s=60).status == "cancelled"


# ---- the ASGI fast path --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("fast-path"), demo=True, device="cpu")
    with Server(settings_for(settings, "idle"), start_workers=False) as running:
        yield running


def call_fast_path(app, path: str, query: bytes = b"", headers: list | None = None) -> tuple[bool, int, dict]:
    """Run StatusFastPath alone: (fell through?, status, body)."""
    fell_through = []
    sent = []

    async def downstream(scope, receive, send):
        fell_through.append(scope["path"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "scheme": "http",
             "root_path": "", "app": app,
             "headers": [(b"host", b"example.test:9")] + (headers or [])}
    asyncio.run(fal.StatusFastPath(downstream)(scope, receive, send))
    if fell_through:
        return True, 0, {}
    return False, sent[0]["status"], json.loads(sent[1]["body"])


def test_fast_path_answers_like_the_route(idle):
    submitted = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "waits"}).json()
    cancelled = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "cancelled"}).json()
    httpx.put(cancelled["cancel_url"])
    for job, code in ((submitted, 202), (cancelled, 200)):
        fast = httpx.get(job["status_url"])
        route = httpx.get(job["status_url"], params={"logs": "1"})  # logs -> always the route
        assert fast.status_code == route.status_code == code
        assert fast.headers["x-fal-request-id"] == route.headers["x-fal-request-id"] == job["request_id"]
        assert fast.headers["content-type"] == route.headers["content-type"] == "application/json"
        fast_body, route_body = fast.json(), route.json()
        assert fast_body.pop("logs", None) is None
        route_body.pop("logs", None)
        assert fast_body == route_body
    assert httpx.get(submitted["status_url"]).json()["queue_position"] >= 0
    assert httpx.get(cancelled["status_url"]).json()["error_type"]


def test_fast_path_answers_only_what_it_can(idle):
    app = idle.app
    job = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "waits"}).json()
    rid = job["request_id"]
    through, status, body = call_fast_path(app, f"/queue/fal-ai/flux-2/requests/{rid}/status")
    assert not through and status == 202 and body["status"] == "IN_QUEUE"
    assert body["status_url"] == f"http://example.test:9/queue/fal-ai/flux-2/requests/{rid}/status"
    through, _, body = call_fast_path(app, f"/fal-ai/flux-2/requests/{rid}/status",
                                      headers=[(b"x-forwarded-proto", b"https")])
    assert not through and body["response_url"] == f"https://example.test:9/fal-ai/flux-2/requests/{rid}"
    for path, query in (
        (f"/queue/fal-ai/flux-2/requests/{rid}/status", b"logs=1"),  # logs: the route reads them
        (f"/queue/fal-ai/flux-2-pro/requests/{rid}/status", b""),  # another app: the route's 404
        ("/queue/fal-ai/flux-2/requests/no-such-id/status", b""),  # unknown: the route's 404
        (f"/files/x/requests/{rid}/status", b""),  # the files route owns /files/
    ):
        assert call_fast_path(app, path, query)[0], (path, query)
    assert not call_fast_path(app, f"/queue/fal-ai/flux-2/requests/{rid}/status", b"logs=0")[0]


def test_fast_path_leaves_unverified_keys_to_the_route(tmp_path):
    settings = Settings(data_dir=tmp_path, demo=True, device="cpu")
    with Server(settings_for(settings, "auth"), start_workers=False, auth_required=True) as locked:
        key_id, secret = locked.store.create_key("poller")
        headers = {"Authorization": f"Key {secret}"}
        job = httpx.post(f"{locked.url}/queue/{FLASH}", json={"prompt": "a"}, headers=headers).json()
        path = job["status_url"].removeprefix(locked.url)
        assert httpx.get(job["status_url"]).status_code == 401
        assert httpx.get(job["status_url"], headers={"Authorization": "Key wrong"}).status_code == 401
        assert call_fast_path(locked.app, path, headers=[(b"authorization", b"Key wrong")])[0]
        assert httpx.get(job["status_url"], headers=headers).status_code == 202  # verified: now cached
        assert not call_fast_path(locked.app, path, headers=[(b"authorization", f"Key {secret}".encode())])[0]
        assert locked.store.revoke_key(key_id)
        locked.app.state.auth.forget()  # what this process does after a revoke (others: within the TTL)
        assert httpx.get(job["status_url"], headers=headers).status_code == 401


def test_change_listeners_hear_every_change_made_through_the_store(store):
    heard: list[tuple[str, ...]] = []
    store.add_change_listener(heard.append)
    job = submit(store)
    assert heard == [()]  # a submit: every queue position may have moved
    store.claim("w1")
    store.complete(job.id, "w1", {"images": []})
    assert all(ids == (job.id,) for ids in heard[1:]) and len(heard) >= 3
    store.remove_change_listener(heard.append)
    count = len(heard)
    submit(store)
    assert len(heard) == count
