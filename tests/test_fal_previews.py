"""Previews over fal's queue (``X-Fluxserve-Previews``): the header sets the canonical ``partial_images``, the
status logs carry each preview's signed ``preview_url`` to the request's owner only, and a bad value is a 422
naming the header. Also ``/api/info`` (demo weights or not) and the reference limits in ``/api/endpoints``."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import pytest
from fal_helpers import Server, settings_for

DEV = "fal-ai/flux-2"
HEADER = "X-Fluxserve-Previews"
SMALL_DEV = {"prompt": "a lighthouse", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 8}


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "previews"), auth_required=True) as running:
        yield running


def key_client(server, name: str) -> httpx.Client:
    _, secret = server.store.create_key(name)
    server.app.state.auth.forget()
    return httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Key {secret}"})


def wait_logs(client: httpx.Client, status_url: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(status_url, params={"logs": "1"}).json()
        if body["status"] == "COMPLETED":
            return body
        time.sleep(0.2)
    raise AssertionError(f"not completed after {timeout}s: {body}")


def test_previews_reach_the_owner_only(server):
    with key_client(server, "owner") as owner, key_client(server, "other") as other:
        queued = owner.post("/queue/" + DEV, json=SMALL_DEV, headers={HEADER: "2"})
        assert queued.status_code == 200, queued.text
        job_id = queued.json()["request_id"]
        body = wait_logs(owner, queued.json()["status_url"])
        assert "error" not in body, body
        assert server.store.get(job_id).request["partial_images"] == 2

        previews = [line for line in body["logs"] if "preview_url" in line]
        assert [line["message"] for line in previews] == ["step 3/8", "step 5/8"]
        for line in previews:
            assert line["preview_url"].startswith(server.url + "/files/previews/")
            image = httpx.get(line["preview_url"])  # signed: no key needed, like the output's URL
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        unsigned = previews[0]["preview_url"].split("?")[0]
        assert httpx.get(unsigned).status_code == 401
        assert other.get(unsigned).status_code == 404  # another key without the signed URL: as if missing

        assert other.get(queued.json()["status_url"], params={"logs": "1"}).status_code == 404
        with other.stream("GET", queued.json()["status_url"] + "/stream", params={"logs": "1"}) as stream:
            assert stream.status_code == 404

        # the status stream carries them too
        with owner.stream("GET", queued.json()["status_url"] + "/stream", params={"logs": "1"}) as stream:
            text = "".join(stream.iter_text())
        assert text.count('"preview_url"') == 2


def test_no_previews_without_the_header(server):
    with key_client(server, "plain") as client:
        queued = client.post("/queue/" + DEV, json={**SMALL_DEV, "num_inference_steps": 4})
        body = wait_logs(client, queued.json()["status_url"])
        assert body["logs"] and not any("preview_url" in line for line in body["logs"])
        assert server.store.get(queued.json()["request_id"]).request["partial_images"] == 0


@pytest.mark.parametrize("value", ["4", "-1", "two", "1.5"])
def test_a_bad_previews_header_is_a_422_naming_it(server, value):
    with key_client(server, "bad") as client:
        response = client.post("/queue/" + DEV, json=SMALL_DEV, headers={HEADER: value})
        assert response.status_code == 422
        (error,) = response.json()["detail"]
        assert error["loc"] == ["header", "x-fluxserve-previews"] and value in error["msg"]
        assert client.post("/run/" + DEV, json=SMALL_DEV, headers={HEADER: value}).status_code == 422


def test_info_says_whether_demo_weights_are_loaded(server, demo_settings):
    assert httpx.get(server.url + "/api/info").json() == {"demo": True}  # no key needed
    real = replace(settings_for(demo_settings, "real-weights"), demo=False)
    with Server(real, start_workers=False) as other:
        assert httpx.get(other.url + "/api/info").json() == {"demo": False}


def test_endpoints_list_the_reference_limits(server):
    items = {item["endpoint_id"]: item for item in httpx.get(server.url + "/api/endpoints").json()}
    assert items[DEV + "/edit"]["max_input_megapixels"] == 14
    assert items[DEV + "/edit"]["max_references"] == 10
    assert "max_input_megapixels" not in items[DEV]
