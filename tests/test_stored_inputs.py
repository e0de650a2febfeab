"""Images a request carries inline are stored once as the caller's files and referenced by its jobs (an OpenAI
edit with n=10 made three jobs, each holding the image as base64; a Replicate data URI was kept in the request
and in the recorded input), and each key's stored files are bounded by its storage quota, refused with a 429 in
every dialect's shape."""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import fal_client
import httpx
import numpy as np
import openai
import pytest
from fal_helpers import Server, settings_for
from PIL import Image
from replicate.exceptions import ReplicateError

import fluxserve.compat.fal
from fluxserve.compat.openai import client as openai_client
from fluxserve.compat.replicate import client as replicate_client
from fluxserve.jobs.file_quota import StorageQuotaExceeded
from fluxserve.jobs.store import JobStore

pytest_plugins = ["db_fixtures"]
MIB = 1024**2
DEV = "black-forest-labs/flux-2-dev"


def noise_png(side: int, seed: int = 0) -> bytes:
    """A PNG that does not compress (random pixels): its size is what the test moves around."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def row_bytes(job) -> int:
    """What a job's row holds of the request: its canonical request and its recorded input, as JSON."""
    return len(json.dumps(job.request)) + len(json.dumps(job.input))


def stored_inputs(storage_root: Path) -> dict[str, int]:
    """Files under storage other than outputs and previews (uploads, stored inputs): key -> bytes."""
    return {str(p.relative_to(storage_root)): p.stat().st_size for p in storage_root.rglob("*")
            if p.is_file() and p.relative_to(storage_root).parts[0] not in ("outputs", "previews")
            and not p.name.endswith(".content-type")}


@pytest.fixture(scope="module")
def server(demo_settings):
    settings = replace(settings_for(demo_settings, "stored-inputs"), fetch_allow="127.0.0.1")
    with Server(settings) as running:
        _, running.key = running.store.create_key("tenant")
        yield running


