"""The official ``openai`` SDK, unmodified, against a real fluxserve (demo models) by base URL and key."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from dialect_server import live_server  # noqa: F401  (fixture)
from PIL import Image

from fluxserve.compat.openai import client as openai_client

FAST = {"steps": 2}  # passthrough: few denoising steps keep the demo model quick


@pytest.fixture(scope="module")
def client(live_server):  # noqa: F811
    return openai_client(live_server.url, key=live_server.key, max_retries=0, timeout=300)


def _png(color: str, size=(96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_generate_url(client, live_server):  # noqa: F811
    response = client.images.generate(model="flux-2-dev", prompt="a red cube", size="64x64", extra_body=FAST)
    assert len(response.data) == 1
    url = response.data[0].url
    assert url.startswith(live_server.url + "/files/")
    assert response.data[0].revised_prompt
    assert response.size == "64x64" and response.output_format == "png"
    image = Image.open(io.BytesIO(httpx.get(url, headers=live_server.headers()).content))
    assert image.size == (64, 64) and image.format == "PNG"


def test_generate_b64_json_n2_webp(client):
    response = client.images.generate(
        model="flux-2-dev", prompt="two blue spheres", n=2, size="80x64", response_format="b64_json",
        output_format="webp", output_compression=70, extra_body=FAST | {"seed": 7},
    )
    assert len(response.data) == 2
    for item in response.data:
        assert item.url is None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "WEBP" and image.size == (80, 64)


def test_edit_with_several_images(client, live_server):  # noqa: F811
    raw = client.images.with_raw_response.edit(
        model="flux-2-dev", prompt="combine them", image=[("a.png", _png("red")), ("b.png", _png("green"))],
        size="64x64", extra_body=FAST,
    )
    assert raw.headers.get("x-request-id")
    result = raw.parse()
    assert len(result.data) == 1 and result.data[0].url
    (job_id,) = raw.headers["x-fluxserve-job-ids"].split(",")
    job = live_server.store.get(job_id)
    assert job.dialect == "openai" and job.endpoint == "fal-ai/flux-2/edit"
    assert len(job.request["image_urls"]) == 2  # the uploads, stored once as files (deleted once answered)
    root = str(live_server.app.state.storage.root)
    assert all(u.startswith(root + "/inputs/") and u.endswith(".png") for u in job.request["image_urls"])


def test_edit_single_image_b64(client):
    result = client.images.edit(model="flux-2-dev", prompt="make it blue", image=("one.png", _png("white")),
                                size="64x64", response_format="b64_json", extra_body=FAST)
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)


def test_generate_stream_partial_and_completed(client):
    stream = client.images.generate(model="flux-2-dev", prompt="a lighthouse", size="64x64", stream=True,
                                    partial_images=2, extra_body={"steps": 4})
    events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "image_generation.completed"
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(partials) == 2  # 4 steps leave room for both previews
    assert [p.partial_image_index for p in partials] == list(range(len(partials)))
    Image.open(io.BytesIO(base64.b64decode(partials[0].b64_json))).verify()
    final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
    assert final.size == (64, 64)


def test_edit_stream(client):
    stream = client.images.edit(model="flux-2-dev", prompt="night", image=("a.png", _png("yellow")),
                                size="64x64", stream=True, extra_body=FAST)
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.completed"]


def test_errors_map_to_sdk_exceptions(client, live_server):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="flux-2-dev", prompt="x", size="4096x4096")
    assert err.value.body["param"] == "size" and err.value.request_id
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="dall-e-9", prompt="x")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="flux-2-dev", prompt="x", image=("a.png", _png("red")), mask=("m.png", _png("black")))
    assert err.value.body["param"] == "mask" and "inpaint" in err.value.body["message"]
    bad = openai_client(live_server.url, key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="flux-2-dev", prompt="x")


def test_models_list(client, live_server):  # noqa: F811
    names = [m.id for m in client.models.list()]
    assert set(live_server.app.state.catalog.openai_models) == set(names)
    assert "flux-2-dev" in names
    assert client.models.retrieve("flux-2-pro").id == "flux-2-pro"


def test_small_reference_is_a_400_naming_image(client, live_server):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="flux-2-dev", prompt="x", image=[("a.png", _png("red")),
                                                                   ("b.png", _png("red", (64, 48)))])
    assert err.value.body["param"] == "image[1]" and "at least 64 pixels" in err.value.body["message"]


def test_failed_work_is_not_retried(live_server):  # noqa: F811
    """A 5xx after the GPU work started carries x-should-retry: false, so the SDK (2 retries) makes one job."""
    import threading
    import time
    import uuid

    retrying = openai_client(live_server.url, key=live_server.key, max_retries=2, timeout=300)
    prompt = f"cancel me {uuid.uuid4()}"
    outcome: dict = {}

    def call() -> None:
        try:
            retrying.images.generate(model="flux-2-dev", prompt=prompt, size="512x512", extra_body={"steps": 50})
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    mine: list = []
    deadline = time.monotonic() + 60
    while not mine and time.monotonic() < deadline:
        mine = [j for j in live_server.store.list(dialect="openai", limit=200) if j.request.get("prompt") == prompt]
        time.sleep(0.05)
    assert mine, "the job was never submitted"
    live_server.store.request_cancel(mine[0].id)
    thread.join(120)
    error = outcome["error"]
    assert isinstance(error, openai.InternalServerError)
    assert error.response.headers["x-should-retry"] == "false" and error.body["code"] == "cancelled"
    jobs = [j for j in live_server.store.list(dialect="openai", limit=500) if j.request.get("prompt") == prompt]
    assert len(jobs) == 1
