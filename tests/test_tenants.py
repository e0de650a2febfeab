"""Tenants: every API key sees, lists, cancels and downloads only its own requests, in every dialect, through
the official clients where they can say it; admin keys see everything; queue-depth limits per key and in all."""

from __future__ import annotations

from dataclasses import replace

import fal_client
import httpx
import openai
import pytest
from fal_helpers import Server, settings_for
from replicate.exceptions import ReplicateError

import fluxserve.compat.fal
from fluxserve.compat.replicate import client as replicate_client
from fluxserve.jobs.store import JobStore

pytest_plugins = ["db_fixtures"]

FLASH = "fal-ai/flux-2/flash"
SMALL = {"image_size": {"width": 512, "height": 512}}
DEV = "black-forest-labs/flux-2-dev"
TINY = {"aspect_ratio": "custom", "width": 64, "height": 64, "steps": 2, "go_fast": False}


class Keys:
    def __init__(self, store: JobStore):
        self.alice_id, self.alice = store.create_key("alice")
        self.bob_id, self.bob = store.create_key("bob")
        self.admin_id, self.admin = store.create_key("ops", admin=True)


@pytest.fixture(scope="module")
def server(demo_settings, tmp_path_factory):
    base = replace(demo_settings, data_dir=demo_settings.data_dir)
    settings = settings_for(base, f"tenants-{tmp_path_factory.mktemp('t').name}")
    with Server(settings, auth_required=True) as running:
        running.keys = Keys(running.store)
        yield running


@pytest.fixture(scope="module")
def fal_clients(server):
    names = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")
    saved = {name: getattr(fal_client.client, name) for name in names}
    fluxserve.compat.fal.use(server.url, server.keys.alice)
    yield {who: fal_client.SyncClient(key=getattr(server.keys, who)) for who in ("alice", "bob", "admin")}
    for name, value in saved.items():
        setattr(fal_client.client, name, value)


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


def not_found_body(response: httpx.Response, request_id: str, missing: str) -> dict:
    """The body with the id replaced, to compare another key's answer with a missing id's."""
    return response.json() | {"detail": response.json()["detail"].replace(request_id, missing)}


