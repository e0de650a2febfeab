"""The fal dialect over real HTTP (uvicorn on a free port, demo models): URL layouts, validation errors in
FastAPI's shape for every schema family, queue semantics (priorities, timeouts, cancel), store-io, webhooks,
uploads, auth, docs, metrics and a restart that keeps an accepted job."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fal_helpers import SMALL, Server, settings_for
from PIL import Image

from fluxserve.config import Settings

TURBO = "fal-ai/flux-2/turbo"
FLASH = "fal-ai/flux-2/flash"


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory) -> Settings:
    # fetch_allow: the tests serve reference images from servers on 127.0.0.1
    return Settings(data_dir=tmp_path_factory.mktemp("fal-api"), demo=True, device="cpu", fetch_allow="127.0.0.1")


@pytest.fixture(scope="module")
def server(base_settings):
    with Server(settings_for(base_settings, "main")) as running:
        yield running


@pytest.fixture(scope="module")
def idle(base_settings):
    """A server without workers: jobs stay queued until cancelled or timed out."""
    with Server(settings_for(base_settings, "idle"), start_workers=False) as running:
        yield running


def png_data_uri(width: int = 96, height: int = 80, color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_completed(client: httpx.Client, status_url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(status_url, params={"logs": "1"})
        body = response.json()
        if body["status"] == "COMPLETED":
            assert response.status_code == 200
            return body
        assert response.status_code == 202, body
        time.sleep(0.1)
    raise AssertionError(f"not completed after {timeout}s: {body}")


# ---- routing and errors -----------------------------------------------------------------------------------------
def test_unknown_endpoint_is_404_naming_it(idle):
    for path in ("/queue/fal-ai/flux-3", "/run/fal-ai/flux-3", "/fal-ai/flux-3"):
        response = httpx.post(idle.url + path, json={"prompt": "x"})
        assert response.status_code == 404, path
        assert "fal-ai/flux-3" in response.json()["detail"]
        assert response.headers["x-fal-request-id"]


@pytest.mark.parametrize(
    ("endpoint", "body", "loc", "error_type"),
    [
        ("fal-ai/flux-2", {}, ["body", "prompt"], "missing"),
        ("fal-ai/flux-2", {"prompt": "a", "num_images": 5}, ["body", "num_images"], "less_than_equal"),
        ("fal-ai/flux-2", {"prompt": "a", "image_size": {"width": 100}}, ["body", "image_size", "width"],
         "greater_than_equal"),
        ("fal-ai/flux-2", {"prompt": "a", "image_size": "huge"}, ["body", "image_size"], "literal_error"),
        ("fal-ai/flux-2", {"prompt": "a", "num_inference_steps": 51}, ["body", "num_inference_steps"],
         "less_than_equal"),
        ("fal-ai/flux-2", {"prompt": "a", "guidance_scale": 21}, ["body", "guidance_scale"], "less_than_equal"),
        ("fal-ai/flux-2", {"prompt": "a", "acceleration": "max"}, ["body", "acceleration"], "literal_error"),
        ("fal-ai/flux-2", {"prompt": "a", "output_format": "gif"}, ["body", "output_format"], "literal_error"),
        (TURBO, {"prompt": "a", "num_images": 0}, ["body", "num_images"], "greater_than_equal"),
        ("fal-ai/flux-2/lora", {"prompt": "a", "loras": [{"scale": 1}]}, ["body", "loras", 0, "path"], "missing"),
        ("fal-ai/flux-2/lora", {"prompt": "a", "loras": [{"path": "/etc/passwd"}]}, ["body", "loras", 0, "path"],
         "value_error"),
        ("fal-ai/flux-2-pro", {"prompt": "a", "output_format": "webp"}, ["body", "output_format"], "literal_error"),
        ("fal-ai/flux-2-pro", {"prompt": "a", "safety_tolerance": "9"}, ["body", "safety_tolerance"],
         "literal_error"),
        ("fal-ai/flux-2-flex", {"prompt": "a", "num_inference_steps": 2}, ["body", "num_inference_steps"],
         "greater_than_equal"),
        ("fal-ai/flux-2/klein/4b", {"prompt": "a", "image_size": {"width": 512, "height": 4096}},
         ["body", "image_size", "height"], "less_than_equal"),
        ("fal-ai/flux-2/edit", {"prompt": "a"}, ["body", "image_urls"], "missing"),
        ("fal-ai/flux-2/edit", {"prompt": "a", "image_urls": []}, ["body", "image_urls"], "too_short"),
        ("fal-ai/flux-2-pro/edit", {"prompt": "a", "image_urls": ["https://x/y.png"] * 10}, ["body", "image_urls"],
         "too_long"),
        ("fal-ai/flux-2/edit", {"prompt": "a", "image_urls": ["file:///etc/passwd"]}, ["body", "image_urls", 0],
         "value_error"),
        ("fal-ai/flux-2/edit", {"prompt": "a", "image_urls": ["data:image/png;base64,AAAA"]},
         ["body", "image_urls", 0], "value_error"),
    ],
)
def test_validation_errors_name_the_field(idle, endpoint, body, loc, error_type):
    for prefix in ("/queue/", "/run/"):
        response = httpx.post(idle.url + prefix + endpoint, json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert [d["loc"] for d in detail] == [loc], detail
        assert detail[0]["type"] == error_type
        assert detail[0]["msg"]


def test_reference_limits_name_the_image(idle):
    body = {"prompt": "a", "image_urls": [png_data_uri(), png_data_uri(32, 32)]}
    response = httpx.post(f"{idle.url}/queue/fal-ai/flux-2/edit", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "image_urls", 1]
    assert "64" in response.json()["detail"][0]["msg"]


def test_invalid_json_is_422(idle):
    response = httpx.post(f"{idle.url}/queue/{TURBO}", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_unknown_fields_are_ignored_and_presets_apply(idle):
    # Turbo has no num_inference_steps: like fal, an unknown field is ignored and the preset's 8 steps stay.
    response = httpx.post(f"{idle.url}/queue/{TURBO}", json={"prompt": "a", "num_inference_steps": 40, "colour": 1})
    assert response.status_code == 200, response.text
    job = idle.store.get(response.json()["request_id"])
    assert job.request["steps"] == 8
    assert job.request["sigmas"] and job.request["loras"][0]["path"].startswith("hf://")
    assert (job.request["width"], job.request["height"]) == (1024, 768)  # landscape_4_3
    pro = httpx.post(f"{idle.url}/queue/fal-ai/flux-2-pro", json={"prompt": "a", "safety_tolerance": 4}).json()
    request = idle.store.get(pro["request_id"]).request
    assert request["safety_tolerance"] == 4 and request["expand_prompt"] is True and request["output_format"] == "jpeg"
    edit = httpx.post(f"{idle.url}/queue/fal-ai/flux-2/edit", json={"prompt": "a", "image_urls": [png_data_uri()]})
    assert edit.status_code == 200, edit.text
    edit_request = idle.store.get(edit.json()["request_id"]).request
    assert edit_request["width"] is None and edit_request["min_side"] == 512  # auto: the first image's, 512 at least


def test_priorities_order_the_queue(idle):
    submit = lambda priority: httpx.post(
        f"{idle.url}/queue/{FLASH}", json={"prompt": priority}, headers={"X-Fal-Queue-Priority": priority}
    ).json()["request_id"]
    first_low, normal = submit("low"), submit("normal")
    position = lambda rid: httpx.get(f"{idle.url}/queue/fal-ai/flux-2/requests/{rid}/status").json()
    assert position(normal)["queue_position"] < position(first_low)["queue_position"]
    assert position(normal)["status"] == "IN_QUEUE"
    bad = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "a"}, headers={"X-Fal-Queue-Priority": "urgent"})
    assert bad.status_code == 400 and "X-Fal-Queue-Priority" in bad.json()["detail"]


def test_start_timeout_expires_a_queued_request(idle):
    submitted = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "t"},
                           headers={"X-Fal-Request-Timeout": "1.2"}).json()
    time.sleep(1.5)
    status = httpx.get(submitted["status_url"])
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED" and status.json()["error_type"] == "request_timeout"
    result = httpx.get(submitted["response_url"])
    assert result.status_code == 504 and result.json()["error_type"] == "request_timeout"
    assert result.headers["x-fal-error-type"] == "request_timeout"


def test_cancel_answers_like_fal(idle):
    submitted = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "c"}).json()
    assert httpx.get(submitted["response_url"]).status_code == 400  # not done yet
    first = httpx.put(submitted["cancel_url"])
    assert (first.status_code, first.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    again = httpx.put(submitted["cancel_url"])
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})
    status = httpx.get(submitted["status_url"]).json()
    assert status["status"] == "COMPLETED" and status["error"] and status["error_type"]
    assert httpx.put(f"{idle.url}/queue/fal-ai/flux-2/requests/nope/cancel").status_code == 404
    # the request belongs to fal-ai/flux-2: another app's URL does not find it
    assert httpx.get(f"{idle.url}/queue/fal-ai/flux-2-pro/requests/{submitted['request_id']}/status").status_code == 404


def test_idempotency_key_never_runs_twice(idle):
    headers = {"Idempotency-Key": "same-key-1"}
    first = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "i"}, headers=headers).json()
    second = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "i"}, headers=headers).json()
    other = httpx.post(f"{idle.url}/queue/{FLASH}", json={"prompt": "i"}).json()
    assert first["request_id"] == second["request_id"] != other["request_id"]


# ---- running jobs -----------------------------------------------------------------------------------------------
def test_queue_flow_with_absolute_urls_and_logs(server):
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{server.url}/queue/{FLASH}", json={"prompt": "a red cube", "seed": 7, **SMALL})
        assert response.status_code == 200
        submitted = response.json()
        rid = submitted["request_id"]
        assert response.headers["x-fal-request-id"] == rid
        base = f"{server.url}/queue/fal-ai/flux-2/requests/{rid}"
        assert submitted["status"] == "IN_QUEUE" and submitted["queue_position"] >= 0
        assert (submitted["response_url"], submitted["status_url"], submitted["cancel_url"]) == (
            base, base + "/status", base + "/cancel")
        done = wait_completed(client, submitted["status_url"])
        assert done["metrics"]["inference_time"] > 0
        assert any("4/4" in log["message"] and "step" in log["message"].lower() for log in done["logs"]), done["logs"]
        assert {"message", "level", "source", "timestamp"} <= set(done["logs"][0])
        result = client.get(submitted["response_url"])
        assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
        output = result.json()
        assert output["seed"] == 7 and output["prompt"] and output["has_nsfw_concepts"] == [False]
        image = output["images"][0]
        assert image["url"].startswith(f"{server.url}/files/")
        assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/png")
        file = client.get(image["url"])
        assert file.status_code == 200 and file.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(file.content)).size == (512, 512)


def test_fal_host_layout_without_prefixes(server):
    """fal's own layout: POST /{endpoint} on a queue.* host queues, on another host runs synchronously."""
    queue_host = f"queue.localhost:{server.port}"
    with httpx.Client(timeout=120) as client:
        submitted = client.post(f"{server.url}/{FLASH}", json={"prompt": "q", **SMALL}, headers={"Host": queue_host})
        assert submitted.status_code == 200, submitted.text
        body = submitted.json()
        assert body["status_url"] == f"http://{queue_host}/fal-ai/flux-2/requests/{body['request_id']}/status"
        path = f"{server.url}/fal-ai/flux-2/requests/{body['request_id']}"
        wait_completed(client, path + "/status")
        output = client.get(path, headers={"Host": queue_host}).json()
        assert output["images"][0]["url"].startswith(f"http://{queue_host}/files/")
        ran = client.post(f"{server.url}/{FLASH}", json={"prompt": "r", **SMALL})
        assert ran.status_code == 200 and ran.json()["images"][0]["width"] == 512


