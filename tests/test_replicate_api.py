"""Replicate dialect over plain HTTP: problem details, 422 naming fields, Prefer: wait, pagination, the shared
history of all three dialects, and the translation to canonical requests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from dialect_server import live_server  # noqa: F401  (fixture)
from PIL import Image

from fluxserve.api.replicate import translate
from fluxserve.api.replicate_schemas import ReplicateModels
from fluxserve.catalog import Catalog

DEV = "black-forest-labs/flux-2-dev"
TINY = {"aspect_ratio": "custom", "width": 64, "height": 64, "steps": 1, "go_fast": False}


@pytest.fixture(scope="module")
def models() -> ReplicateModels:
    return ReplicateModels(Catalog.load())


def _problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    assert body["status"] == status
    return body


def _data_uri(size=(96, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "input_, field",
    [
        ({}, "input.prompt"),
        ({"prompt": "x", "aspect_ratio": "5:4"}, "input.aspect_ratio"),
        ({"prompt": "x", "resolution": "3 MP"}, "input.resolution"),
        ({"prompt": "x", "output_format": "gif"}, "input.output_format"),
        ({"prompt": "x", "output_quality": 101}, "input.output_quality"),
        ({"prompt": "x", "steps": 51}, "input.steps"),
        ({"prompt": "x", "num_inference_steps": 0}, "input.num_inference_steps"),  # named as sent
        ({"prompt": "x", "num_inference_steps": 51}, "input.num_inference_steps"),
        ({"prompt": "x", "guidance": 11}, "input.guidance"),
        ({"prompt": "x", "safety_tolerance": 6}, "input.safety_tolerance"),
        ({"prompt": "x", "input_images": ["a", "b", "c", "d", "e"]}, "input.input_images"),
        ({"prompt": "x", "aspect_ratio": "custom", "width": 64}, "input.height"),
        ({"prompt": "x", "aspect_ratio": "match_input_image"}, "input.aspect_ratio"),
        ({"prompt": "x", "input_images": [_data_uri((96, 64)), _data_uri((32, 64))]}, "input.input_images.1"),
        ({"prompt": "x", "input_image": ["data:image/png;base64,AAAA"]}, "input.input_images.0"),
        ({"prompt": "x", "input_images": [__file__]}, "input.input_images.0"),  # no reading the server's disk
    ],
)
def test_invalid_input_is_422_naming_the_field(live_server, input_, field):  # noqa: F811
    body = _problem(live_server.post(f"/v1/models/{DEV}/predictions", json={"input": input_}), 422)
    assert field in [f["field"] for f in body["invalid_fields"]]
    assert field in body["detail"]


def test_not_found_and_auth(live_server):  # noqa: F811
    _problem(live_server.post("/v1/models/black-forest-labs/nope/predictions", json={"input": {"prompt": "x"}}), 404)
    _problem(live_server.get("/v1/predictions/does-not-exist"), 404)
    _problem(live_server.get("/v1/models/acme/flux"), 404)
    import httpx

    _problem(httpx.get(live_server.url + "/v1/predictions"), 401)
    _problem(live_server.post("/v1/predictions", json={"version": "deadbeef", "input": {"prompt": "x"}}), 422)
    _problem(live_server.post("/v1/predictions", json={"input": {"prompt": "x"}}), 422)


def test_prefer_wait_sync_answer_and_version_forms(live_server, models):  # noqa: F811
    version = models.version(DEV)
    for ref in (DEV, f"{DEV}:{version}", version):
        response = live_server.post("/v1/predictions", json={"version": ref, "input": {"prompt": "x", **TINY}},
                                    headers={"Prefer": "wait=60"})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "succeeded" and body["version"] == version and body["model"] == DEV
        assert isinstance(body["output"], str) and body["output"].startswith(live_server.url + "/files/")
        assert body["data_removed"] is False and body["error"] is None
        assert set(body["urls"]) == {"get", "cancel", "stream", "web"}
        assert body["created_at"].endswith("Z") and body["started_at"] and body["completed_at"]


def test_pagination(live_server):  # noqa: F811
    for i in range(3):
        live_server.post(f"/v1/models/{DEV}/predictions", json={"input": {"prompt": f"page {i}", **TINY}})
    first = live_server.get("/v1/predictions", params={"page_size": 2}).json()
    assert len(first["results"]) == 2 and first["next"]
    second = live_server.get(first["next"].removeprefix(live_server.url)).json()
    assert second["results"]
    ids = [p["id"] for p in first["results"]] + [p["id"] for p in second["results"]]
    assert len(ids) == len(set(ids))


def _finished(live_server, endpoint: str) -> float:  # noqa: F811
    from prometheus_client.parser import text_string_to_metric_families

    text = live_server.get("/metrics", headers={"Authorization": f"Bearer {live_server.admin_key}"}).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fluxserve_jobs_finished_total" and sample.labels.get("endpoint") == endpoint:
                total += sample.value
    return total


def test_all_dialects_share_one_history(live_server):  # noqa: F811
    before = _finished(live_server, "fal-ai/flux-2")
    r = live_server.post(f"/v1/models/{DEV}/predictions", json={"input": {"prompt": "shared r", **TINY}},
                         headers={"Prefer": "wait"})
    o = live_server.post("/v1/images/generations",
                         json={"prompt": "shared o", "model": "flux-2-dev", "size": "64x64", "steps": 1})
    f = live_server.post("/fal-ai/flux-2", json={"prompt": "shared f", "image_size": {"width": 512, "height": 512},
                                                  "num_inference_steps": 4},
                         headers={"Authorization": f"Key {live_server.key}"})
    assert r.status_code == 201 and o.status_code == 200, (r.text, o.text)
    assert f.status_code == 200, f.text
    replicate_id = r.json()["id"]
    openai_id = o.headers["x-fluxserve-job-ids"]
    history = {job.id: job.dialect for job in live_server.store.list(limit=1000)}
    assert history[replicate_id] == "replicate" and history[openai_id] == "openai"
    assert "fal" in history.values()
    listed = [p["id"] for p in live_server.get("/v1/predictions", params={"page_size": 1000}).json()["results"]]
    assert replicate_id in listed and openai_id not in listed  # Replicate's list shows predictions only
    _problem(live_server.get(f"/v1/predictions/{openai_id}"), 404)
    assert _finished(live_server, "fal-ai/flux-2") - before >= 3  # one set of workers and metrics for all three


def test_translation(models):
    endpoint, request = asyncio.run(translate(models, "black-forest-labs/flux-2-pro", {
        "prompt": "p", "input_image": [_data_uri()], "aspect_ratio": "16:9", "resolution": "2 MP",
        "output_format": "jpg", "output_quality": 90, "disable_safety_checker": True, "safety_tolerance": 5,
        "num_inference_steps": 12, "seed": 9, "unknown": 1,
    }))
    assert endpoint == "fal-ai/flux-2-pro/edit"
    assert (request["width"], request["height"]) == (1936, 1088)
    assert request["output_format"] == "jpeg" and request["output_quality"] == 90
    assert request["safety_checker"] is False and request["safety_tolerance"] == 5
    assert request["steps"] == 12 and request["seed"] == 9 and request["num_images"] == 1
    endpoint, request = asyncio.run(translate(models, DEV, {"prompt": "p"}))
    assert endpoint == "fal-ai/flux-2" and request["acceleration"] == "high"  # go_fast defaults on
    assert (request["width"], request["height"]) == (1024, 1024) and request["output_format"] == "webp"
    assert request["steps"] == 28 and request["guidance"] == 2.5
    _, request = asyncio.run(translate(models, "black-forest-labs/flux-2-pro", {"prompt": "p"}))
    assert request["steps"] == 30 and request["guidance"] == 2.0  # seed 003's defaults
    _, request = asyncio.run(translate(models, "black-forest-labs/flux-2-flex",
                                       {"prompt": "p", "prompt_upsampling": False}))
    assert request["expand_prompt"] is False


def test_match_input_image(models):
    _, request = asyncio.run(translate(models, DEV, {
        "prompt": "p", "input_images": [_data_uri((96, 64))], "aspect_ratio": "match_input_image",
        "resolution": "match_input_image"}))
    assert (request["width"], request["height"]) == (96, 64)


@contextlib.contextmanager
def webhook_receiver():
    """A real HTTP receiver on a free port: yields (url, the JSON bodies received so far)."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()


