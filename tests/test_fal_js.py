"""The official ``@fal-ai/client`` (npm) in Node against a real fluxserve server: subscribe with polling and with
the status stream, a storage upload, and a validation error. ``tests/js`` is installed by ``scripts/test``."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from fal_helpers import Server, settings_for

from fluxserve.config import Settings

JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node = shutil.which("node")
    assert node, "node (20+) is needed for the JS client tests"
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300)
    return JS_DIR / "fal_client.mjs"


def test_official_js_client(node_client, tmp_path):
    settings = settings_for(Settings(data_dir=tmp_path, demo=True, device="cpu"), "js")
    with Server(settings, auth_required=True) as server:
        _, secret = server.store.create_key("js")
        done = subprocess.run(["node", str(node_client), server.url, secret], capture_output=True, text=True,
                              timeout=240, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout.split("REPORT", 1)[1])

        polling = report["polling"]
        assert polling["data"]["seed"] == 5 and polling["data"]["images"][0]["width"] == 512
        assert polling["requestId"] and polling["statuses"][-1] == "COMPLETED"
        assert any("step" in message.lower() for message in polling["logs"])

        streaming = report["streaming"]
        assert streaming["data"]["images"][0]["url"].startswith(f"{server.url}/files/")
        assert streaming["statuses"][-1] == "COMPLETED" and streaming["requestId"]
        assert any("step" in message.lower() for message in streaming["logs"])
        assert len(streaming["logs"]) == len(set(streaming["logs"]))

        assert report["upload"].startswith(f"{server.url}/files/uploads/")
        assert httpx.get(report["upload"]).content == base64.b64decode(
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

        invalid = report["invalid"]
        assert invalid["status"] == 422 and invalid["isValidation"]
        assert invalid["fields"] == [["body", "output_format"]]
