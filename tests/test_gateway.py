"""The gateway: closed-model endpoints sent to an upstream provider, with fallback. A second fluxserve on
another port is the upstream (it speaks fal's queue protocol, as the official clients prove)."""

from __future__ import annotations

from dataclasses import replace

import httpx
import openai
import pytest
from fal_helpers import SMALL, Server, settings_for

import fluxserve.compat.fal
from fluxserve.catalog import Catalog
from fluxserve.upstream.errors import UpstreamError, from_status
from fluxserve.upstream.gateway import Gateway, fal_arguments

PRO = "fal-ai/flux-2-pro"


@pytest.fixture(scope="module")
def upstream(demo_settings):
    with Server(replace(settings_for(demo_settings, "gateway_upstream"), max_prompt_chars=60)) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(demo_settings, upstream):
    settings = replace(settings_for(demo_settings, "gateway"), upstream=f"fal={upstream.url}/queue")
    with Server(settings) as running:
        yield running


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def upstream_jobs(server: Server, endpoint: str) -> list:
    return [job for job in server.store.list(limit=1000) if job.endpoint == endpoint]


def test_routes_come_from_the_catalogue_and_only_configured_providers_count():
    catalog = Catalog.load()
    assert catalog.endpoints[PRO].routes == (f"fal:{PRO}", "replicate:black-forest-labs/flux-2-pro", "local")
    gateway = Gateway(catalog, {"fal": object()})
    assert gateway.routes(PRO) == [f"fal:{PRO}", "local"]  # no Replicate upstream configured here
    assert gateway.kind_for(PRO) == "upstream" and gateway.kind_for("fal-ai/flux-2") is None
    assert Gateway(catalog, {}).kind_for(PRO) is None  # no upstream: the local preset, as before


def test_fal_arguments_follow_the_target_schema_and_pass_unknown_fields_through():
    from fluxserve.request import GenerationRequest

    spec = Catalog.load().endpoints[PRO]
    request = GenerationRequest(model="dev", prompt="a fox", width=1024, height=768, seed=3, num_images=2,
                                output_format="webp", safety_tolerance=4)
    arguments = fal_arguments(spec, request, {"prompt": "a fox", "custom_option": True, "sync_mode": True})
    assert arguments["image_size"] == {"width": 1024, "height": 768} and arguments["seed"] == 3
    assert arguments["safety_tolerance"] == "4" and arguments["custom_option"] is True
    assert arguments["output_format"] == "png"  # [pro] has no webp: converted here afterwards
    assert "num_inference_steps" not in arguments and "num_images" not in arguments and "sync_mode" not in arguments


def test_provider_errors_say_whether_the_next_route_is_tried():
    refused = from_status("fal", 422, {"detail": [{"loc": ["body", "prompt"], "msg": "too long"}]})
    assert not refused.retryable and refused.field == "prompt" and "too long" in refused.message
    assert from_status("fal", 503, {"detail": "overloaded"}).retryable
    assert from_status("fal", 429, "slow down").retryable
    assert isinstance(refused, UpstreamError)


def test_an_openai_request_for_pro_is_served_by_the_upstream(gateway, upstream):
    before = len(upstream_jobs(upstream, PRO))
    image = openai_client(gateway).images.generate(model="flux-2-pro", prompt="a red fox", size="512x512",
                                                   response_format="url", quality="high",
                                                   extra_body={"custom_style": "ink", "safety_tolerance": 4})
    assert image.data[0].url.startswith(gateway.url + "/files/")  # re-hosted: the gateway's storage and URLs
    picture = httpx.get(image.data[0].url, timeout=60)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    served = upstream_jobs(upstream, PRO)
    assert len(served) == before + 1 and served[0].status == "completed"  # the upstream's history shows it
    sent = served[0].input
    assert sent["custom_style"] == "ink" and "quality" not in sent  # unknown fields pass, OpenAI's own do not
    assert sent["safety_tolerance"] == "4" and sent["image_size"] == {"width": 512, "height": 512}
    local = next(job for job in gateway.store.list(limit=1000) if job.endpoint == PRO)
    assert local.kind == "upstream" and local.status == "completed"
    messages = [line.message for line in gateway.store.logs(local.id)]
    assert f"routing to fal ({PRO})" in messages
    assert any(message.startswith("fal: queued upstream at fal as ") for message in messages)
    assert "fal: step 28/28" in messages and local.total_steps == 28  # the upstream's progress, relayed