def _wait_for_success(received: list[dict], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not any(r["status"] == "succeeded" for r in received):
        time.sleep(0.1)


def test_webhooks_start_and_completed(live_server):  # noqa: F811
    with webhook_receiver() as (url, received):
        response = live_server.post(f"/v1/models/{DEV}/predictions", json={
            "input": {"prompt": "hook", **TINY}, "webhook": url, "webhook_events_filter": ["start", "completed"]})
        assert response.status_code == 201, response.text
        prediction_id = response.json()["id"]
        _wait_for_success(received, 60)
        assert all(r["id"] == prediction_id for r in received)
        statuses = [r["status"] for r in received]
        assert statuses[0] in ("starting", "processing") and statuses[-1] == "succeeded"
        assert received[-1]["output"].startswith(live_server.url + "/files/")
    output_only = _collect_webhooks(live_server, ["output"])
    assert [r["status"] for r in output_only] == ["succeeded"]  # no start event, one output at the end
    bad = live_server.post(f"/v1/models/{DEV}/predictions", json={
        "input": {"prompt": "x"}, "webhook": "http://x", "webhook_events_filter": ["finished"]})
    assert "webhook_events_filter" in bad.json()["detail"]


def _collect_webhooks(live_server, events: list[str]) -> list[dict]:  # noqa: F811
    """Run one prediction with ``webhook_events_filter=events``; the webhooks received until it ended."""
    with webhook_receiver() as (url, received):
        response = live_server.post(f"/v1/models/{DEV}/predictions", json={
            "input": {"prompt": "hook", **TINY}, "webhook": url, "webhook_events_filter": events},
            headers={"Prefer": "wait"})
        assert response.status_code == 201 and response.json()["status"] == "succeeded", response.text
        _wait_for_success(received, 30)
        time.sleep(0.5)  # nothing else may follow
        return list(received)


def test_failed_prediction_names_replicate_fields():
    from types import SimpleNamespace

    from fluxserve.api.replicate import error_text, replicate_field

    assert replicate_field("image_urls[2]") == "input.input_images.2"
    assert replicate_field("image_urls") == "input.input_images"
    assert replicate_field("safety_checker") == "input.disable_safety_checker"
    job = SimpleNamespace(error="image_urls[0]: bad", error_detail={"field": "image_urls[0]", "message": "bad"})
    assert error_text(job) == "input.input_images.0: bad"