# ---- fal ---------------------------------------------------------------------------------------------------------
def test_fal_requests_belong_to_their_key(server, fal_clients):
    alice, bob, admin = fal_clients["alice"], fal_clients["bob"], fal_clients["admin"]
    handle = alice.submit(FLASH, arguments={"prompt": "alice's cat", **SMALL})
    assert handle.get()["images"][0]["width"] == 512
    request_id = handle.request_id
    assert server.store.get(request_id).owner == server.keys.alice_id

    assert isinstance(alice.status(FLASH, request_id), fal_client.Completed)
    assert isinstance(admin.status(FLASH, request_id), fal_client.Completed)  # an admin key sees everyone's
    assert admin.result(FLASH, request_id)["images"]
    for call in (lambda: bob.status(FLASH, request_id), lambda: bob.result(FLASH, request_id),
                 lambda: bob.cancel(FLASH, request_id)):
        with pytest.raises(fal_client.client.FalClientHTTPError) as caught:
            call()
        assert caught.value.status_code == 404

    # raw HTTP: bob's answers are exactly those for an id that does not exist, on every route and layout
    missing = "00000000-0000-0000-0000-000000000000"
    urls = ["/queue/fal-ai/flux-2/requests/{}/status", "/queue/fal-ai/flux-2/requests/{}",
            "/fal-ai/flux-2/requests/{}/status", "/queue/fal-ai/flux-2/requests/{}/status/stream",
            "/queue/fal-ai/flux-2/requests/{}/status?logs=1"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for url in urls:
            theirs = http.get(url.format(request_id), headers=auth(server.keys.bob))
            nothing = http.get(url.format(missing), headers=auth(server.keys.bob))
            assert theirs.status_code == nothing.status_code == 404, url
            assert not_found_body(theirs, request_id, missing) == nothing.json()
            assert http.get(url.format(request_id), headers=auth(server.keys.alice)).status_code in (200, 202)
        cancel = http.put(f"/queue/fal-ai/flux-2/requests/{request_id}/cancel", headers=auth(server.keys.bob))
        assert cancel.status_code == 404 and cancel.json()["error_type"] == "not_found"


def test_status_fast_path_checks_the_owner(server, fal_clients):
    """The ASGI status fast path answers only a key that may see the job; others fall through to the 404."""
    handle = fal_clients["alice"].submit(FLASH, arguments={"prompt": "fast", **SMALL})
    handle.get()
    url = f"{server.url}/queue/fal-ai/flux-2/requests/{handle.request_id}/status"
    with httpx.Client(timeout=30) as http:
        for _ in range(3):  # the first answer fills the key cache; later ones may take the fast path
            assert http.get(url, headers=auth(server.keys.alice)).status_code == 200
            assert http.get(url, headers=auth(server.keys.admin)).status_code == 200
            refused = http.get(url, headers=auth(server.keys.bob))
            assert refused.status_code == 404 and refused.json()["error_type"] == "not_found"


# ---- Replicate ---------------------------------------------------------------------------------------------------
def test_replicate_predictions_belong_to_their_key(server):
    alice = replicate_client(server.url, key=server.keys.alice)
    bob = replicate_client(server.url, key=server.keys.bob)
    admin = replicate_client(server.url, key=server.keys.admin)
    prediction = alice.predictions.create(model=DEV, input={"prompt": "alice's dog", **TINY})
    prediction.wait()
    assert prediction.status == "succeeded"
    assert alice.predictions.get(prediction.id).id == prediction.id
    assert admin.predictions.get(prediction.id).id == prediction.id
    for call in (lambda: bob.predictions.get(prediction.id), lambda: bob.predictions.cancel(prediction.id)):
        with pytest.raises(ReplicateError) as caught:
            call()
        assert caught.value.status == 404
    assert prediction.id in [p.id for p in alice.predictions.list().results]
    assert prediction.id not in [p.id for p in bob.predictions.list().results]
    assert prediction.id in [p.id for p in admin.predictions.list().results]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        stream = http.get(f"/v1/predictions/{prediction.id}/stream", headers=auth(server.keys.bob))
        assert stream.status_code == 404 and stream.json()["title"] == "Not found"


# ---- OpenAI and the playground's history ----------------------------------------------------------------------
def test_history_shows_only_the_callers_jobs(server, fal_clients):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys.bob, max_retries=0)
    response = client.images.generate(model="flux-2-flash", prompt="bob's openai owl", size="64x64",
                                      extra_body={"steps": 2})
    assert response.data[0].url or response.data[0].b64_json
    alice_job = fal_clients["alice"].submit(FLASH, arguments={"prompt": "alice's history", **SMALL})
    alice_job.get()

    def prompts(secret: str) -> list[str]:
        answer = httpx.get(f"{server.url}/api/history", params={"limit": 200}, headers=auth(secret), timeout=30)
        assert answer.status_code == 200
        return [item["prompt"] for item in answer.json()["items"]]

    assert "bob's openai owl" in prompts(server.keys.bob) and "alice's history" not in prompts(server.keys.bob)
    assert "alice's history" in prompts(server.keys.alice) and "bob's openai owl" not in prompts(server.keys.alice)
    assert {"bob's openai owl", "alice's history"} <= set(prompts(server.keys.admin))
    owners = {job.owner for job in server.store.list(limit=500)}
    assert owners <= {server.keys.alice_id, server.keys.bob_id}


# ---- queue limits --------------------------------------------------------------------------------------------------
@pytest.fixture
def limited(demo_settings, tmp_path):
    settings = replace(settings_for(demo_settings, f"limits-{tmp_path.name}"), max_queued=3, max_queued_per_key=2)
    with Server(settings, start_workers=False, auth_required=True) as running:
        running.keys = Keys(running.store)
        yield running