def test_sync_run_and_stream(server):
    with httpx.Client(timeout=120) as client:
        ran = client.post(f"{server.url}/run/fal-ai/flux-2-pro", json={"prompt": "p", **SMALL})
        assert ran.status_code == 200, ran.text
        assert set(ran.json()) == {"images", "seed"}  # pro's output schema
        assert ran.json()["images"][0]["content_type"] == "image/jpeg"
        assert ran.headers["x-fal-request-id"]
        events = []
        with client.stream("POST", f"{server.url}/run/{FLASH}/stream", json={"prompt": "s", **SMALL}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert any(e.get("status") == "IN_PROGRESS" and e["logs"] for e in events[:-1])
        assert events[-1]["images"][0]["width"] == 512


def test_status_stream_sends_changes_then_closes(server):
    with httpx.Client(timeout=120) as client:
        submitted = client.post(f"{server.url}/queue/{FLASH}", json={"prompt": "st", **SMALL}).json()
        events = []
        with client.stream("GET", submitted["status_url"] + "/stream", params={"logs": "1"}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "COMPLETED" and "inference_time" in events[-1]["metrics"]
        messages = [log["message"] for e in events for log in (e.get("logs") or [])]
        assert len(messages) == len(set(messages)) and messages  # each log line once


def test_store_io_off_returns_data_uris_and_keeps_nothing(server):
    with httpx.Client(timeout=120) as client:
        for headers, body in (({"X-Fal-Store-IO": "0"}, {}), ({}, {"sync_mode": True})):
            submitted = client.post(f"{server.url}/queue/{FLASH}", json={"prompt": "secret", **SMALL, **body},
                                    headers=headers).json()
            wait_completed(client, submitted["status_url"])
            output = client.get(submitted["response_url"]).json()
            url = output["images"][0]["url"]
            assert url.startswith("data:image/png;base64,")
            assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (512, 512)
            job = server.store.get(submitted["request_id"])
            assert job.input is None and job.result is None and not job.request
            assert client.get(submitted["response_url"]).status_code == 410


class _Receiver:
    """A webhook receiver: records every POSTed JSON body."""

    def __init__(self):
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook"

    def wait(self, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.bodies


def test_webhooks_carry_fal_payloads(server, idle):
    receiver = _Receiver()
    try:
        ok = httpx.post(f"{server.url}/queue/{FLASH}", params={"fal_webhook": receiver.url},
                        json={"prompt": "w", **SMALL}).json()
        cancelled = httpx.post(f"{idle.url}/queue/{FLASH}", params={"fal_webhook": receiver.url},
                               json={"prompt": "w"}).json()
        httpx.put(cancelled["cancel_url"])
        bodies = {b["request_id"]: b for b in receiver.wait(2)}
        assert set(bodies) == {ok["request_id"], cancelled["request_id"]}
        good = bodies[ok["request_id"]]
        assert good["status"] == "OK" and good["error"] is None and good["gateway_request_id"] == ok["request_id"]
        assert good["payload"]["images"][0]["url"].startswith(f"{server.url}/files/")
        bad = bodies[cancelled["request_id"]]
        assert bad["status"] == "ERROR" and bad["error"].startswith("Invalid status code:")
        assert bad["payload"]["detail"]
    finally:
        receiver.httpd.shutdown()


# ---- files, auth, docs, metrics -----------------------------------------------------------------------------------
def test_uploads_like_fal_storage(idle):
    with httpx.Client(timeout=30) as client:
        token = client.post(f"{idle.url}/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
        assert token["token_type"] == "Bearer" and token["base_url"] == idle.url
        assert "+00:00" in token["expires_at"]
        gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
        uploaded = client.post(f"{idle.url}/files/upload", content=gif,
                               headers={"Authorization": f"Bearer {token['token']}", "Content-Type": "text/plain",
                                        "X-Fal-File-Name": "note.gif"}).json()
        assert uploaded["access_url"].startswith(f"{idle.url}/files/")
        assert uploaded["access_url"].split("?")[0].endswith("note.gif")
        fetched = client.get(uploaded["access_url"])  # stored with the type its bytes have, not the declared one
        assert fetched.content == gif and fetched.headers["content-type"] == "image/gif"
        started = client.post(f"{idle.url}/storage/upload/initiate", params={"storage_type": "fal-cdn-v3"},
                              json={"file_name": "pic.png", "content_type": "image/png"}).json()
        png = base64.b64decode(png_data_uri().split(",", 1)[1])
        assert client.put(started["upload_url"], content=png, headers={"Content-Type": "image/png"}).status_code == 200
        fetched = client.get(started["file_url"])
        assert fetched.content == png and fetched.headers["content-type"] == "image/png"
        assert client.put(started["upload_url"] + "x", content=b"1").status_code == 403
        assert client.get(f"{idle.url}/files/outputs/none.png").status_code == 404


def test_upload_tokens_work_on_every_replica(idle):
    """A token and a signed upload URL from one API process work on another sharing the store (and after a
    restart): the signing secret lives in the database."""
    with Server(idle.settings, start_workers=False) as replica, httpx.Client(timeout=30) as client:
        token = client.post(f"{idle.url}/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
        uploaded = client.post(f"{replica.url}/files/upload", content=b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
                               headers={"Authorization": f"Bearer {token['token']}", "X-Fal-File-Name": "a.gif"})
        assert uploaded.status_code == 200, uploaded.text
        started = client.post(f"{idle.url}/storage/upload/initiate", params={"storage_type": "fal-cdn-v3"},
                              json={"file_name": "b.png", "content_type": "image/png"}).json()
        moved = started["upload_url"].replace(idle.url, replica.url)
        png = base64.b64decode(png_data_uri().split(",", 1)[1])
        assert client.put(moved, content=png, headers={"Content-Type": "image/png"}).status_code == 200
        assert client.get(started["file_url"]).content == png


def test_api_keys_are_required_when_configured(base_settings):
    with Server(settings_for(base_settings, "auth"), start_workers=False, auth_required=True) as locked:
        _, secret = locked.store.create_key("test")
        url = f"{locked.url}/queue/{FLASH}"
        missing = httpx.post(url, json={"prompt": "a"})
        assert missing.status_code == 401 and "fluxserve keys create" in missing.json()["detail"]
        assert httpx.post(url, json={"prompt": "a"}, headers={"Authorization": "Key wrong"}).status_code == 401
        for scheme in ("Key", "Bearer"):
            response = httpx.post(url, json={"prompt": "a"}, headers={"Authorization": f"{scheme} {secret}"})
            assert response.status_code == 200, response.text
        key_id, key_secret = secret.split(":", 1)
        assert httpx.post(url, json={"prompt": "a"},
                          headers={"Authorization": f"Key {key_id}:{key_secret}"}).status_code == 200
        # liveness answers without a key; the placement, queue and metrics need one
        bare = httpx.get(f"{locked.url}/health")
        assert bare.status_code == 200 and bare.json() == {"status": "ok"}
        assert httpx.get(f"{locked.url}/health", headers={"Authorization": f"Key {secret}"}).json() == {"status": "ok"}
        assert httpx.get(f"{locked.url}/metrics").status_code == 401
        assert httpx.get(f"{locked.url}/metrics", headers={"Authorization": f"Key {secret}"}).status_code == 403
        _, admin = locked.store.create_key("ops", admin=True)
        detailed = httpx.get(f"{locked.url}/health", headers={"Authorization": f"Key {admin}"}).json()
        assert "queue_depth" in detailed and "placement" in detailed
        metrics = httpx.get(f"{locked.url}/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert metrics.status_code == 200 and "fluxserve_queue_depth" in metrics.text


def test_docs_health_and_metrics(server):
    doc = httpx.get(f"{server.url}/api/openapi/queue/openapi.json", params={"endpoint_id": "fal-ai/flux-2"}).json()
    schemas = doc["components"]["schemas"]
    dev_input = next(s for name, s in schemas.items() if name.endswith("Input"))
    assert dev_input["properties"]["num_inference_steps"]["maximum"] == 50
    assert "/fal-ai/flux-2" in doc["paths"]
    turbo = httpx.get(f"{server.url}/api/openapi/queue/openapi.json", params={"endpoint_id": TURBO}).json()
    turbo_input = next(s for name, s in turbo["components"]["schemas"].items() if name.endswith("Input"))
    assert "num_inference_steps" not in turbo_input["properties"]
    assert httpx.get(f"{server.url}/api/openapi/queue/openapi.json",
                     params={"endpoint_id": "fal-ai/none"}).status_code == 404
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"] == "fluxserve"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and "queue_depth" in health and "placement" in health
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "fluxserve_queue_depth" in metrics and "fluxserve_inference_seconds_bucket" in metrics
    assert 'fluxserve_jobs{status="completed"}' in metrics


def test_accepted_job_survives_a_restart(base_settings):
    settings = settings_for(base_settings, "restart")
    with Server(settings, start_workers=False) as first:
        submitted = httpx.post(f"{first.url}/queue/{FLASH}", json={"prompt": "durable", **SMALL}).json()
        assert submitted["status"] == "IN_QUEUE"
    with Server(settings) as second, httpx.Client(timeout=120) as client:
        base = f"{second.url}/queue/fal-ai/flux-2/requests/{submitted['request_id']}"
        wait_completed(client, base + "/status")
        assert client.get(base).json()["images"][0]["width"] == 512


def test_docs_work_offline_and_the_favicon_is_served(server):
    """/docs and /redoc load their scripts from this server (no CDN), and /favicon.ico is an image."""
    import re

    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{server.url}{page}").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and not [a for a in assets if a.startswith(("http://", "https://", "//"))], assets
        for asset in assets:
            assert httpx.get(f"{server.url}{asset}").status_code == 200, asset
    icon = httpx.get(f"{server.url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/png"
    assert icon.content.startswith(b"\x89PNG")