def test_a_refusal_upstream_reaches_the_caller_naming_the_field(gateway):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(gateway).images.generate(model="flux-2-pro", prompt="a fox " * 20, size="512x512")
    assert caught.value.body["param"] == "prompt" and "fal answered 422" in caught.value.body["message"]
    import fal_client

    fluxserve.compat.fal.use(gateway.url)
    with pytest.raises(fal_client.client.FalClientHTTPError) as refused:
        fal_client.subscribe(PRO, arguments={"prompt": "a fox " * 20, **SMALL})
    [detail] = refused.value.response.json()["detail"]  # fal's own 422 shape, naming the field
    assert refused.value.status_code == 422 and detail["loc"] == ["body", "prompt"]
    assert detail["msg"].startswith("fal answered 422: the prompt is 120 characters long")


def test_a_stopped_upstream_falls_back_to_the_next_route(demo_settings):
    upstream = Server(settings_for(demo_settings, "gateway_upstream_2")).start()
    settings = replace(settings_for(demo_settings, "gateway_fallback"), upstream=f"fal={upstream.url}/queue")
    with Server(settings) as gateway:
        fluxserve.compat.fal.use(gateway.url)
        import fal_client

        first = fal_client.subscribe(PRO, arguments={"prompt": "a boat", **SMALL})
        upstream.stop()
        second = fal_client.subscribe(PRO, arguments={"prompt": "a boat", **SMALL})
        third = fal_client.subscribe(PRO, arguments={"prompt": "a boat", **SMALL})
        assert first["images"] and second["images"] and third["images"]  # no failed request
        jobs = sorted((job for job in gateway.store.list(limit=100) if job.endpoint == PRO),
                      key=lambda job: job.created_at)
        assert [job.status for job in jobs] == ["completed", "completed", "completed"]
        assert jobs[1].kind == "generate"  # handed to this server's GPU workers
        skipped = [line.message for line in gateway.store.logs(jobs[2].id)]  # fal is cooling down: not called
        assert any(message.startswith("fal skipped: failed 1 time(s) in a row") for message in skipped)
        messages = [line.message for line in gateway.store.logs(jobs[1].id)]
        assert any(message.startswith("fal failed: fal could not be reached") for message in messages)
        assert any("running on this server's GPUs" in message for message in messages)
        assert any(message.startswith("served on this server's GPUs by the open FLUX.2 [dev] weights")
                   for message in messages)
        # the stats show both routes: fal served one and failed one, this server's GPUs served one
        rows = httpx.get(f"{gateway.url}/api/stats", params={"window": "1h", "group_by": "provider"},
                         timeout=60).json()["groups"]
        by_key = {row["key"]: row for row in rows}
        assert (by_key["fal"]["completed"], by_key["fal"]["failed"], by_key["fal"]["success_rate"]) == (1, 1, 0.5)
        assert by_key["fal"]["generation_ms"]["p50"] > 0 and by_key["fal"]["ttfb_ms"]["p50"] > 0
        assert by_key["local"]["completed"] == 2
        # usage by who served: fal one request, this server's GPUs two (with their GPU time)
        usage = httpx.get(f"{gateway.url}/api/usage", params={"group_by": "provider"}, timeout=60).json()
        served = {group["group"]: group for group in usage["groups"]}
        assert served["fal"]["completed"] == 1 and served["fal"]["gpu_seconds"] == 0 and served["fal"]["steps"] == 0
        assert served["local"]["completed"] == 2 and served["local"]["megapixels"] > 0