def test_queue_limits_answer_429_with_retry_after_in_each_dialect(limited):
    keys = limited.keys
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        for _ in range(2):
            assert http.post(f"/queue/{FLASH}", json={"prompt": "a"}, headers=auth(keys.alice)).status_code == 200
        full = http.post(f"/queue/{FLASH}", json={"prompt": "a"}, headers=auth(keys.alice))
        assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
        assert full.json()["error_type"] == "queue_full" and "API key" in full.json()["detail"]
        replicate_full = http.post("/v1/predictions", json={"version": DEV, "input": {"prompt": "a", **TINY}},
                                   headers=auth(keys.alice))
        assert replicate_full.status_code == 429 and replicate_full.headers["retry-after"]
        assert replicate_full.json()["status"] == 429 and "API key" in replicate_full.json()["detail"]

        # bob has his own per-key allowance, until the whole queue is full
        assert http.post(f"/queue/{FLASH}", json={"prompt": "b"}, headers=auth(keys.bob)).status_code == 200
        total = http.post(f"/queue/{FLASH}", json={"prompt": "b"}, headers=auth(keys.bob))
        assert total.status_code == 429 and "queue is full" in total.json()["detail"]
        openai_full = http.post("/v1/images/generations", json={"prompt": "b", "model": "flux-2-flash"},
                                headers=auth(keys.bob))
        assert openai_full.status_code == 429 and openai_full.headers["retry-after"]
        assert "queue is full" in openai_full.json()["error"]["message"]

    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=keys.bob, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="flux-2-flash", prompt="b", size="64x64")
    with pytest.raises(ReplicateError) as caught:
        replicate_client(limited.url, key=keys.bob).predictions.create(model=DEV, input={"prompt": "b", **TINY})
    assert caught.value.status == 429


# ---- the job store -----------------------------------------------------------------------------------------------
def test_store_records_owners_and_filters_lists(store):
    mine = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"model": "dev"}, owner="key_a")
    store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"model": "dev"}, owner="key_b")
    keyless = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={"model": "dev"})
    assert store.get(mine.id).owner == "key_a" and store.get(keyless.id).owner is None
    assert store.status(mine.id).owner == "key_a"
    assert [job.id for job in store.list(owner="key_a")] == [mine.id]
    assert len(store.list()) == 3


def test_store_queue_depth_limits(store):
    from fluxserve.jobs.store import QueueFull

    store.max_queued_per_owner, store.max_queued = 1, 2
    store.submit(endpoint="e", dialect="fal", request={}, owner="key_a")
    with pytest.raises(QueueFull):
        store.submit(endpoint="e", dialect="fal", request={}, owner="key_a")
    store.submit(endpoint="e", dialect="fal", request={}, owner="key_b")
    with pytest.raises(QueueFull):
        store.submit(endpoint="e", dialect="fal", request={}, owner="key_c")


def test_admin_keys(store):
    _, secret = store.create_key("ops", admin=True)
    _, plain = store.create_key("team")
    assert store.authenticate(secret).admin and not store.authenticate(plain).admin
    assert [key.admin for key in store.list_keys()] == [True, False]


def test_owner_and_admin_columns_are_added_to_an_older_database(db_url):
    from sqlalchemy import create_engine, inspect, text

    JobStore(db_url).close()
    engine = create_engine(db_url)
    owner_indexes = ("ix_jobs_owner_created", "ix_jobs_owner_queue", "ix_jobs_owner_started")
    with engine.begin() as conn:  # the schema before tenants (the owner indexes came later still)
        for index in owner_indexes:
            conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN owner"))
        conn.execute(text("ALTER TABLE api_keys DROP COLUMN admin"))
        conn.execute(text("INSERT INTO api_keys (id, name, secret_hash, created_at) "
                          "VALUES ('key_old', 'old', 'x', CURRENT_TIMESTAMP)"))
    assert "owner" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    store = JobStore(db_url)
    try:
        job = store.submit(endpoint="e", dialect="fal", request={}, owner="key_a")
        assert store.get(job.id).owner == "key_a"
        assert [key.admin for key in store.list_keys()] == [False]  # older keys are not admins
    finally:
        store.close()
    assert set(owner_indexes) <= {i["name"] for i in inspect(engine).get_indexes("jobs")}
    engine.dispose()


