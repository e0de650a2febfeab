"""An image the safety checker blocks is said in each dialect's own way, through the official clients: fal flags
it (``has_nsfw_concepts``, on pro's output too) and logs it; OpenAI rejects the request (400
``moderation_blocked``); Replicate fails the prediction with the reason in its error and logs. The server runs
the demo models with a demo safety checker that flags every image."""

from __future__ import annotations

from dataclasses import replace

import fal_client
import httpx
import openai
import pytest
from fal_helpers import Server, settings_for

import fluxserve.compat.fal
from fluxserve.compat.openai import client as openai_client
from fluxserve.compat.replicate import client as replicate_client
from fluxserve.engine.safety import build_demo_checker

SMALL = {"image_size": {"width": 512, "height": 512}}
URL_FORMATS = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")


@pytest.fixture(scope="module")
def strict(demo_settings, demo_data_dir):
    """A server whose safety checker flags every image (the session's demo pipelines, its own checker)."""
    settings = replace(settings_for(demo_settings, "blocked"), data_dir=demo_data_dir / "blocked")
    settings.demo_dir.mkdir(parents=True, exist_ok=True)
    shared = demo_data_dir / "cache" / "demo-weights"
    for arch in ("dev", "klein"):
        link = settings.demo_dir / arch
        if not link.exists():
            link.symlink_to(shared / arch, target_is_directory=True)
    build_demo_checker(settings.demo_dir / "safety", always_flag=True)
    saved = {name: getattr(fal_client.client, name) for name in URL_FORMATS}
    with Server(settings) as server:
        fluxserve.compat.fal.use(server.url)
        try:
            yield server
        finally:
            for name, value in saved.items():
                setattr(fal_client.client, name, value)


def test_fal_flags_blocked_images_and_logs_them(strict):
    updates = []
    result = fal_client.subscribe("fal-ai/flux-2/flash", arguments={"prompt": "blocked", "num_images": 2, **SMALL},
                                  with_logs=True, on_queue_update=updates.append)
    assert result["has_nsfw_concepts"] == [True, True]
    logs = [log["message"] for u in updates if isinstance(u, fal_client.InProgress) for log in u.logs or []]
    logs += [log["message"] for u in updates if isinstance(u, fal_client.Completed) for log in u.logs or []]
    assert any("NSFW content detected in 2 of 2 output images" in message for message in logs), logs

    pro = fal_client.run("fal-ai/flux-2-pro", arguments={"prompt": "blocked", **SMALL})
    assert pro["has_nsfw_concepts"] == [True]  # pro's output says so too, when it happens
    unchecked = fal_client.run("fal-ai/flux-2-pro", arguments={"prompt": "x", "enable_safety_checker": False,
                                                               **SMALL})
    assert "has_nsfw_concepts" not in unchecked and set(unchecked) == {"images", "seed"}  # pro's own shape


def test_openai_rejects_a_blocked_image(strict):
    client = openai_client(strict.url, max_retries=0, timeout=300)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="flux-2-flash", prompt="blocked", size="512x512")
    assert info.value.status_code == 400
    assert info.value.code == "moderation_blocked"
    assert "safety system" in info.value.message and "NSFW" in info.value.message
    # the checker off (the passthrough field): the same request succeeds
    done = client.images.generate(model="flux-2-flash", prompt="allowed", size="512x512",
                                  extra_body={"enable_safety_checker": False})
    assert len(done.data) == 1

    with httpx.stream("POST", strict.url + "/v1/images/generations", timeout=300, json={
            "model": "flux-2-flash", "prompt": "blocked", "size": "512x512", "stream": True}) as stream:
        text = "".join(stream.iter_text())
    assert '"code": "moderation_blocked"' in text and "image_generation.completed" not in text


def test_replicate_fails_a_blocked_prediction(strict):
    client = replicate_client(strict.url)
    client.poll_interval = 0.1
    prediction = client.predictions.create(model="black-forest-labs/flux-2-dev", input={
        "prompt": "blocked", "aspect_ratio": "custom", "width": 64, "height": 64, "steps": 2})
    prediction.wait()
    assert prediction.status == "failed"
    assert prediction.output is None
    assert "NSFW content detected" in prediction.error
    assert "NSFW content detected" in prediction.logs
    allowed = client.predictions.create(model="black-forest-labs/flux-2-dev", input={
        "prompt": "allowed", "aspect_ratio": "custom", "width": 64, "height": 64, "steps": 2,
        "disable_safety_checker": True})
    allowed.wait()
    assert allowed.status == "succeeded" and allowed.output
