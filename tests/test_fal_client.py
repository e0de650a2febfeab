"""The official ``fal-client`` Python package, unmodified, against a real fluxserve server.

1. TLS (self-signed certificate) and environment variables only: ``FAL_RUN_HOST``, ``FAL_QUEUE_RUN_HOST``,
   ``SSL_CERT_FILE``, ``FAL_KEY``, in a fresh interpreter (fal_client reads them at import time).
2. Plain http through ``fluxserve.compat.fal.use(url, key)``, in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import fal_client
import pytest
from fal_helpers import SMALL, Server, make_certificate, settings_for
from PIL import Image

import fluxserve.compat.fal
from fluxserve.config import Settings

FLASH = "fal-ai/flux-2/flash"

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import fal_client
    from PIL import Image

    SMALL = {"image_size": {"width": 512, "height": 512}}
    report = {}
    updates = []
    result = fal_client.subscribe("fal-ai/flux-2/klein/4b", arguments={"prompt": "a cat", "seed": 3, **SMALL},
                                  with_logs=True, on_queue_update=updates.append,
                                  on_enqueue=lambda rid: report.setdefault("enqueued", rid))
    report["subscribe"] = result
    report["updates"] = [type(u).__name__ for u in updates]
    report["progress_logs"] = [log["message"] for u in updates if isinstance(u, fal_client.InProgress)
                               for log in (u.logs or [])]
    report["completed_metrics"] = [u.metrics for u in updates if isinstance(u, fal_client.Completed)]

    report["run"] = fal_client.run("fal-ai/flux-2/flash", arguments={"prompt": "a dog", **SMALL})

    handle = fal_client.submit("fal-ai/flux-2/flash", arguments={"prompt": "a fox", **SMALL})
    report["submitted_status"] = type(handle.status(with_logs=True)).__name__
    report["get"] = handle.get()
    report["status"] = type(fal_client.status("fal-ai/flux-2/flash", handle.request_id, with_logs=True)).__name__
    report["result"] = fal_client.result("fal-ai/flux-2/flash", handle.request_id)

    slow = fal_client.submit("fal-ai/flux-2", arguments={"prompt": "slow", "num_inference_steps": 50, **SMALL})
    fal_client.cancel("fal-ai/flux-2", slow.request_id)
    final = None
    for event in slow.iter_events(with_logs=True):
        final = event
    report["cancelled"] = {"type": type(final).__name__, "error": final.error, "error_type": final.error_type}
    try:
        slow.get()
        report["cancelled_get"] = "no error"
    except fal_client.client.FalClientHTTPError as exc:
        report["cancelled_get"] = exc.status_code

    image = Image.new("RGB", (640, 512), (10, 120, 200))
    edited = fal_client.subscribe("fal-ai/flux-2/flash/edit", arguments={
        "prompt": "make it red", "image_urls": [fal_client.encode_image(image, format="png")]})
    report["edit"] = edited

    try:
        fal_client.run("fal-ai/flux-2", arguments={"prompt": "x", "num_images": 5})
    except fal_client.client.FalClientHTTPError as exc:
        report["invalid"] = {"status": exc.status_code, "detail": exc.message}

    if len(sys.argv) > 1:  # uploads need the REST/CDN hosts: the compat helper points them here too
        import fluxserve.compat.fal
        fluxserve.compat.fal.use(sys.argv[1])
        report["upload"] = fal_client.upload(b"GIF89a uploaded bytes", "image/gif", file_name="a.gif")
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("fal-client"), demo=True, device="cpu")


def check_report(report: dict, server_url: str) -> None:
    subscribed = report["subscribe"]
    assert subscribed["seed"] == 3 and subscribed["images"][0]["width"] == 512
    assert subscribed["images"][0]["url"].startswith(f"{server_url}/files/")
    assert report["updates"][-1] == "Completed" and "InProgress" in report["updates"]
    assert any("step" in message.lower() for message in report["progress_logs"]), report["progress_logs"]
    assert report["completed_metrics"][0]["inference_time"] > 0
    assert report["run"]["images"][0]["height"] == 512
    assert report["get"] == report["result"] and report["status"] == "Completed"
    assert report["submitted_status"] in ("Queued", "InProgress", "Completed")
    assert report["cancelled"]["type"] == "Completed" and report["cancelled"]["error_type"]
    assert report["cancelled_get"] == 400
    edit = report["edit"]["images"][0]
    assert (edit["width"], edit["height"]) == (640, 512)  # image_size auto: the input's size
    assert report["invalid"]["status"] == 422
    assert report["invalid"]["detail"][0]["loc"] == ["body", "num_images"]


def test_official_client_over_tls_with_env_vars_only(base_settings, tmp_path):
    cert, key = make_certificate(tmp_path)
    with Server(settings_for(base_settings, "tls"), tls=(cert, key), auth_required=True) as server:
        _, secret = server.store.create_key("client")
        env = {
            **os.environ,
            "FAL_RUN_HOST": f"{server.host}/run",
            "FAL_QUEUE_RUN_HOST": f"{server.host}/queue",
            "SSL_CERT_FILE": str(cert),
            "FAL_KEY": secret,
        }
        done = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, server.url], env=env, check=False, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout.split("REPORT", 1)[1])
        check_report(report, server.url)
        assert report["upload"].startswith(f"{server.url}/files/uploads/")
        # the key was needed: the same script without it fails on the first call
        env["FAL_KEY"] = "wrong"
        failed = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT], env=env, check=False, capture_output=True, text=True,
                                timeout=60)
        assert failed.returncode != 0 and "401" in failed.stderr


def test_official_client_over_http_with_compat_helper(base_settings):
    names = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")
    saved = {name: getattr(fal_client.client, name) for name in names}
    with Server(settings_for(base_settings, "plain")) as server:
        fluxserve.compat.fal.use(server.url)
        try:
            updates = []
            result = fal_client.subscribe(FLASH, arguments={"prompt": "compat", **SMALL}, with_logs=True,
                                          on_queue_update=updates.append)
            assert result["images"][0]["url"].startswith(f"{server.url}/files/")
            assert isinstance(updates[-1], fal_client.Completed)
            assert any(isinstance(u, fal_client.InProgress) and u.logs for u in updates)
            assert fal_client.run(FLASH, arguments={"prompt": "r", **SMALL})["images"][0]["width"] == 512

            handle = fal_client.submit(FLASH, arguments={"prompt": "s", **SMALL})
            assert handle.get()["images"][0]["content_type"] == "image/png"
            assert isinstance(fal_client.status(FLASH, handle.request_id), fal_client.Completed)

            # previews (X-Fluxserve-Previews) add preview_url to log entries: the client passes them through
            previewed = fal_client.submit("fal-ai/flux-2", arguments={"prompt": "p", "num_inference_steps": 8, **SMALL},
                                          headers={"X-Fluxserve-Previews": "2"})
            logs = [log for event in previewed.iter_events(with_logs=True)
                    if isinstance(event, (fal_client.InProgress, fal_client.Completed)) for log in (event.logs or [])]
            assert sorted({log["message"] for log in logs if "preview_url" in log}) == ["step 3/8", "step 5/8"]
            assert previewed.get()["images"][0]["width"] == 512

            slow = fal_client.submit("fal-ai/flux-2", arguments={"prompt": "c", "num_inference_steps": 50, **SMALL})
            slow.cancel()
            with pytest.raises(fal_client.client.FalClientHTTPError):
                slow.get()

            picture = Image.new("RGB", (512, 640), (250, 200, 0))
            uploaded = fal_client.upload_image(picture, format="png")
            assert uploaded.startswith(f"{server.url}/files/uploads/")
            edited = fal_client.subscribe(f"{FLASH}/edit", arguments={"prompt": "e", "image_urls": [uploaded]})
            assert (edited["images"][0]["width"], edited["images"][0]["height"]) == (512, 640)

            streamed = list(fal_client.stream(FLASH, arguments={"prompt": "st", **SMALL}))
            assert streamed[-1]["images"][0]["width"] == 512 and len(streamed) > 1
        finally:
            for name, value in saved.items():
                setattr(fal_client.client, name, value)
