"""Request bodies never stall the event loop: a body of very many JSON values (25 MB of LoRA entries) is
refused with a 413 in each API's own format while it arrives, and ``/health`` answers all along; large bodies
within the bound are decoded and validated off the loop and still work, in all three dialects.

A real server (demo models, no workers), real HTTP. The bound on ``/health`` (5 s) is wide: decoding and
validating that body on the event loop stalls it for many seconds, refusing it as it arrives for none.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fal_helpers import Server, settings_for

from fluxserve.api.bodies import values_bound

HEALTH_BOUND_S = 5.0
SENDERS = 3
DEV = "black-forest-labs/flux-2-dev"


@pytest.fixture(scope="module")
def server(demo_settings, tmp_path_factory):
    settings = replace(settings_for(demo_settings, f"bodies-{tmp_path_factory.mktemp('b').name}"), max_body_mb=64,
                       max_queued_per_key=0)
    with Server(settings, start_workers=False) as running:
        yield running


def _lora_body(count: int) -> bytes:
    loras = [{"path": f"https://example.com/lora-{i}.safetensors", "scale": 1.0} for i in range(count)]
    return json.dumps({"prompt": "a lighthouse", "loras": loras}).encode()


def test_bodies_of_very_many_values_are_refused_while_health_answers(server):
    body = _lora_body(600_000)  # about 36 MB, 1.8 million JSON values; three of them at once
    outcomes: list = []

    def send() -> None:
        try:
            outcomes.append(httpx.post(f"{server.url}/fal-ai/flux-2/lora", content=body, timeout=300,
                                       headers={"Host": "queue.fal.run", "Content-Type": "application/json"}))
        except httpx.HTTPError as exc:
            outcomes.append(exc)

    senders = [threading.Thread(target=send, daemon=True) for _ in range(SENDERS)]
    for sender in senders:
        sender.start()
    worst, probes = 0.0, 0
    deadline = time.monotonic() + 300
    with httpx.Client(timeout=120) as http:
        while any(sender.is_alive() for sender in senders) or probes < 3:
            assert time.monotonic() < deadline, "the large requests never ended"
            started = time.monotonic()
            assert http.get(f"{server.url}/health").status_code == 200
            worst, probes = max(worst, time.monotonic() - started), probes + 1
            time.sleep(0.1)
    assert worst < HEALTH_BOUND_S, f"/health took {worst:.1f} s while the bodies were handled"
    assert len(outcomes) == SENDERS
    for response in outcomes:
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 413, response.text[:300]
        assert "JSON values" in response.json()["detail"]


def test_each_dialect_refuses_too_many_values_in_its_own_format(server):
    many = [{"path": "https://example.com/x.safetensors", "scale": 1.0}] * 10_000  # about 30,000 values
    fal = httpx.post(f"{server.url}/fal-ai/flux-2/lora", json={"prompt": "x", "loras": many},
                     headers={"Host": "queue.fal.run"}, timeout=60)
    assert fal.status_code == 413 and fal.json()["error_type"] == "request_too_large"
    openai = httpx.post(f"{server.url}/v1/images/generations", timeout=60,
                        json={"prompt": "x", "model": "flux-2-dev", "extra": many})
    assert openai.status_code == 413 and openai.json()["error"]["code"] == "request_too_large"
    assert "JSON values" in openai.json()["error"]["message"]
    replicate = httpx.post(f"{server.url}/v1/models/{DEV}/predictions", timeout=60,
                           json={"input": {"prompt": "x", "extra": many}})
    assert replicate.status_code == 413 and replicate.json()["status"] == 413
    assert "JSON values" in replicate.json()["detail"]


def test_bodies_within_the_bound_are_accepted(server):
    few = [{"path": "https://example.com/x.safetensors", "scale": 1.0}] * 2
    response = httpx.post(f"{server.url}/fal-ai/flux-2/lora", json={"prompt": "x", "loras": few},
                          headers={"Host": "queue.fal.run"}, timeout=60)
    assert response.status_code == 200, response.text


def _noise_png(path: Path) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    data = path.read_bytes()
    assert len(data) > 512 * 1024  # a large body: decoded and validated off the event loop
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def test_large_bodies_are_decoded_off_the_loop_and_work_in_every_dialect(server, tmp_path):
    uri = _noise_png(tmp_path / "noise.png")
    fal = httpx.post(f"{server.url}/fal-ai/flux-2/edit", json={"prompt": "x", "image_urls": [uri]},
                     headers={"Host": "queue.fal.run"}, timeout=120)
    assert fal.status_code == 200, fal.text[:300]
    replicate = httpx.post(f"{server.url}/v1/models/{DEV}/predictions", timeout=120,
                           json={"input": {"prompt": "x", "input_images": [uri]}})
    assert replicate.status_code == 201, replicate.text[:300]
    assert server.store.get(fal.json()["request_id"]).request["image_urls"]
    # OpenAI answers when the images are made; no worker runs here: the job queued is the answer
    threading.Thread(target=lambda: httpx.post(
        f"{server.url}/v1/images/edits", timeout=30,
        json={"prompt": "x", "model": "flux-2-dev", "images": [{"image_url": uri}]}), daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.store.list(dialect="openai", limit=1):
        assert time.monotonic() < deadline, "the OpenAI edit made no job"
        time.sleep(0.1)
    for job in server.store.list(status="queued", limit=100):
        server.store.request_cancel(job.id)


def test_the_values_bound_is_an_upper_bound():
    rng = random.Random(0)

    def value(depth: int):
        kind = rng.randrange(6 if depth < 4 else 3)
        if kind == 0:
            return rng.randrange(1000)
        if kind == 1:
            return "".join(rng.choice("ab,[{") for _ in range(rng.randrange(5)))
        if kind == 2:
            return None
        if kind in (3, 4):
            return [value(depth + 1) for _ in range(rng.randrange(5))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(5))}

    def count(obj) -> int:
        if isinstance(obj, list):
            return 1 + sum(count(item) for item in obj)
        if isinstance(obj, dict):
            return 1 + sum(count(item) for item in obj.values())
        return 1

    for _ in range(300):
        doc = value(0)
        assert count(doc) <= 1 + values_bound(json.dumps(doc).encode())
