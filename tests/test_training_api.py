"""LoRA training through fal's trainer API on the job queue, on the CPU with the demo models: bad datasets are
a 422 naming the field before any job exists; the official ``fal_client`` subscribes to a training job with
``step n/N`` and loss in its logs and gets fal's two files, whose signed URLs download a LoRA that loads; a
cancel stops a training job; and a trained LoRA's URL, given to ``fal-ai/flux-2/lora``, changes its output
(scale 0 gives the base output back) with no download from outside the server."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zipfile
import zlib
from dataclasses import replace

import fal_client
import httpx
import numpy as np
import pytest
from fal_helpers import SMALL, Server, settings_for
from PIL import Image
from safetensors import safe_open
from sqlalchemy import text
from webhook_receivers import SigningReceiver

import fluxserve.compat.fal

KLEIN_TRAINER = "fal-ai/flux-2-klein-4b-base-trainer"
DEV_TRAINER = "fal-ai/flux-2-trainer"
FAST = {"resolution": 64, "learning_rate": 3e-2}  # the demo transformer is tiny: a high rate shows in few steps


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "training_api")) as running:
        fluxserve.compat.fal.use(running.url)
        yield running


def square(colour: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (256, 256), colour)
    image.paste((255, 255, 255), (64, 64, 128, 128))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def zip_uri(files: dict[str, bytes]) -> str:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return "data:application/zip;base64," + base64.b64encode(out.getvalue()).decode()


DATASET = zip_uri({"red.png": square((220, 30, 30)), "red.txt": b"a red square",
                   "blue.png": square((30, 40, 200)), "blue.txt": b"a blue square"})


def job_count(server) -> int:
    with server.store.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs")).scalar()


@pytest.mark.parametrize(("body", "field"), [
    ({"image_data_url": "data:application/zip;base64," + base64.b64encode(b"not a zip at all").decode()},
     "image_data_url"),
    ({"image_data_url": zip_uri({"notes.txt": b"no images here"})}, "image_data_url"),
    ({"image_data_url": zip_uri({"../escape.png": square((1, 2, 3))}), "default_caption": "x"}, "image_data_url"),
    ({"image_data_url": "/etc/passwd"}, "image_data_url"),
    ({"image_data_url": zip_uri({"red.png": square((220, 30, 30))})}, "default_caption"),
    ({"image_data_url": DATASET, "steps": 0}, "steps"),
    ({"image_data_url": DATASET, "learning_rate": 0}, "learning_rate"),
    ({"image_data_url": DATASET, "output_lora_format": "ckpt"}, "output_lora_format"),
    ({}, "image_data_url"),
])
def test_bad_input_is_a_422_naming_the_field_and_makes_no_job(server, body, field):
    before = job_count(server)
    response = httpx.post(f"{server.url}/queue/{KLEIN_TRAINER}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"][:2] == ["body", field], detail
    assert job_count(server) == before


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` and which holds a few bytes of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("files", "message"), [
    ({f"{i:03d}.png": png_header_only(2048, 2048) for i in range(300)}, "the images total more than 1024 MP"),
    ({"huge.png": png_header_only(20000, 20000)}, "huge.png: image is 20000x20000"),
    ({"ok.png": square((1, 2, 3)), "bomb.bmp": b"\0" * (8 * 1024**2)}, "bomb.bmp expands"),
    ({f"{i:04d}.png": b"" for i in range(1001)}, "holds 1001 files; at most 1000"),
    ({"red.png": square((220, 30, 30)), "red.txt": b"x" * (65 * 1024)}, "a caption may have at most 64 KiB"),
])
def test_the_dataset_is_checked_by_its_headers_at_submit(server, files, message):
    """Each archive is refused from what its headers declare (none of these pixels exist): a 422 naming
    ``image_data_url`` on both the queue and the synchronous route, and no job."""
    before = job_count(server)
    for route in (f"/queue/{DEV_TRAINER}", f"/{DEV_TRAINER}"):
        response = httpx.post(server.url + route, json={"image_data_url": zip_uri(files), "default_caption": "x"},
                              timeout=60)
        assert response.status_code == 422, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", "image_data_url"] and message in detail["msg"], detail
    assert job_count(server) == before


def test_an_image_whose_pixels_do_not_decode_fails_the_job_on_the_worker(server):
    """Its header is sound, so the submit is accepted; the worker, which decodes, ends the job naming the file."""
    uri = zip_uri({"red.png": square((220, 30, 30)), "broken.png": png_header_only(256, 256)})
    response = httpx.post(f"{server.url}/queue/{KLEIN_TRAINER}",
                          json={"image_data_url": uri, "default_caption": "x", "steps": 2, **FAST}, timeout=60)
    assert response.status_code == 200, response.text
    job = server.store.wait(response.json()["request_id"], timeout=120)
    assert job.status == "failed" and "broken.png" in job.error and "could not decode" in job.error, job.error


def test_fal_client_trains_a_lora_with_step_and_loss_logs(server, tmp_path):
    updates = []
    result = fal_client.subscribe(KLEIN_TRAINER, arguments={"image_data_url": DATASET, "steps": 6, **FAST},
                                  with_logs=True, on_queue_update=updates.append)
    messages = [entry["message"] for update in updates for entry in (getattr(update, "logs", None) or [])]
    assert "step 6/6" in " ".join(messages)
    assert any(m.startswith("step 1/6 loss ") for m in messages), messages
    assert "training placement: everything in host memory on cpu" in messages

    lora, config = result["diffusers_lora_file"], result["config_file"]
    assert lora["content_type"] == "application/vnd.safetensors"
    assert lora["file_name"].endswith(".safetensors") and config["content_type"] == "application/json"
    assert lora["url"].startswith(server.url + "/files/loras/") and "token=" in lora["url"]
    weights = httpx.get(lora["url"], timeout=60)  # the signed URL works without a key
    assert weights.status_code == 200 and len(weights.content) == lora["file_size"]
    path = tmp_path / lora["file_name"]
    path.write_bytes(weights.content)
    with safe_open(str(path), framework="pt") as tensors:
        keys = list(tensors.keys())
    assert keys and all(key.startswith("transformer.") for key in keys)
    settings = httpx.get(config["url"], timeout=60).json()
    assert settings["model"] == "klein-4b-base" and settings["steps"] == 6 and settings["images"] == 2


def test_a_data_uri_dataset_is_stored_once_and_the_job_holds_its_url(server):
    handle = fal_client.submit(KLEIN_TRAINER, arguments={"image_data_url": DATASET, "steps": 2, **FAST})
    job = server.store.get(handle.request_id)
    stored = job.request["image_data_url"]
    assert stored.startswith(server.url + "/files/datasets/") and "token=" in stored
    assert job.input["image_data_url"] == stored  # the recorded input too: no archive in the job's row
    assert "data:" not in json.dumps(job.request) + json.dumps(job.input)
    key = job.request["dataset_key"]
    assert key.startswith("datasets/") and server.store.file_owner(key)[0]
    assert base64.b64decode(DATASET.split(",", 1)[1]) == httpx.get(stored, timeout=60).content
    assert handle.get()["diffusers_lora_file"]["file_size"] > 0
    history = httpx.get(f"{server.url}/v1/models/requests/by-endpoint",
                        params={"endpoint_id": KLEIN_TRAINER, "request_id": handle.request_id, "expand": "payloads"},
                        timeout=60)
    assert DATASET not in history.text


def test_an_uploaded_dataset_is_read_from_storage(server):
    archive = base64.b64decode(DATASET.split(",", 1)[1])
    url = fal_client.upload(archive, "application/zip", file_name="dataset.zip")
    assert url.startswith(server.url + "/files/")
    result = fal_client.subscribe(KLEIN_TRAINER, arguments={"image_data_url": url, "steps": 2, **FAST})
    assert result["config_file"]["file_size"] > 0
    missing = httpx.post(f"{server.url}/{KLEIN_TRAINER}",
                         json={"image_data_url": server.url + "/files/uploads/nothing-here.zip", "steps": 2},
                         timeout=60)
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "image_data_url"]
    assert "not found on this server" in missing.json()["detail"][0]["msg"]


def test_the_edit_trainer_learns_from_start_end_pairs(server):
    pairs = zip_uri({"a_start.png": square((128, 128, 128)), "a_end.png": square((220, 30, 30)),
                     "a.txt": b"make it red"})
    response = httpx.post(f"{server.url}/queue/{KLEIN_TRAINER}/edit", json={"image_data_url": DATASET}, timeout=60)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][1] == "image_data_url"
    enqueued = []
    result = fal_client.subscribe(f"{KLEIN_TRAINER}/edit", arguments={"image_data_url": pairs, "steps": 2, **FAST},
                                  on_enqueue=enqueued.append)
    config = httpx.get(result["config_file"]["url"], timeout=60).json()
    assert config["edit"] is True and config["images"] == 1

    # deleting the request's payloads deletes its files, as for generated images
    deleted = httpx.delete(f"{server.url}/v1/models/requests/{enqueued[0]}/payloads", timeout=60)
    assert deleted.status_code == 200 and len(deleted.json()["cdn_delete_results"]) == 2
    assert httpx.get(result["diffusers_lora_file"]["url"], timeout=60).status_code == 404


def test_cancel_stops_a_training_job(server):
    handle = fal_client.submit(KLEIN_TRAINER, arguments={"image_data_url": DATASET, "steps": 10_000, **FAST})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = server.store.get(handle.request_id)
        if job.step:
            break
        time.sleep(0.1)
    assert job.step, "the training job never reported a step"
    fal_client.cancel(KLEIN_TRAINER, handle.request_id)
    final = None
    for event in handle.iter_events(with_logs=True):
        final = event
    assert isinstance(final, fal_client.Completed) and final.error_type == "cancelled"
    job = server.store.get(handle.request_id)
    assert job.status == "cancelled" and job.step < 10_000


def test_a_training_job_has_the_gpu_to_itself(demo_settings, server):
    """Two workers share the device's engine: while one trains, the other claims nothing (a generation waits in
    the queue rather than on the busy GPU), and takes it once the training job ends."""
    settings = replace(settings_for(demo_settings, "training_whole_gpu"), workers_per_device=2)
    with Server(settings) as running:
        fluxserve.compat.fal.use(running.url)
        try:
            training = fal_client.submit(KLEIN_TRAINER, arguments={"image_data_url": DATASET, "steps": 10_000, **FAST})
            deadline = time.monotonic() + 120
            while not running.store.get(training.request_id).step and time.monotonic() < deadline:
                time.sleep(0.1)
            assert running.store.get(training.request_id).step, "the training job never reported a step"
            generation = fal_client.submit("fal-ai/flux-2/klein/4b", arguments={"prompt": "a cat", **SMALL})
            for _ in range(10):  # the idle worker would have claimed it within its poll interval
                time.sleep(0.2)
                assert running.store.get(generation.request_id).status == "queued"
            assert running.store.get(training.request_id).status == "running"
            fal_client.cancel(KLEIN_TRAINER, training.request_id)
            assert generation.get()["images"]
            assert running.store.get(training.request_id).status == "cancelled"
        finally:
            fluxserve.compat.fal.use(server.url)  # the module's server again


@pytest.mark.parametrize(("trainer", "endpoint", "model"), [
    (DEV_TRAINER, "fal-ai/flux-2/lora", "dev"),
    (KLEIN_TRAINER, "fal-ai/flux-2/klein/4b/base/lora", "klein-4b-base"),
])
def test_a_trained_lora_url_changes_the_lora_endpoint(server, trainer, endpoint, model):
    result = fal_client.subscribe(trainer, arguments={"image_data_url": DATASET, "steps": 20, **FAST})
    url = result["diffusers_lora_file"]["url"]

    def image(loras: list[dict]) -> np.ndarray:
        out = fal_client.run(endpoint, arguments={
            "prompt": "a red square", "seed": 5, "num_inference_steps": 4, "loras": loras, **SMALL})
        data = httpx.get(out["images"][0]["url"], timeout=60).content
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)

    base = image([])
    changed = np.abs(image([{"path": url, "scale": 1}]) - base).mean()
    unscaled = np.abs(image([{"path": url, "scale": 0}]) - base).mean()
    assert changed > 1.0  # of 255: the LoRA shows
    assert unscaled < changed / 10  # scale 0 is the base model, up to rounding in the adapter's path
    config = json.loads(httpx.get(result["config_file"]["url"], timeout=60).content)
    assert config["model"] == model


@pytest.mark.usefixtures("loopback_fetches")  # the receiver listens on 127.0.0.1
def test_a_training_webhook_carries_the_files(server):
    receiver = SigningReceiver()
    try:
        response = httpx.post(f"{server.url}/queue/{KLEIN_TRAINER}", params={"fal_webhook": receiver.url},
                              json={"image_data_url": DATASET, "steps": 2, **FAST}, timeout=60)
        assert response.status_code == 200, response.text
        received = receiver.wait_for(bool, timeout=120)
    finally:
        receiver.close()
    assert received, "no webhook arrived"
    body = received[0].json
    assert body["status"] == "OK" and body["request_id"] == response.json()["request_id"]
    assert set(body["payload"]) == {"diffusers_lora_file", "config_file"}
    assert body["payload"]["config_file"]["url"].startswith(server.url + "/files/loras/")


def test_workers_take_only_the_job_kinds_they_are_given(tmp_path):
    from fluxserve.jobs.store import JobStore
    from fluxserve.request import GenerationRequest, TrainingRequest

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    training = TrainingRequest(model="klein-4b-base", image_data_url=DATASET).model_dump(mode="json")
    trained = store.submit(endpoint=KLEIN_TRAINER, dialect="fal", request=training)
    generated = store.submit(endpoint="fal-ai/flux-2", dialect="fal",
                             request=GenerationRequest(model="dev", prompt="a cat").model_dump(mode="json"))
    assert (trained.kind, generated.kind) == ("train", "generate")
    assert store.claim("generator", kinds=["generate"]).id == generated.id
    assert store.claim("generator", kinds=["generate"]) is None  # the training job waits for a trainer
    assert store.claim("trainer", kinds=["train"]).id == trained.id


def test_worker_refuses_an_unknown_job_kind(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fluxserve", "worker", "--demo", "--data-dir", str(tmp_path),
                           "--jobs", "generate,paint"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--jobs: 'generate,paint' is not" in done.stderr


def test_a_lora_in_a_data_uri_is_written_once_and_checked(tmp_path):
    """The form a trained LoRA takes from a storage without local files (an object store)."""
    import torch
    from safetensors.torch import save

    from fluxserve.engine.lora import resolve_lora
    from fluxserve.request import InputError

    data = save({"transformer.proj.lora_A.weight": torch.ones(2, 2)})
    uri = "data:application/vnd.safetensors;base64," + base64.b64encode(data).decode()
    first, second = resolve_lora(uri, tmp_path), resolve_lora(uri, tmp_path)
    assert first.path == second.path and first.path.read_bytes() == data
    with pytest.raises(InputError) as refused:
        resolve_lora("data:application/octet-stream;base64," + base64.b64encode(b"not weights").decode(), tmp_path)
    assert refused.value.field == "loras[0].path"
