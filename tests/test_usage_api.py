"""Usage by the megapixel through a real server (demo models): ``GET /api/usage`` over HTTP with several keys,
``fluxserve usage`` as an operator runs it, and the OpenAI SDK reading real numbers in ``usage``."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import pytest
from fal_helpers import Server, settings_for
from PIL import Image

from fluxserve.catalog import Catalog
from fluxserve.compat.openai import client as openai_client

FLASH = "fal-ai/flux-2/flash"
PRICES = '\n[prices]\ncurrency = "USD"\n[prices."fal-ai/flux-2/flash/edit"]\nfirst_megapixel = 0.03\n' \
         "extra_megapixel = 0.015\n"
# a 1100x1000 reference is 1.05 MP (bills 2), a 200x136 one 0.03 MP (bills 1); a 512x512 output bills 1
BIG_REF, SMALL_REF = (1100, 1000), (200, 136)


def png(size: tuple[int, int], color: str = "teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(size: tuple[int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png(size)).decode()


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


@pytest.fixture(scope="module")
def catalog_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage-catalog") / "catalog.toml"
    path.write_text(Catalog.load().source.read_text() + PRICES)
    return path


@pytest.fixture(scope="module")
def server(demo_settings, catalog_path, tmp_path_factory):
    settings = replace(settings_for(demo_settings, f"usage-{tmp_path_factory.mktemp('u').name}"),
                       catalog=str(catalog_path))
    with Server(settings, auth_required=True) as running:
        store = running.store
        running.keys = {name: store.create_key(name, admin=name == "ops") for name in ("alice", "bob", "carol", "ops")}
        yield running


def key(server, name: str) -> str:
    return server.keys[name][1]


def key_id(server, name: str) -> str:
    return server.keys[name][0]


def wait_terminal(server, job_id: str):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = server.store.wait(job_id, 5)
        if job is not None and job.terminal:
            return job
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def made(server):
    """alice: one edit with two references; bob: two images, a job that fails in the worker, a cancelled one."""
    with httpx.Client(base_url=server.url, timeout=300) as http:
        edit = http.post(f"/run/{FLASH}/edit", headers=auth(key(server, "alice")), json={
            "prompt": "paint it", "image_urls": [data_uri(BIG_REF), data_uri(SMALL_REF)],
            "image_size": {"width": 512, "height": 512}})
        assert edit.status_code == 200, edit.text
        two = http.post(f"/run/{FLASH}", headers=auth(key(server, "bob")), json={
            "prompt": "two cats", "num_images": 2, "image_size": {"width": 512, "height": 512}})
        assert two.status_code == 200 and len(two.json()["images"]) == 2, two.text
        # a request the engine refuses (a width without a height): it runs on a worker and fails there
        failed = server.store.submit(endpoint=FLASH, dialect="fal", owner=key_id(server, "bob"),
                                     request={"model": "dev", "prompt": "x", "width": 512, "steps": 2})
        assert wait_terminal(server, failed.id).status == "failed"
        workers = server.app.state.workers
        for worker in workers:  # cancelled while queued
            worker.stop()
        try:
            queued = http.post(f"/queue/{FLASH}", headers=auth(key(server, "bob")), json={"prompt": "never"})
            cancel = http.put(queued.json()["cancel_url"], headers=auth(key(server, "bob")))
            assert cancel.status_code == 202, cancel.text
        finally:
            for worker in workers:
                worker.start()
    return {"failed": failed.id, "cancelled": queued.json()["request_id"]}


def usage(server, who: str, **params) -> httpx.Response:
    return httpx.get(f"{server.url}/api/usage", params=params, headers=auth(key(server, who)), timeout=60)


def test_a_key_sees_its_own_usage(server, made):
    alice = usage(server, "alice", group_by="key")
    assert alice.status_code == 200, alice.text
    body = alice.json()
    assert [g["group"] for g in body["groups"]] == [key_id(server, "alice")]
    assert body["groups"][0]["name"] == "alice" and body["currency"] == "USD" and body["group_by"] == "key"
    total = body["total"]
    assert (total["jobs"], total["completed"], total["input_images"], total["input_megapixels"],
            total["output_images"], total["output_megapixels"], total["megapixels"]) == (1, 1, 2, 3, 1, 1, 4)
    assert total["gpu_seconds"] > 0 and total["steps"] > 0
    assert total["cost"] == pytest.approx(0.03 + 3 * 0.015)  # its first output megapixel, then 3 more

    bob = usage(server, "bob", group_by="endpoint").json()
    assert [g["group"] for g in bob["groups"]] == [FLASH]
    flash = bob["groups"][0]
    assert (flash["jobs"], flash["completed"], flash["failed"], flash["cancelled"]) == (3, 1, 1, 1)
    # the failed and the cancelled job bill nothing: the two 512x512 images are all
    assert (flash["output_images"], flash["megapixels"], flash["input_images"]) == (2, 2, 0)
    assert flash["cost"] is None and flash["unpriced_megapixels"] == 2  # no price for this endpoint


def test_an_admin_key_sees_everyone(server, made):
    body = usage(server, "ops", group_by="key").json()
    groups = {g["group"]: g for g in body["groups"]}
    assert groups[key_id(server, "alice")]["megapixels"] == 4 and groups[key_id(server, "alice")]["name"] == "alice"
    assert groups[key_id(server, "bob")]["jobs"] == 3 and groups[key_id(server, "bob")]["megapixels"] == 2
    for name in ("jobs", "megapixels", "input_megapixels", "output_images"):
        assert body["total"][name] == sum(g[name] for g in groups.values())
    by_endpoint = {g["group"]: g for g in usage(server, "ops", group_by="endpoint").json()["groups"]}
    assert by_endpoint[f"{FLASH}/edit"]["megapixels"] == 4
    days = usage(server, "ops", group_by="day").json()
    assert days["groups"][-1]["group"] == time.strftime("%Y-%m-%d", time.gmtime())


def test_from_and_to_select_by_finish_time(server, made):
    future = usage(server, "alice", **{"from": "2999-01-01"}).json()
    assert future["groups"] == [] and future["total"]["jobs"] == 0 and future["from"] == "2999-01-01T00:00:00Z"
    past = usage(server, "alice", **{"from": "2000-01-01T00:00:00+00:00", "to": "2999-01-01"}).json()
    assert past["total"]["megapixels"] == 4
    assert usage(server, "alice", to="2000-01-01").json()["total"]["jobs"] == 0


@pytest.mark.parametrize(("params", "field"), [
    ({"from": "last tuesday"}, "from"),
    ({"to": "2026-13-01"}, "to"),
    ({"from": "9999-12-31T23:59:59-23:59"}, "from"),  # past year 9999 in UTC
    ({"from": "2026-02-01", "to": "2026-01-01"}, "to"),
    ({"group_by": "model"}, "group_by"),
])
def test_bad_query_values_are_422_naming_the_field(server, params, field):
    response = usage(server, "alice", **params)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", field] and error["msg"] and error["type"] == "value_error"


def test_usage_needs_a_key(server):
    assert httpx.get(f"{server.url}/api/usage", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/api/usage", headers=auth("wrong"), timeout=30).status_code == 401


# ---- fluxserve usage -------------------------------------------------------------------------------------------
def run_usage(server, catalog_path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "220"}
    return subprocess.run([sys.executable, "-m", "fluxserve", "usage", "--db", server.settings.db,
                           "--catalog", str(catalog_path), *args],
                          check=False, capture_output=True, text=True, timeout=300, env=env)


def _row(output: str, start: str) -> list[str]:
    [line] = [line for line in output.splitlines() if line.strip("│ ").startswith(start)]
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def test_cli_prints_a_table_with_totals(server, made, catalog_path):
    done = run_usage(server, catalog_path, "--by", "key")
    assert done.returncode == 0, done.stderr
    assert "Usage by key (all time)" in done.stdout and "cost USD" in done.stdout
    alice = _row(done.stdout, key_id(server, "alice"))
    # key, jobs, done, failed, cancel, out img, ref img, ref MP, out MP, MP, GPU s, steps, cost
    assert alice[0] == f"{key_id(server, 'alice')} (alice)"
    assert alice[1:10] == ["1", "1", "0", "0", "1", "2", "3", "1", "4"] and alice[12] == "0.0750"
    bob = _row(done.stdout, key_id(server, "bob"))
    assert bob[1:5] == ["3", "1", "1", "1"] and bob[9] == "2" and bob[12] == "-"
    total = _row(done.stdout, "total")
    admin = usage(server, "ops").json()["total"]
    assert total[1] == str(admin["jobs"]) and total[9] == str(admin["megapixels"])

    mine = run_usage(server, catalog_path, "--key", key_id(server, "bob"), "--since", "7d", "--by", "endpoint")
    assert mine.returncode == 0, mine.stderr
    assert f"key {key_id(server, 'bob')}" in mine.stdout and "since " in mine.stdout
    assert _row(mine.stdout, FLASH)[1:5] == ["3", "1", "1", "1"]
    assert _row(mine.stdout, "total")[9] == "2" and key_id(server, "alice") not in mine.stdout

    day = run_usage(server, catalog_path, "--by", "day", "--since", "2999-01-01")
    assert day.returncode == 0 and _row(day.stdout, "total")[1] == "0"


@pytest.mark.parametrize("since", ["last week", "999999999d"])
def test_cli_refuses_a_bad_since(server, catalog_path, since):
    done = run_usage(server, catalog_path, "--since", since)
    assert done.returncode == 2 and "--since" in done.stderr and "7d" in done.stderr


# ---- the OpenAI SDK --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def carol(server):
    return openai_client(server.url, key=key(server, "carol"), max_retries=0, timeout=300)


def _numbers(usage_object) -> tuple[int, ...]:
    extra = usage_object.model_extra
    return (usage_object.input_tokens, usage_object.input_tokens_details.image_tokens,
            usage_object.input_tokens_details.text_tokens, usage_object.output_tokens, usage_object.total_tokens,
            extra["input_images"], extra["images"], extra["megapixels"])


def test_openai_usage_counts_images_and_megapixels(server, carol):
    reported = 0
    generated = carol.images.generate(model="flux-2-flash", prompt="two boats", n=2, size="512x512")
    assert len(generated.data) == 2
    # input MP, image_tokens, text_tokens, output MP, total MP, references, images, megapixels
    assert _numbers(generated.usage) == (0, 0, 0, 2, 2, 0, 2, 2)
    reported += generated.usage.total_tokens

    # [pro] makes one image per job: n=2 is two jobs, and a 1030x1030 image bills 2 MP
    pro = carol.images.generate(model="flux-2-pro", prompt="a tower", n=2, size="1030x1030",
                                extra_body={"steps": 2})
    assert len(pro.data) == 2 and _numbers(pro.usage) == (0, 0, 0, 4, 4, 0, 2, 4)
    reported += pro.usage.total_tokens

    edited = carol.images.edit(model="flux-2-flash", prompt="merge", size="512x512",
                               image=[("big.png", png(BIG_REF)), ("small.png", png(SMALL_REF, "red"))])
    assert _numbers(edited.usage) == (3, 3, 0, 1, 4, 2, 1, 4)
    reported += edited.usage.total_tokens

    stream = list(carol.images.edit(model="flux-2-flash", prompt="night", size="512x512", stream=True,
                                    image=("big.png", png(BIG_REF))))
    [completed] = [event for event in stream if event.type == "image_edit.completed"]
    assert _numbers(completed.usage) == (2, 2, 0, 1, 3, 1, 1, 3)
    reported += completed.usage.total_tokens

    events = list(carol.images.generate(model="flux-2-flash", prompt="rain", n=2, size="512x512", stream=True))
    completed = [event for event in events if event.type == "image_generation.completed"]
    assert [_numbers(event.usage) for event in completed] == [(0, 0, 0, 1, 1, 0, 1, 1)] * 2
    reported += sum(event.usage.total_tokens for event in completed)

    # what the responses said is what the usage report bills
    assert usage(server, "carol").json()["total"]["megapixels"] == reported == 2 + 4 + 4 + 3 + 2
