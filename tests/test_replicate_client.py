"""The official ``replicate`` client, unmodified, against a real fluxserve (demo models) by base URL and key."""

from __future__ import annotations

import io

import httpx
import pytest
import replicate
from dialect_server import live_server  # noqa: F401  (fixture)
from PIL import Image
from replicate.exceptions import ReplicateError

from fluxserve.compat.replicate import client as replicate_client

DEV = "black-forest-labs/flux-2-dev"
TINY = {"aspect_ratio": "custom", "width": 64, "height": 64, "steps": 2, "go_fast": False}


@pytest.fixture(scope="module")
def client(live_server):  # noqa: F811
    c = replicate_client(live_server.url, key=live_server.key)
    c.poll_interval = 0.1
    return c


def _download(live_server, url: str) -> Image.Image:  # noqa: F811
    response = httpx.get(url, headers=live_server.headers())
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_run_returns_one_file_url(client, live_server):  # noqa: F811
    output = client.run(DEV, input={"prompt": "a red cube", **TINY})
    assert isinstance(output, str) and output.startswith(live_server.url + "/files/")
    image = _download(live_server, output)
    assert image.format == "WEBP" and image.size == (64, 64)  # webp is Replicate's default


def test_run_by_version_and_png(client, live_server):  # noqa: F811
    model = client.models.get(DEV)
    version = model.latest_version.id
    output = client.run(f"{DEV}:{version}", input={"prompt": "a cube", "output_format": "png", **TINY})
    assert _download(live_server, str(output)).format == "PNG"


def test_model_schema(client):
    model = client.models.get(DEV)
    assert model.owner == "black-forest-labs" and model.name == "flux-2-dev"
    schemas = model.latest_version.openapi_schema["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert props["aspect_ratio"]["default"] == "1:1"
    assert "match_input_image" in props["aspect_ratio"]["enum"] and "custom" in props["aspect_ratio"]["enum"]
    assert props["resolution"]["enum"] == ["match_input_image", "0.5 MP", "1 MP", "2 MP", "4 MP"]
    assert props["output_format"]["enum"] == ["webp", "jpg", "png"] and props["output_quality"]["default"] == 80
    assert props["input_images"]["maxItems"] == 4 and props["go_fast"]["default"] is True
    assert schemas["Output"] == {"type": "string", "format": "uri", "title": "Output"}
    pro = client.models.get("black-forest-labs/flux-2-pro").latest_version.openapi_schema
    pro_props = pro["components"]["schemas"]["Input"]["properties"]
    assert pro_props["steps"]["default"] == 30 and pro_props["guidance"]["default"] == 2  # seed 003
    assert pro_props["steps"]["maximum"] == 50 and pro_props["guidance"]["maximum"] == 10
    flex = client.models.get("black-forest-labs/flux-2-flex").latest_version.openapi_schema
    assert "prompt_upsampling" in flex["components"]["schemas"]["Input"]["properties"]
    assert [v.id for v in client.models.get(DEV).versions.list()] == [model.latest_version.id]


def test_create_wait_reload(client, live_server):  # noqa: F811
    prediction = client.predictions.create(model=DEV, input={"prompt": "a boat", "seed": 42, **TINY})
    assert prediction.status in ("starting", "processing", "succeeded")
    assert prediction.urls["get"].endswith(f"/v1/predictions/{prediction.id}")
    prediction.wait()
    assert prediction.status == "succeeded"
    assert prediction.output.startswith(live_server.url)
    assert prediction.metrics["predict_time"] >= 0
    assert "Using seed: 42" in prediction.logs
    assert prediction.progress is not None and prediction.progress.current == prediction.progress.total == 2
    assert prediction.input["seed"] == 42 and prediction.model == DEV
    prediction.reload()
    assert prediction.status == "succeeded" and prediction.completed_at.endswith("Z")


def test_prefer_wait_short_returns_starting(client, live_server):  # noqa: F811
    with live_server.workers_paused():  # the prediction cannot finish within the wait
        prediction = client.models.predictions.create(model=DEV, input={"prompt": "slow", **TINY}, wait=1)
        assert prediction.status == "starting"  # not done in 1 s: the client must poll
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.output.startswith(live_server.url)


def test_cancel(client):
    prediction = client.predictions.create(
        model=DEV, input={"prompt": "cancel me", "aspect_ratio": "custom", "width": 512, "height": 512,
                          "steps": 50, "go_fast": False})
    prediction.cancel()
    prediction.wait()
    assert prediction.status == "canceled"
    assert prediction.output is None


def test_stream(client):
    events = list(client.stream(DEV, input={"prompt": "a stream", **TINY}))
    kinds = [e.event.value for e in events]
    assert kinds[-1] == "done"
    assert "logs" in kinds and "output" in kinds
    output = next(e for e in events if e.event.value == "output")
    assert str(output).startswith("http")
    assert all(e.id for e in events)


def test_prediction_stream_after_create(client):
    prediction = client.predictions.create(model=DEV, input={"prompt": "p", **TINY}, stream=True)
    kinds = [e.event.value for e in prediction.stream()]
    assert kinds[-2:] == ["output", "done"]


def test_list_predictions(client):
    page = client.predictions.list()
    assert len(page.results) >= 1
    assert all(p.model.startswith("black-forest-labs/") for p in page.results)


def test_client_errors(client, live_server):  # noqa: F811
    with pytest.raises(ReplicateError) as err:
        client.run(DEV, input={"prompt": "x", "aspect_ratio": "5:4"})
    assert err.value.status == 422 and "aspect_ratio" in err.value.detail
    with pytest.raises(ReplicateError) as err:
        client.run("black-forest-labs/flux-9", input={"prompt": "x"})
    assert err.value.status == 404
    with pytest.raises(ReplicateError) as err:
        replicate_client(live_server.url, key="wrong").run(DEV, input={"prompt": "x"})
    assert err.value.status == 401
    assert isinstance(replicate.Client, type)