def test_a_gateway_worker_process_needs_no_gpu(demo_settings, upstream, tmp_path):
    """``fluxserve worker --jobs upstream``: the API replicas queue, a worker without an engine sends upstream."""
    import subprocess
    import sys

    import fal_client

    settings = replace(settings_for(demo_settings, "gateway_api"), upstream=f"fal={upstream.url}/queue")
    with Server(settings, start_workers=False) as api:
        fluxserve.compat.fal.use(api.url)
        handle = fal_client.submit(PRO, arguments={"prompt": "a lighthouse", **SMALL})
        assert api.store.get(handle.request_id).kind == "upstream"
        done = subprocess.run(
            [sys.executable, "-m", "fluxserve", "worker", "--jobs", "upstream", "--once", "--demo",
             "--data-dir", str(tmp_path), "--db", settings.db_url, "--storage", settings.storage_location,
             "--upstream", f"fal={upstream.url}/queue"],
            capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "queue empty after 1 job(s)" in done.stderr
        assert handle.get()["images"] and api.store.get(handle.request_id).status == "completed"
    refused = subprocess.run([sys.executable, "-m", "fluxserve", "worker", "--jobs", "upstream", "--once",
                              "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                             check=False)
    assert refused.returncode == 2 and "--jobs upstream: no provider is configured" in refused.stderr


def test_the_replicate_route_serves_when_fal_is_not_configured(demo_settings, upstream):
    from fluxserve.request import GenerationRequest
    from fluxserve.upstream.gateway import replicate_arguments

    arguments = replicate_arguments("black-forest-labs/flux-2-flex", GenerationRequest(
        model="dev", prompt="p", width=768, height=512, output_format="jpeg", expand_prompt=True, steps=20),
        {"prompt": "p", "input_image": "x", "extra": 1, "__model__": "m"})
    assert arguments["aspect_ratio"] == "custom" and (arguments["width"], arguments["height"]) == (768, 512)
    assert arguments["output_format"] == "jpg" and arguments["prompt_upsampling"] is True and arguments["steps"] == 20
    assert arguments["extra"] == 1 and "input_image" not in arguments and "__model__" not in arguments

    settings = replace(settings_for(demo_settings, "gateway_replicate"), upstream=f"replicate={upstream.url}")
    with Server(settings) as gateway:
        before = len(upstream_jobs(upstream, PRO))
        image = openai_client(gateway).images.generate(model="flux-2-pro", prompt="a kite", size="512x512",
                                                       response_format="b64_json", output_format="webp")
        assert image.data[0].b64_json
        served = upstream_jobs(upstream, PRO)
        assert len(served) == before + 1 and served[0].dialect == "replicate" and served[0].status == "completed"
        local = next(job for job in gateway.store.list(limit=100) if job.endpoint == PRO)
        messages = [line.message for line in gateway.store.logs(local.id)]
        assert "routing to replicate (black-forest-labs/flux-2-pro)" in messages
        assert local.result["images"][0]["content_type"] == "image/webp"  # the caller's format


def test_an_image_in_another_format_is_converted_to_the_callers():
    import io

    from PIL import Image

    from fluxserve.upstream.gateway import _in_format

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "PNG")
    data, content_type, size = _in_format(buffer.getvalue(), "image/png", "webp")
    assert content_type == "image/webp" and size == (40, 30) and Image.open(io.BytesIO(data)).format == "WEBP"
    same, kept, _ = _in_format(buffer.getvalue(), "application/octet-stream", "png")
    assert same == buffer.getvalue() and kept == "image/png"  # the bytes decide, not the declared type


def test_a_cancel_reaches_the_upstream(demo_settings):
    import time

    import fal_client

    with Server(settings_for(demo_settings, "gateway_slow_upstream")) as upstream:
        engine = upstream.app.state.engines[0]
        render = engine.render

        def slow(request, on_progress=None, should_cancel=None):  # every step lasts until the job is cancelled
            def step(progress):
                waited = time.monotonic() + 120  # bounded: a cancel that never arrives fails the test below
                while not should_cancel() and time.monotonic() < waited:
                    time.sleep(0.05)
                if on_progress is not None:
                    on_progress(progress)
            return render(request, step, should_cancel)

        engine.render = slow
        settings = replace(settings_for(demo_settings, "gateway_cancel"), upstream=f"fal={upstream.url}/queue")
        with Server(settings) as gateway:
            fluxserve.compat.fal.use(gateway.url)
            handle = fal_client.submit(PRO, arguments={"prompt": "a slow boat", **SMALL})
            deadline = time.monotonic() + 120
            while not [job for job in upstream_jobs(upstream, PRO) if job.status == "running"]:
                assert time.monotonic() < deadline, "the upstream never started the request"
                time.sleep(0.05)
            fal_client.cancel(PRO, handle.request_id)
            while gateway.store.get(handle.request_id).status != "cancelled":
                assert time.monotonic() < deadline, "the gateway's job was not cancelled"
                time.sleep(0.05)
            while (served := upstream_jobs(upstream, PRO)[0]).status == "running":
                assert time.monotonic() < deadline, "the cancel did not reach the upstream"
                time.sleep(0.05)
            # its steps wait for a cancel, so only the forwarded one could have ended it
            assert served.status == "cancelled" and (served.step or 0) < 28
            calls = httpx.get(f"{gateway.url}/api/stats", params={"window": "1h", "group_by": "provider"},
                              timeout=60).json()["groups"]
            assert {row["key"]: row["cancelled"] for row in calls}["fal"] == 1


def test_stopping_the_upstream_mid_traffic_fails_no_request(demo_settings):
    import fal_client

    upstream = Server(settings_for(demo_settings, "gateway_upstream_3")).start()
    settings = replace(settings_for(demo_settings, "gateway_traffic"), upstream=f"fal={upstream.url}/queue")
    with Server(settings) as gateway:
        fluxserve.compat.fal.use(gateway.url)
        first = [fal_client.submit(PRO, arguments={"prompt": f"boat {i}", **SMALL}) for i in range(4)]
        assert first[0].get()["images"]  # the upstream is serving
        upstream.stop()  # while the others may be queued, upstream or on their way back
        later = [fal_client.submit(PRO, arguments={"prompt": f"kite {i}", **SMALL}) for i in range(4)]
        for handle in first + later:
            assert handle.get()["images"]
        statuses = {gateway.store.get(handle.request_id).status for handle in first + later}
        assert statuses == {"completed"}


def test_the_upstream_key_goes_to_that_provider_only(demo_settings, monkeypatch, caplog):
    import logging

    import fal_client

    with Server(settings_for(demo_settings, "gateway_keyed_upstream"), auth_required=True) as upstream:
        key_id, key = upstream.store.create_key("gateway")
        monkeypatch.setenv("FLUXSERVE_UPSTREAM_FAL_KEY", key)
        settings = replace(settings_for(demo_settings, "gateway_keyed"), upstream=f"fal={upstream.url}/queue")
        caplog.set_level(logging.DEBUG)
        with Server(settings) as gateway:
            fluxserve.compat.fal.use(gateway.url)
            result = fal_client.subscribe(PRO, arguments={"prompt": "a guarded door", **SMALL})
            assert result["images"]
            [served] = upstream_jobs(upstream, PRO)
            assert served.owner == key_id and served.status == "completed"  # it authenticated with the key
            job = next(job for job in gateway.store.list(limit=10) if job.endpoint == PRO)
            seen = " ".join(line.message for line in gateway.store.logs(job.id)) + json_text(job) + caplog.text
            status = httpx.get(f"{gateway.url}/fal-ai/flux-2-pro/requests/{job.id}/status", params={"logs": 1},
                               timeout=30)
            assert status.status_code == 200 and "routing to fal" in status.text
            assert key not in seen + status.text
            assert key not in repr(gateway.app.state.workers[-1].engine.upstreams)


def json_text(job) -> str:
    import json

    return json.dumps({"request": job.request, "input": job.input, "result": job.result, "error": job.error},
                      default=str)


def test_a_failing_provider_cools_down_then_is_tried_again():
    from fluxserve.upstream.gateway import Health

    now = [100.0]
    health = Health(base_s=10, max_s=25, clock=lambda: now[0])
    assert health.ok("fal")
    health.failed("fal", "ConnectError")
    assert not health.ok("fal") and "failed 1 time(s) in a row, tried again in 10 s" in health.why("fal")
    now[0] += 10
    assert health.ok("fal")  # the next request tries it again
    health.failed("fal", "503")
    assert not health.ok("fal") and "in 20 s (last: 503)" in health.why("fal")  # doubled
    health.failed("fal", "503")
    assert "in 25 s" in health.why("fal")  # capped
    health.served("fal")
    assert health.ok("fal") and health.ok("replicate")


def test_references_reach_a_provider_as_urls_or_data_uris(tmp_path):
    import base64
    import io

    from PIL import Image

    from fluxserve.upstream.gateway import _as_url

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "WEBP")
    local = tmp_path / "upload.bin"  # this server's own file, resolved to a path: its bytes decide its type
    local.write_bytes(buffer.getvalue())
    uri = _as_url(str(local))
    assert uri.startswith("data:image/webp;base64,") and base64.b64decode(uri.split(",", 1)[1]) == buffer.getvalue()
    assert _as_url("https://example.com/a.png") == "https://example.com/a.png"
    assert _as_url("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"
