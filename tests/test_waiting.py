"""Waiting callers hold no thread: many requests of one key that wait for their jobs (fal sync runs, Replicate
``Prefer: wait``, OpenAI generations) do not slow another key's submit, status, history and listings.

A real server (demo models, no workers: every job stays queued, so every waiter waits) on SQLite and on
PostgreSQL; real HTTP from httpx. The waiters outnumber every thread pool the server has (the default
executor, anyio's 40 worker threads). The bound on the other key's answers (10 s) is wide: a waiter that
holds a thread makes them take as long as the waits (60 s for ``Prefer: wait``), one that holds none leaves
them at milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import httpx
import pytest
from fal_helpers import SMALL, Server, settings_for

from fluxserve.api.waits import JobWaits
from fluxserve.jobs.store import JobStore

pytest_plugins = ["db_fixtures"]

DEV = "black-forest-labs/flux-2-dev"
FAL_WAITERS, REPLICATE_WAITERS, OPENAI_WAITERS = 40, 45, 10
BOUND_S = 10.0  # what another key's request may take while the waiters wait (the fix: milliseconds)


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


async def _until(condition, bound_s: float, what: str) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _timed(call) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = await call
    return time.monotonic() - started, response


async def _other_key_calls(http: httpx.AsyncClient, key: str) -> dict[str, tuple[float, httpx.Response]]:
    """Key B's everyday requests, one after the other, each timed."""
    out = {}
    out["fal submit"] = await _timed(http.post("/fal-ai/flux-2", json={"prompt": "b", **SMALL},
                                               headers=_auth(key) | {"Host": "queue.fal.run"}))
    request_id = out["fal submit"][1].json()["request_id"]
    out["fal status"] = await _timed(http.get(f"/fal-ai/flux-2/requests/{request_id}/status?logs=1",
                                              headers=_auth(key)))
    out["history"] = await _timed(http.get("/api/history", headers=_auth(key)))
    out["replicate list"] = await _timed(http.get("/v1/predictions", headers=_auth(key)))
    out["replicate create"] = await _timed(http.post(f"/v1/models/{DEV}/predictions", headers=_auth(key),
                                                     json={"input": {"prompt": "b"}}))
    return out


@pytest.fixture
def waiting_server(demo_settings, db_url, tmp_path):
    settings = replace(settings_for(demo_settings, f"waits-{tmp_path.name}"), db=db_url, max_queued_per_key=0)
    with Server(settings, start_workers=False, auth_required=True) as server:
        server.keys = (server.store.create_key("a")[1], server.store.create_key("b")[1])
        yield server


def test_waiting_requests_of_one_key_do_not_slow_another_keys_requests(waiting_server):
    server = waiting_server
    key_a, key_b = server.keys
    waiters = FAL_WAITERS + REPLICATE_WAITERS + OPENAI_WAITERS

    async def scenario() -> dict[str, tuple[float, httpx.Response]]:
        limits = httpx.Limits(max_connections=waiters + 10, max_keepalive_connections=waiters + 10)
        async with (httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as waiting,
                    httpx.AsyncClient(base_url=server.url, timeout=300) as other):
            calls = [waiting.post("/fal-ai/flux-2", json={"prompt": f"a{i}", **SMALL}, headers=_auth(key_a))
                     for i in range(FAL_WAITERS)]
            calls += [waiting.post(f"/v1/models/{DEV}/predictions", json={"input": {"prompt": f"a{i}"}},
                                   headers=_auth(key_a) | {"Prefer": "wait=60"}) for i in range(REPLICATE_WAITERS)]
            calls += [waiting.post("/v1/images/generations", headers={"Authorization": f"Bearer {key_a}"},
                                   json={"prompt": f"a{i}", "model": "flux-2-dev", "size": "512x512"})
                      for i in range(OPENAI_WAITERS)]
            tasks = [asyncio.ensure_future(call) for call in calls]
            try:
                await _until(lambda: server.store.counts()["queued"] >= waiters, 120, "every waiter's job")
                await asyncio.sleep(1.0)  # the waiters are in their waits now
                assert not any(task.done() for task in tasks), "a waiter stopped waiting"
                return await _other_key_calls(other, key_b)
            finally:
                for job in server.store.list(status="queued", limit=1000):
                    server.store.request_cancel(job.id)
                _, pending = await asyncio.wait(tasks, timeout=120)
                for task in pending:
                    task.cancel()
                assert not pending, f"{len(pending)} waiters did not end after their jobs were cancelled"

    timings = asyncio.run(scenario())
    for name, (elapsed, response) in timings.items():
        assert response.status_code < 300, (name, response.status_code, response.text)
    slow = {name: round(elapsed, 2) for name, (elapsed, _) in timings.items() if elapsed > BOUND_S}
    assert not slow, f"another key's requests waited behind the waiters: {slow}"


# ---- the waits themselves, on the store (SQLite and PostgreSQL) ---------------------------------------------------
def test_a_wait_ends_when_this_process_ends_the_job(store):
    waits = JobWaits(store)
    job = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"prompt": "x"})

    async def scenario() -> tuple[bool, bool]:
        not_yet = await waits.wait(job.id, 0.3)
        asyncio.get_running_loop().call_later(0.2, store.request_cancel, job.id)
        return not_yet, await waits.wait(job.id, 60)

    not_yet, ended = asyncio.run(scenario())
    assert (not_yet, ended) == (False, True)
    assert store.get(job.id).status == "cancelled"


def test_a_wait_sees_a_job_ended_by_another_process(store, db_url):
    """Another process's change fires no event here: the waits' poll finds it."""
    waits = JobWaits(store)
    job = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"prompt": "x"})
    elsewhere = JobStore(db_url)
    try:
        async def scenario() -> bool:
            asyncio.get_running_loop().call_later(0.3, elsewhere.request_cancel, job.id)
            return await waits.wait(job.id, 60)

        assert asyncio.run(scenario()) is True
        assert store.get(job.id).status == "cancelled"
    finally:
        elsewhere.close()


def test_waits_for_many_jobs_end_each_with_its_own_job(store):
    waits = JobWaits(store)
    jobs = [store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"prompt": str(i)}) for i in range(30)]

    async def scenario() -> list[bool]:
        pending = [asyncio.ensure_future(waits.wait(job.id, 60)) for job in jobs]
        await asyncio.sleep(0.2)
        for job in jobs[::2]:
            store.request_cancel(job.id)
        await asyncio.wait(pending[::2], timeout=30)
        await asyncio.sleep(0.5)  # time for a wrong wake-up of the others
        ended = [task.done() for task in pending]
        for task in pending[1::2]:
            task.cancel()
        return ended

    ended = asyncio.run(scenario())
    assert ended == [i % 2 == 0 for i in range(len(jobs))]


def test_a_wait_for_an_unknown_job_ends_at_once(store):
    assert asyncio.run(JobWaits(store).wait("missing", 60)) is True


def test_a_wait_ends_when_the_job_times_out_with_nobody_to_end_it(store):
    """No worker and no other caller touches the job: the waits' poll runs the store's sweep, which ends a
    queued job past its timeout."""
    job = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"prompt": "x"}, timeout_s=0.3)
    assert asyncio.run(JobWaits(store).wait(job.id, 60)) is True
    assert store.get(job.id).status == "failed"
