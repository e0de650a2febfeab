"""OpenAI dialect over plain HTTP: error shapes, n splitting, idempotent retries, size translation."""

from __future__ import annotations

import uuid

import pytest
from dialect_server import live_server  # noqa: F401  (fixture)

from fluxserve.api.openai import translate
from fluxserve.catalog import Catalog


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def _error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers.get("x-request-id")
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert body["param"] == param
    return body


@pytest.mark.parametrize(
    "payload, status, param",
    [
        ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
        ({"prompt": "x", "size": "huge"}, 400, "size"),
        ({"prompt": "x", "aspect_ratio": "wide"}, 400, "aspect_ratio"),
        ({"prompt": "x", "resolution": "tiny"}, 400, "resolution"),
        ({"prompt": "x", "n": 11}, 400, "n"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": "many"}, 400, "n"),
        ({"prompt": "x", "model": "gpt-image-1"}, 404, "model"),
        ({"size": "64x64"}, 400, "prompt"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
        ({"prompt": "x", "output_format": "bmp"}, 400, "output_format"),
        ({"prompt": "x", "output_compression": 101}, 400, "output_compression"),
        ({"prompt": "x", "steps": 0}, 400, "steps"),
        ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"),
        ({"prompt": "x", "safety_tolerance": 9}, 400, "safety_tolerance"),
    ],
)
def test_generation_errors(live_server, payload, status, param):  # noqa: F811
    _error(live_server.post("/v1/images/generations", json=payload), status, param)


def test_unknown_model_code(live_server):  # noqa: F811
    body = _error(live_server.post("/v1/images/generations", json={"prompt": "x", "model": "nope"}), 404, "model")
    assert body["code"] == "model_not_found"


def test_missing_and_bad_key(live_server):  # noqa: F811
    import httpx

    response = httpx.post(live_server.url + "/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 401 and response.headers.get("x-request-id")
    assert "message" in response.json()["error"]
    response = httpx.post(live_server.url + "/v1/images/generations", json={"prompt": "x"},
                          headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


def test_edit_errors(live_server):  # noqa: F811
    files = [("image", ("a.png", b"\x89PNG....", "image/png")), ("mask", ("m.png", b"\x89PNG....", "image/png"))]
    body = _error(live_server.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400, "mask")
    assert "not supported" in body["message"]
    _error(live_server.post("/v1/images/edits", data={"prompt": "x", "model": "flux-2-dev"},
                            files={"unused": ("u.txt", b"x")}), 400, "image")
    too_many = [("image[]", (f"{i}.png", b"\x89PNG", "image/png")) for i in range(11)]
    _error(live_server.post("/v1/images/edits", data={"prompt": "x"}, files=too_many), 400, "image")


def test_n10_splits_into_batches_of_4_with_consecutive_seeds(catalog):
    spec, requests, _ = translate({"prompt": "p", "n": 10, "seed": 100}, catalog, [], edit=False)
    assert spec.id == "fal-ai/flux-2"
    assert [(r["num_images"], r["seed"]) for r in requests] == [(4, 100), (4, 104), (2, 108)]
    _, requests, _ = translate({"prompt": "p", "n": 3}, catalog, [], edit=False)
    assert [(r["num_images"], r["seed"]) for r in requests] == [(3, None)]


def test_translation_of_sizes_and_passthrough(catalog):
    _, (request,), options = translate(
        {"prompt": "p", "aspect_ratio": "16:9", "resolution": "1K", "num_inference_steps": 9, "guidance": 4,
         "enable_safety_checker": "false", "output_format": "jpg", "output_compression": 55,
         "quality": "hd", "style": "vivid", "background": "transparent", "user": "u1", "moderation": "low",
         "some_unknown_provider_field": 1},
        catalog, [], edit=False,
    )
    assert (request["width"], request["height"]) == (1365, 768)
    assert request["steps"] == 9 and request["guidance"] == 4 and request["safety_checker"] is False
    assert request["output_format"] == "jpeg" and request["output_quality"] == 55
    assert request["safety_tolerance"] == 5
    assert options["response_format"] == "url"
    _, (request,), _ = translate({"prompt": "p", "size": "1024x1024", "aspect_ratio": "16:9"}, catalog, [], False)
    assert (request["width"], request["height"]) == (1024, 1024)
    _, (request,), _ = translate({"prompt": "p", "size": "auto"}, catalog, [], False)
    assert request["width"] is None and request["height"] is None
    spec, (request,), _ = translate({"prompt": "p", "model": "flux-2-pro"}, catalog, ["data:x"], edit=True)
    assert spec.id == "fal-ai/flux-2-pro/edit" and request["image_urls"] == ["data:x"]


def test_stream_sets_partial_images(catalog):
    _, (request,), options = translate({"prompt": "p", "stream": True, "partial_images": 3}, catalog, [], False)
    assert request["partial_images"] == 3 and options["stream"]
    _, (request,), _ = translate({"prompt": "p", "partial_images": 3}, catalog, [], False)
    assert request["partial_images"] == 0  # previews only matter when streaming


def test_n_jobs_run_and_idempotency_key_reuses_them(live_server):  # noqa: F811
    payload = {"prompt": "grid", "model": "flux-2-dev", "n": 5, "seed": 3, "size": "64x64", "steps": 1,
               "response_format": "b64_json"}
    key = str(uuid.uuid4())
    first = live_server.post("/v1/images/generations", json=payload, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert len(first.json()["data"]) == 5
    ids = first.headers["x-fluxserve-job-ids"].split(",")
    jobs = [live_server.store.get(i) for i in ids]
    assert [(j.request["num_images"], j.request["seed"]) for j in jobs] == [(4, 3), (1, 7)]
    again = live_server.post("/v1/images/generations", json=payload, headers={"Idempotency-Key": key})
    assert again.headers["x-fluxserve-job-ids"].split(",") == ids
    assert again.json()["data"] == first.json()["data"]


def test_sdk_retry_of_same_body_reattaches(live_server):  # noqa: F811
    payload = {"prompt": "retry me", "model": "flux-2-dev", "size": "64x64", "steps": 1}
    first = live_server.post("/v1/images/generations", json=payload)
    retry = live_server.post("/v1/images/generations", json=payload, headers={"x-stainless-retry-count": "1"})
    fresh = live_server.post("/v1/images/generations", json=payload)
    assert retry.headers["x-fluxserve-job-ids"] == first.headers["x-fluxserve-job-ids"]
    assert fresh.headers["x-fluxserve-job-ids"] != first.headers["x-fluxserve-job-ids"]