# ---- stored once ---------------------------------------------------------------------------------------------
def test_openai_edit_with_n10_stores_the_upload_once(server):
    """The audit's 63 MB edit with n=10, smaller: the three jobs reference one stored file; the rows hold no copy
    of it; the file is deleted once the request has ended."""
    image = noise_png(512)
    assert len(image) > 700_000
    client = openai_client(server.url, key=server.key, max_retries=0, timeout=300)
    earlier = {job.id for job in server.store.list(limit=1000)}
    stream = client.images.edit(model="flux-2-dev", prompt="make it blue", image=("big.png", image), n=10,
                                size="64x64", stream=True, extra_body={"steps": 2})
    storage_root = Path(server.settings.storage_location)
    seen_while_running = None
    completed = 0
    for event in stream:
        if event.type == "image_edit.completed":
            completed += 1
            if seen_while_running is None:  # the first image: every job of the request exists now
                jobs = [job for job in server.store.list(limit=1000) if job.id not in earlier]
                files = stored_inputs(storage_root)
                seen_while_running = (jobs, files, [server.store.file_owner(key) for key in files])
    assert completed == 10
    jobs, files, owners = seen_while_running
    assert len(jobs) == 3 and sorted(job.request["num_images"] for job in jobs) == [2, 4, 4]
    assert list(files.values()) == [len(image)]  # one file, the upload's bytes: 1x, not 3x
    (key,) = files
    assert all(job.request["image_urls"] == [str(storage_root / key)] for job in jobs)
    assert sum(row_bytes(job) for job in jobs) < len(image) / 20  # no copy in any row
    assert owners == [(True, server.store.authenticate(server.key).id)]  # the caller's file
    # the request has ended: its upload is deleted right after the stream's last event
    deadline = time.monotonic() + 10
    while (stored_inputs(storage_root) or server.store.file_owner(key)[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored_inputs(storage_root) == {}
    assert server.store.file_owner(key) == (False, None)


def test_openai_edit_without_stream_also_stores_once_and_cleans_up(server):
    image = noise_png(256, seed=1)
    client = openai_client(server.url, key=server.key, max_retries=0, timeout=300)
    raw = client.images.with_raw_response.edit(model="flux-2-dev", prompt="p", image=("a.png", image), n=5,
                                               size="64x64", extra_body={"steps": 2})
    assert len(raw.parse().data) == 5
    jobs = [server.store.get(job_id) for job_id in raw.headers["x-fluxserve-job-ids"].split(",")]
    assert len(jobs) == 2 and len({job.request["image_urls"][0] for job in jobs}) == 1
    assert sum(row_bytes(job) for job in jobs) < len(image) / 20
    assert stored_inputs(Path(server.settings.storage_location)) == {}


def test_openai_upload_stays_while_its_jobs_may_still_run(demo_settings):
    """A caller that hangs up with an Idempotency-Key may come back for its jobs: their stored image stays."""
    image = noise_png(128, seed=4)
    settings = settings_for(demo_settings, "stored-inputs-idempotent")
    with Server(settings, start_workers=False) as queued_only:
        client = openai_client(queued_only.url, max_retries=0, timeout=2)
        with pytest.raises(openai.APITimeoutError):
            client.images.edit(model="flux-2-dev", prompt="p", image=("a.png", image), size="64x64",
                               extra_headers={"Idempotency-Key": "come-back-later"})
        deadline = time.monotonic() + 30
        while not queued_only.store.list(limit=10) and time.monotonic() < deadline:
            time.sleep(0.05)
        (job,) = queued_only.store.list(limit=10)
        time.sleep(3)  # the server notices the hang-up within a second (its wait poll) and ends the request
        assert job.status == "queued"
        path = Path(job.request["image_urls"][0])
        assert path.is_file() and path.stat().st_size == len(image)


def test_replicate_data_uri_is_stored_once_as_a_file_of_the_prediction(server):
    image = noise_png(256, seed=2)
    client = replicate_client(server.url, key=server.key)
    client.poll_interval = 0.1
    prediction = client.models.predictions.create(  # (predictions.create drops the strategy for a model)
        model=DEV, input={"prompt": "p", "input_images": [io.BytesIO(image)], "aspect_ratio": "custom",
                          "width": 64, "height": 64, "steps": 2, "go_fast": False},
        file_encoding_strategy="base64")
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    job = server.store.get(prediction.id)
    assert "data:" not in json.dumps(job.request) and "data:" not in json.dumps(job.input)
    assert row_bytes(job) < len(image) / 20
    url = job.input["input_images"][0]
    assert url.startswith(f"{server.url}/files/inputs/") and "?token=" in url
    key = url.split("/files/", 1)[1].split("?", 1)[0]
    files = stored_inputs(Path(server.settings.storage_location))
    assert files[key] == len(image) and list(files.values()).count(len(image)) == 1  # one copy
    assert key in server.store.job_files(job.id)  # a file of the prediction: deleted with it
    assert prediction.input["input_images"][0] == url


# ---- the storage quota ---------------------------------------------------------------------------------------
@pytest.fixture
def quota_server(demo_settings, tmp_path):
    settings = replace(settings_for(demo_settings, f"quota-{tmp_path.name}"), max_storage_mb_per_key=1.0)
    with Server(settings) as running:
        _, running.key = running.store.create_key("tenant")
        _, running.other = running.store.create_key("other tenant")
        yield running


def test_storage_quota_in_every_dialect(quota_server):
    server = quota_server
    image = noise_png(420, seed=3)  # about 0.5 MiB: one fits the 1 MiB quota, two do not
    assert 0.5 * MIB < len(image) < 0.55 * MIB
    fluxserve.compat.fal.use(server.url, key=server.key)
    first = fal_client.upload(image, "image/png", file_name="first.png")
    assert first.startswith(f"{server.url}/files/uploads/")

    with pytest.raises(fal_client.client.FalClientHTTPError) as info:  # fal's upload
        fal_client.upload(image, "image/png", file_name="second.png")
    assert info.value.status_code == 429 and info.value.error_type == "storage_quota_exceeded"
    assert "storage quota of 1.0 MiB" in info.value.response.json()["detail"]

    headers = {"Authorization": f"Key {server.key}"}  # fal's two-step upload (the JS client's)
    started = httpx.post(f"{server.url}/storage/upload/initiate", headers=headers,
                         json={"content_type": "image/png", "file_name": "third.png"}).json()
    put = httpx.put(started["upload_url"], content=image, headers={"Content-Type": "image/png"})
    assert put.status_code == 429 and put.json()["error_type"] == "storage_quota_exceeded"

    client = openai_client(server.url, key=server.key, max_retries=0, timeout=300)
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.edit(model="flux-2-dev", prompt="p", image=("x.png", image), size="64x64")
    assert refused.value.code == "insufficient_quota" and refused.value.param == "image"

    replicate = replicate_client(server.url, key=server.key)
    for strategy in ("base64", "url"):  # a data URI in the input, and the client's /v1/files upload
        with pytest.raises(ReplicateError) as problem:
            replicate.models.predictions.create(model=DEV, input={"prompt": "p", "input_images": [io.BytesIO(image)]},
                                                file_encoding_strategy=strategy)
        assert problem.value.status == 429, strategy
        assert "storage quota" in problem.value.detail

    owner = server.store.authenticate(server.key).id
    assert server.store.stored_bytes(owner) == len(image)  # only the first upload (and the empty slot)
    assert server.store.list(limit=10) == []  # no job was made for a refused image

    fluxserve.compat.fal.use(server.url, key=server.other)  # another key has its own quota
    assert fal_client.upload(image, "image/png", file_name="theirs.png").startswith(f"{server.url}/files/")


# ---- the store ------------------------------------------------------------------------------------------------
def test_store_quota_holds_under_concurrent_uploads(db_url):
    store = JobStore(db_url)
    owner, _ = store.create_key("tenant")
    admin, _ = store.create_key("operators", admin=True)
    outcomes = []

    def upload(index: int) -> None:
        try:
            store.add_file(f"uploads/{index}.png", owner, size=MIB, limit=3 * MIB)
            outcomes.append(("stored", index))
        except StorageQuotaExceeded:
            outcomes.append(("refused", index))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcome for outcome, _ in outcomes) == ["refused"] * 5 + ["stored"] * 3
    assert store.stored_bytes(owner) == 3 * MIB

    store.add_file("uploads/slot.png", owner, size=0, limit=3 * MIB)  # a reserved slot fits...
    with pytest.raises(StorageQuotaExceeded):  # ...its bytes do not
        store.set_file_size("uploads/slot.png", 1, limit=3 * MIB)
    stored = next(index for outcome, index in outcomes if outcome == "stored")
    store.forget_files([f"uploads/{stored}.png"])  # deleting a file frees its bytes
    store.set_file_size("uploads/slot.png", MIB, limit=3 * MIB)
    store.add_file("uploads/admin.png", admin, size=10 * MIB, limit=3 * MIB)  # admin keys are not limited
    store.add_file("uploads/keyless.png", None, size=10 * MIB, limit=3 * MIB)  # nor servers without keys
    assert store.stored_bytes(owner) == 3 * MIB
    store.close()