# ---- files -------------------------------------------------------------------------------------------------------
def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _dataset_zip() -> bytes:
    import io
    import zipfile

    from PIL import Image

    image, out = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (256, 256), (10, 200, 30)).save(image, "PNG")
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("square.png", image.getvalue())
    return out.getvalue()


def _safetensors() -> bytes:
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0\0\0\0"


def test_result_files_need_the_owner_key_or_the_signed_url(server, fal_clients):
    from urllib.parse import urlsplit

    from fluxserve.api import file_urls

    result = fal_clients["alice"].run(FLASH, arguments={"prompt": "a signed file", **SMALL})
    url = result["images"][0]["url"]
    parts = urlsplit(url)
    assert "token=" in parts.query
    bare = f"{server.url}{parts.path}"
    key = parts.path.removeprefix("/files/")
    with httpx.Client(timeout=30) as http:
        signed = http.get(url)  # no header: the URL alone works (img src, client downloads)
        assert signed.status_code == 200 and signed.headers["content-type"] == "image/png"
        assert signed.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in signed.headers["content-security-policy"]
        assert http.get(bare).status_code == 401
        assert http.get(bare, headers=auth(server.keys.alice)).status_code == 200
        assert http.get(bare, headers=auth(server.keys.admin)).status_code == 200
        theirs = http.get(bare, headers=auth(server.keys.bob))
        assert theirs.status_code == 404 and theirs.json()["error_type"] == "not_found"
        for token in (file_urls.token(key, ttl_s=-10), file_urls.token("outputs/other.png"), "123.abc"):
            assert http.get(bare, params={"token": token}).status_code == 401
    assert file_urls.check(file_urls.token(key), key) and not file_urls.check(file_urls.token(key, -10), key)


def test_uploads_are_checked_owned_and_served_inert(server, fal_clients):
    alice = fal_clients["alice"]
    url = alice.upload(_png(), "image/png", "green.png")
    assert "token=" in url
    assert httpx.get(url, timeout=30).content == _png()
    lora = alice.upload(_safetensors(), "application/octet-stream", "style.safetensors")
    assert httpx.get(lora, timeout=30).headers["content-type"] == "application/vnd.safetensors"
    with pytest.raises(Exception) as caught:  # HTML declared as an image: refused on its bytes
        alice.upload(b"<html><script>alert(1)</script></html>", "image/png", "evil.png")
    assert "415" in str(caught.value) or getattr(caught.value, "status_code", None) == 415

    with httpx.Client(base_url=server.url, timeout=30) as http:
        initiated = http.post("/storage/upload/initiate", json={"content_type": "text/html", "file_name": "x.html"},
                              headers=auth(server.keys.alice)).json()
        put = http.put(initiated["upload_url"], content=b"<html></html>", headers={"content-type": "text/html"})
        assert put.status_code == 415 and "images" in put.json()["detail"]
        reserved = http.get(initiated["file_url"])  # the empty slot is never served as HTML
        assert "html" not in reserved.headers["content-type"]
        replicate_upload = http.post("/v1/files", files={"content": ("a.txt", b"just text", "text/plain")},
                                     headers=auth(server.keys.bob))
        assert replicate_upload.status_code == 415 and replicate_upload.json()["status"] == 415

        # bob cannot download alice's upload by its bare URL, nor use it as a reference
        bare = url.split("?")[0]
        assert http.get(bare, headers=auth(server.keys.bob)).status_code == 404
        assert http.get(bare, headers=auth(server.keys.alice)).status_code == 200
        edit = http.post("/fal-ai/flux-2/flash/edit", json={"prompt": "x", "image_urls": [bare], **SMALL},
                         headers=auth(server.keys.bob))
        assert edit.status_code == 422 and "not found" in str(edit.json()["detail"])

        # a training dataset (a zip) uploads, comes back as a download, and is as private as any upload
        dataset = alice.upload(_dataset_zip(), "application/zip", "dataset.zip")
        assert httpx.get(dataset, timeout=30).headers["content-type"] == "application/octet-stream"
        trainer = "/fal-ai/flux-2-klein-4b-base-trainer"
        stolen = http.post(trainer, json={"image_data_url": dataset.split("?")[0], "steps": 1},
                           headers=auth(server.keys.bob))
        assert stolen.status_code == 422 and stolen.json()["detail"][0]["loc"] == ["body", "image_data_url"]
        assert "not found on this server" in stolen.json()["detail"][0]["msg"]
        own = http.post(trainer, json={"image_data_url": dataset.split("?")[0], "steps": 1, "resolution": 64,
                                       "default_caption": "a square"}, headers=auth(server.keys.alice))
        assert own.status_code == 200, own.text


