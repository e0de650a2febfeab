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


def _png_bytes(size=(96, 64), color="red") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _openai_jobs(live_server) -> int:  # noqa: F811
    return len(live_server.store.list(dialect="openai", limit=10000))


def test_reference_errors_name_the_parameter_the_client_sent(live_server):  # noqa: F811
    import base64

    before = _openai_jobs(live_server)
    small, ok = _png_bytes((64, 48)), _png_bytes()
    body = _error(live_server.post("/v1/images/edits", data={"prompt": "x"},
                                   files={"image": ("s.png", small, "image/png")}), 400, "image")
    assert "64x48" in body["message"] and "at least 64 pixels" in body["message"]
    assert "image_urls" not in body["message"]
    files = [("image[]", ("a.png", ok, "image/png")), ("image[]", ("b.png", small, "image/png"))]
    _error(live_server.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400, "image[1]")
    body = _error(live_server.post("/v1/images/edits", data={"prompt": "x"},
                                   files={"image": ("g.png", b"not an image", "image/png")}), 400, "image")
    assert "could not read" in body["message"]
    uri = "data:image/png;base64," + base64.b64encode(small).decode()
    _error(live_server.post("/v1/images/edits", json={"prompt": "x", "images": [{"image_url": uri}]}), 400,
           "images[0].image_url")
    _error(live_server.post("/v1/images/edits", data={"prompt": "x", "image_url": uri}), 400, "image_url")
    body = _error(live_server.post("/v1/images/edits", data={"prompt": "x", "image_url": __file__}), 400,
                  "image_url")  # a path on the server's disk is not an image the caller may name
    assert "http(s) URL or a data URI" in body["message"]
    assert _openai_jobs(live_server) == before  # rejected before any job was made


def test_json_edit_with_image_url(live_server):  # noqa: F811
    import base64

    uri = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    response = live_server.post("/v1/images/edits", json={
        "prompt": "x", "images": [{"image_url": uri}], "image_url": uri, "size": "64x64", "steps": 1})
    assert response.status_code == 200, response.text
    (job_id,) = response.headers["x-fluxserve-job-ids"].split(",")
    urls = live_server.store.get(job_id).request["image_urls"]  # each data URI stored once, as a file
    root = str(live_server.app.state.storage.root)
    assert len(urls) == 2 and all(url.startswith(root + "/inputs/") for url in urls)


def test_n_on_single_image_models_runs_parallel_jobs(catalog):
    spec, requests, _ = translate({"prompt": "p", "n": 3, "seed": 5, "model": "flux-2-pro"}, catalog, [], False)
    assert spec.schema == "pro"
    assert [(r["num_images"], r["seed"]) for r in requests] == [(1, 5), (1, 6), (1, 7)]
    _, requests, _ = translate({"prompt": "p", "n": 10, "model": "flux-2-klein-4b"}, catalog, [], False)
    assert [r["num_images"] for r in requests] == [4, 4, 2]


def test_internal_field_names_are_translated(catalog):
    from fluxserve.api.openai import openai_param

    names = ["image[0]", "image[1]", "image_url"]
    assert openai_param("image_urls[1]", names) == "image[1]"
    assert openai_param("image_urls[2]", names) == "image_url"
    assert openai_param("image_urls", names) == "image"
    assert openai_param("width") == "size" and openai_param("num_images") == "n"
    assert openai_param("output_quality") == "output_compression"


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("gif", "GIF"), ("avif", "AVIF")])
def test_output_formats(live_server, output_format, pil_format):  # noqa: F811
    import base64
    import io

    from PIL import Image

    response = live_server.post("/v1/images/generations", json={
        "prompt": "fmt", "size": "64x64", "steps": 1, "response_format": "b64_json",
        "output_format": output_format, "output_compression": 60})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output_format"] == output_format and body["size"] == "64x64"
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.format == pil_format and image.size == (64, 64)
