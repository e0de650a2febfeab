"""Quotas per API key: requests at once, requests per minute, megapixels per 24 hours. Over a limit every dialect
answers 429 with Retry-After in its own error format, and the official clients raise their rate-limit error; the
counts live in the job store, so API processes sharing it share them; ``fluxserve keys`` sets and shows them."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import fal_client
import httpx
import openai
import pytest
from fal_helpers import Server, settings_for
from replicate.exceptions import ReplicateError
from sqlalchemy import create_engine, inspect, text

import fluxserve.compat.fal
from fluxserve.compat.replicate import client as replicate_client
from fluxserve.config import Settings
from fluxserve.jobs.quotas import LIMITS, Limits, estimate_megapixels
from fluxserve.jobs.store import JobStore, QueueFull, QuotaExceeded, utcnow

pytest_plugins = ["db_fixtures"]

FLASH = "fal-ai/flux-2/flash"
DEV = "black-forest-labs/flux-2-dev"
TINY = {"aspect_ratio": "custom", "width": 64, "height": 64, "steps": 2, "go_fast": False}
SMALL = {"prompt": "a fox", "image_size": {"width": 512, "height": 512}}  # 1 megapixel
ONE_MP = {"model": "dev", "width": 1024, "height": 1024, "num_images": 1}
DAY_S = 24 * 3600


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


def submit(store: JobStore, owner: str | None, request: dict | None = None):
    return store.submit(endpoint="fal-ai/flux-2", dialect="fal", request=request or ONE_MP, owner=owner)


def refusal(store: JobStore, owner: str, request: dict | None = None) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        submit(store, owner, request)
    return caught.value


def execute(url: str, sql: str, **params) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(sql), params)
    engine.dispose()


def finish(store: JobStore, owner: str, megapixels: int, hours_ago: float) -> None:
    """A job of ``owner`` completed ``hours_ago``, billing ``megapixels``."""
    job = submit(store, owner)
    claimed = store.claim("test-worker", models=None)
    assert claimed is not None and claimed.id == job.id
    store.complete(job.id, "test-worker", {"images": []}, usage={"output_images": 1, "output_megapixels": megapixels,
                                                                 "megapixels": megapixels})
    execute(store.url, "UPDATE job_usage SET finished_at = :at WHERE job_id = :id",
            at=(utcnow() - timedelta(hours=hours_ago)).replace(tzinfo=None), id=job.id)


# ---- the job store (SQLite and PostgreSQL) ---------------------------------------------------------------------
def test_estimated_megapixels_of_a_request():
    assert estimate_megapixels({"width": 1024, "height": 1024, "num_images": 2, "image_urls": ["a", "b"]}) == 4
    assert estimate_megapixels({"width": 2048, "height": 1024, "num_images": 1}) == 2
    assert estimate_megapixels({"width": None, "height": None, "num_images": 3}) == 3  # size from a reference


def test_concurrency_counts_queued_and_running_jobs(store):
    key, _ = store.create_key("team", limits=Limits(max_concurrent=2))
    other, _ = store.create_key("other", limits=Limits(max_concurrent=1))
    first = submit(store, key)
    submit(store, key)
    refused = refusal(store, key)
    assert isinstance(refused, QueueFull) and refused.limit == "max_concurrent" and refused.retry_after_s == 5
    assert "max_concurrent 2" in refused.message
    submit(store, other)  # each key has its own count
    assert store.claim("w1", models=None).id == first.id
    assert refusal(store, key).limit == "max_concurrent"  # running counts too
    store.complete(first.id, "w1", {"images": []})
    submit(store, key)


def test_requests_per_minute_and_when_the_oldest_ages_out(store):
    key, _ = store.create_key("team", limits=Limits(rpm=2))
    first = submit(store, key)
    submit(store, key)
    assert refusal(store, key).limit == "rpm"
    execute(store.url, "UPDATE jobs SET created_at = :at WHERE id = :id",
            at=(utcnow() - timedelta(seconds=50)).replace(tzinfo=None), id=first.id)
    refused = refusal(store, key)
    assert 1 <= refused.retry_after_s <= 10 and "2 requests in the last minute" in refused.message
    execute(store.url, "UPDATE jobs SET created_at = :at WHERE id = :id",
            at=(utcnow() - timedelta(seconds=61)).replace(tzinfo=None), id=first.id)
    submit(store, key)  # the first one left the window
    assert refusal(store, key).limit == "rpm"


def test_megapixels_per_day_count_billed_pending_and_new(store):
    key, _ = store.create_key("team", limits=Limits(mp_per_day=5))
    finish(store, key, megapixels=3, hours_ago=23)
    finish(store, key, megapixels=7, hours_ago=25)  # outside the 24 hours
    submit(store, key)  # 3 billed + 1 new
    submit(store, key)  # 3 billed + 1 queued + 1 new
    refused = refusal(store, key)
    assert refused.limit == "mp_per_day" and "used 3 of its 5" in refused.message
    assert 3000 < refused.retry_after_s <= 3600  # the 3 billed an hour before the day is over
    too_big = refusal(store, key, {"model": "dev", "width": 2048, "height": 2048, "num_images": 2})
    assert too_big.retry_after_s == DAY_S and "needs 8 megapixels" in too_big.message


def test_megapixels_of_unfinished_jobs_wait_a_day_at_most(store):
    key, _ = store.create_key("team", limits=Limits(mp_per_day=2))
    submit(store, key, {"model": "dev", "width": 1024, "height": 1024, "num_images": 2})
    refused = refusal(store, key)
    assert refused.retry_after_s == DAY_S and "2 more queued or running" in refused.message


def test_failed_jobs_bill_nothing(store):
    key, _ = store.create_key("team", limits=Limits(mp_per_day=1))
    job = submit(store, key)
    store.claim("w1", models=None)
    store.fail(job.id, "boom", worker_id="w1", usage={"megapixels": 1})
    submit(store, key)


def test_admin_keys_and_keyless_use_are_not_limited(store):
    admin, _ = store.create_key("ops", admin=True)
    store.set_limits(admin, max_concurrent=1, rpm=1, mp_per_day=1)
    for _ in range(3):
        submit(store, admin)
        submit(store, None)


def test_set_limits_changes_only_what_is_given(store):
    key, secret = store.create_key("team", limits=Limits(max_concurrent=3, rpm=60))
    changed = store.set_limits(key, rpm=None, mp_per_day=500)
    assert changed.limits == Limits(max_concurrent=3, rpm=None, mp_per_day=500)
    assert store.authenticate(secret).limits == changed.limits
    assert [k.limits for k in store.list_keys()] == [changed.limits]
    assert store.set_limits("key_missing", rpm=1) is None
    for bad in ({"rpm": 0}, {"rpm": -3}, {"rpm": 1.5}, {"rpm": True}, {"burst": 3}):
        with pytest.raises(ValueError):
            store.set_limits(key, **bad)
    with pytest.raises(ValueError):
        store.create_key("bad", limits=Limits(mp_per_day=0))


def test_two_stores_share_the_counts(db_url):
    first, second = JobStore(db_url), JobStore(db_url)
    try:
        key, _ = first.create_key("team", limits=Limits(rpm=3))
        submit(first, key)
        submit(second, key)
        submit(first, key)
        assert refusal(second, key).limit == "rpm"
        second.set_limits(key, rpm=None, max_concurrent=3)
        assert refusal(first, key).limit == "max_concurrent"  # a change made elsewhere applies at once
    finally:
        first.close()
        second.close()


def test_limits_are_added_to_an_older_api_keys_table(db_url):
    old = JobStore(db_url)
    key, secret = old.create_key("made before quotas")
    old.close()
    for column in LIMITS:
        execute(db_url, f"ALTER TABLE api_keys DROP COLUMN {column}")
    engine = create_engine(db_url)
    assert not set(LIMITS) & {c["name"] for c in inspect(engine).get_columns("api_keys")}
    engine.dispose()
    reopened = JobStore(db_url)
    try:
        assert reopened.authenticate(secret).limits == Limits()  # an older key is unlimited
        submit(reopened, key)
        reopened.set_limits(key, max_concurrent=1)
        assert refusal(reopened, key).limit == "max_concurrent"
    finally:
        reopened.close()


# ---- over HTTP, in each dialect ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """No workers: a submitted job stays queued (so counts never change under a test)."""
    base = Settings(data_dir=tmp_path_factory.mktemp("quotas"), demo=True, device="cpu")
    with Server(settings_for(base, "quotas"), start_workers=False, auth_required=True) as running:
        yield running


def over_limit(server, limit: str) -> str:
    """A key whose one accepted fal request (1 MP) uses up ``limit``: its next request is refused."""
    _, secret = server.store.create_key(f"one {limit}", limits=Limits(**{limit: 1}))
    accepted = httpx.post(f"{server.url}/queue/{FLASH}", json=SMALL, headers=auth(secret), timeout=60)
    assert accepted.status_code == 200, accepted.text
    return secret


def retry_after(response: httpx.Response, limit: str) -> int:
    seconds = int(response.headers["retry-after"])
    assert {"max_concurrent": seconds == 5, "rpm": 1 <= seconds <= 60, "mp_per_day": seconds == DAY_S}[limit]
    return seconds


@pytest.mark.parametrize("limit", LIMITS)
def test_fal_answers_429_with_retry_after(server, limit):
    secret = over_limit(server, limit)
    refused = httpx.post(f"{server.url}/queue/{FLASH}", json=SMALL, headers=auth(secret), timeout=60)
    assert refused.status_code == 429, refused.text
    retry_after(refused, limit)
    assert refused.json()["error_type"] == "rate_limit_exceeded" == refused.headers["x-fal-error-type"]
    assert limit in refused.json()["detail"]
    synchronous = httpx.post(f"{server.url}/run/{FLASH}", json=SMALL, headers=auth(secret), timeout=60)
    assert synchronous.status_code == 429 and limit in synchronous.json()["detail"]


@pytest.mark.parametrize("limit", LIMITS)
def test_openai_answers_429_like_openai(server, limit):
    secret = over_limit(server, limit)  # the count is the key's, whatever dialect made its jobs
    refused = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a", "model": "flux-2-flash",
                                                                       "size": "64x64"},
                         headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    assert refused.status_code == 429, refused.text
    retry_after(refused, limit)
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["param"] == limit
    assert error["type"] == ("megapixels" if limit == "mp_per_day" else "requests")


@pytest.mark.parametrize("limit", LIMITS)
def test_replicate_answers_429_as_a_problem(server, limit):
    secret = over_limit(server, limit)
    refused = httpx.post(f"{server.url}/v1/models/{DEV}/predictions", json={"input": {"prompt": "a", **TINY}},
                         headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    assert refused.status_code == 429, refused.text
    retry_after(refused, limit)
    problem = refused.json()
    assert problem["status"] == 429 and problem["title"] == "Request was throttled" and limit in problem["detail"]


def test_openai_refuses_the_whole_request_and_runs_none_of_its_jobs(server):
    # n=8 on flash is two jobs of 4 images: the second is over the limit, so the first is cancelled too
    key, secret = server.store.create_key("two jobs", limits=Limits(max_concurrent=1))
    refused = httpx.post(f"{server.url}/v1/images/generations", timeout=60,
                         json={"prompt": "a", "model": "flux-2-flash", "size": "64x64", "n": 8},
                         headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 429, refused.text
    jobs = server.store.list(owner=key)
    assert [job.status for job in jobs] == ["cancelled"]


@pytest.fixture
def fal_few_retries(server, monkeypatch):
    """fal_client retries a 429 up to 10 times with growing pauses (about a minute): keep one retry."""
    from fal_client import client

    names = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")
    for name in names:
        monkeypatch.setattr(client, name, getattr(client, name))
    monkeypatch.setattr(client, "MAX_ATTEMPTS", 2)
    monkeypatch.setenv("FAL_KEY", "unused")
    fluxserve.compat.fal.use(server.url)


@pytest.mark.parametrize("limit", LIMITS)
def test_the_official_clients_raise_their_rate_limit_errors(server, fal_few_retries, limit):
    secret = over_limit(server, limit)
    with pytest.raises(fal_client.client.FalClientHTTPError) as fal_caught:
        fal_client.SyncClient(key=secret).submit(FLASH, arguments=SMALL)
    assert fal_caught.value.status_code == 429 and limit in fal_caught.value.message
    with pytest.raises(openai.RateLimitError) as openai_caught:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0).images.generate(
            model="flux-2-flash", prompt="a", size="64x64")
    assert openai_caught.value.code == "rate_limit_exceeded"
    if limit == "mp_per_day":  # Retry-After is a day: the SDK, retries on, does not wait and raises at once
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=2).images.generate(
                model="flux-2-flash", prompt="a", size="64x64")
    with pytest.raises(ReplicateError) as replicate_caught:
        replicate_client(server.url, key=secret).predictions.create(model=DEV, input={"prompt": "a", **TINY})
    assert replicate_caught.value.status == 429


def test_admin_keys_are_not_limited_over_http(server):
    key, secret = server.store.create_key("ops", admin=True)
    server.store.set_limits(key, max_concurrent=1, rpm=1, mp_per_day=1)
    for _ in range(2):
        assert httpx.post(f"{server.url}/queue/{FLASH}", json=SMALL, headers=auth(secret),
                          timeout=60).status_code == 200


def test_two_api_servers_on_one_store_share_the_counts(db_url, tmp_path):
    settings = Settings(data_dir=tmp_path, demo=True, device="cpu", db=db_url, storage=str(tmp_path / "files"))
    with Server(settings, start_workers=False, auth_required=True) as one, \
            Server(settings, start_workers=False, auth_required=True) as two:
        _, secret = one.store.create_key("team", limits=Limits(rpm=3))
        for server in (one, two, one):
            assert httpx.post(f"{server.url}/queue/{FLASH}", json=SMALL, headers=auth(secret),
                              timeout=60).status_code == 200
        refused = httpx.post(f"{two.url}/queue/{FLASH}", json=SMALL, headers=auth(secret), timeout=60)
        assert refused.status_code == 429 and "rpm 3" in refused.json()["detail"]


# ---- fluxserve keys ----------------------------------------------------------------------------------------------
def run_cli(*args: str, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxserve", "keys", *args, "--data-dir", str(data_dir)],
                          check=False, capture_output=True, text=True, timeout=300)


def test_keys_create_update_and_list_limits(tmp_path):
    created = run_cli("create", "--name", "team", "--max-concurrent", "2", "--rpm", "60", data_dir=tmp_path)
    assert created.returncode == 0, created.stderr
    assert "limits: max_concurrent=2 rpm=60" in created.stderr
    key_id = created.stdout.strip().split(":")[0]
    listed = run_cli("list", data_dir=tmp_path)
    assert "LIMITS" in listed.stdout and "max_concurrent=2 rpm=60" in listed.stdout

    updated = run_cli("update", key_id, "--rpm", "none", "--mp-per-day", "500", data_dir=tmp_path)
    assert updated.returncode == 0, updated.stderr
    assert updated.stdout.strip() == f"{key_id} limits: max_concurrent=2 mp_per_day=500"
    store = JobStore(Settings(data_dir=tmp_path).db_url)
    try:
        assert store.list_keys()[0].limits == Limits(max_concurrent=2, mp_per_day=500)
        submit(store, key_id)
        submit(store, key_id)
        assert refusal(store, key_id).limit == "max_concurrent"  # what the CLI set is what the API enforces
    finally:
        store.close()
    cleared = run_cli("update", key_id, "--max-concurrent", "none", "--mp-per-day", "0", data_dir=tmp_path)
    assert cleared.stdout.strip() == f"{key_id} limits: -"


@pytest.mark.parametrize("args,code,message", [
    (("update", "KEY", "--rpm", "-1"), 2, "--rpm: a whole number, or 0 or none for no limit"),
    (("update", "KEY", "--mp-per-day", "lots"), 2, "--mp-per-day: a whole number"),
    (("update", "KEY"), 2, "give at least one of --max-concurrent, --rpm, --mp-per-day"),
    (("update", "key_0000000000000000", "--rpm", "5"), 1, "no key 'key_0000000000000000'"),
    (("create", "--admin", "--rpm", "5"), 2, "admin keys are never limited"),
    (("create", "--max-concurrent", "-1"), 2, "--max-concurrent: a whole number"),
])
def test_keys_refuses_bad_limits(tmp_path, args, code, message):
    key_id = run_cli("create", "--name", "team", data_dir=tmp_path).stdout.strip().split(":")[0]
    done = run_cli(*(key_id if arg == "KEY" else arg for arg in args), data_dir=tmp_path)
    assert done.returncode == code and message in done.stderr, done.stderr