# ---- retention ---------------------------------------------------------------------------------------------------
def test_retention_sweep_deletes_old_jobs_and_files(store, tmp_path):
    from datetime import timedelta

    from sqlalchemy import update

    from fluxserve.jobs import models
    from fluxserve.jobs.retention import RetentionSweeper, sweep
    from fluxserve.jobs.store import utcnow
    from fluxserve.storage import LocalStorage

    storage = LocalStorage(tmp_path / "files")
    old_output, new_output = storage.put(_png(), "image/png"), storage.put(_png(), "image/png")
    old_upload = storage.put(_png(), "image/png", "uploads")
    preview = storage.put(_png(), "image/png", "previews")
    old = store.submit(endpoint="e", dialect="fal", request={"prompt": "old"}, owner="key_a")
    new = store.submit(endpoint="e", dialect="fal", request={"prompt": "new"}, owner="key_a")
    for job, key in ((old, old_output), (new, new_output)):
        assert store.claim("w").id == job.id
        store.progress(job.id, "w", 1, 2, "step", preview_key=preview if job is old else None)
        store.complete(job.id, "w", {"images": [{"key": key}]})
    running = store.submit(endpoint="e", dialect="fal", request={"prompt": "still running"})
    assert store.claim("w").id == running.id
    store.add_file(old_upload, "key_a")
    long_ago = utcnow() - timedelta(hours=48)
    with store._write() as conn:
        conn.execute(update(models.jobs).where(models.jobs.c.id.in_([old.id, running.id])).values(created_at=long_ago))
        conn.execute(update(models.files).where(models.files.c.key.in_([old_output, old_upload]))
                     .values(created_at=long_ago))

    assert sweep(store, storage, retention_hours=24) == (1, 3)
    assert store.get(old.id) is None and store.get(new.id) is not None and store.get(running.id) is not None
    assert not storage.exists(old_output) and not storage.exists(old_upload) and not storage.exists(preview)
    assert storage.exists(new_output)
    assert store.file_owner(old_upload) == (False, None) and store.file_owner(new_output) == (True, "key_a")
    assert sweep(store, storage, retention_hours=24) == (0, 0)

    sweeper = RetentionSweeper(store, storage, 0.001, interval_s=0.05)  # everything older than 3.6 s
    assert sweeper.interval_s == 0.05
    sweeper.start()
    sweeper.stop()


def test_keys_create_admin_command(tmp_path):
    import os
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    made = subprocess.run([sys.executable, "-m", "fluxserve", "keys", "create", "--admin", "--name", "ops",
                           "--db", db], capture_output=True, text=True, check=True, env=env, timeout=120)
    assert "admin key" in made.stderr
    listed = subprocess.run([sys.executable, "-m", "fluxserve", "keys", "list", "--db", db], capture_output=True,
                            text=True, check=True, env=env, timeout=120)
    assert "active admin" in listed.stdout
    store = JobStore(db)
    try:
        assert store.authenticate(made.stdout.strip()).admin
    finally:
        store.close()
