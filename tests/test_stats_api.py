"""``GET /api/stats`` and the stats histograms of ``/metrics`` over real HTTP, after real jobs on a server that
needs keys: a key sees the figures of its own jobs, an admin key everyone's; bad query values are 422s naming the
field; the histograms are labelled by endpoint and dialect."""

from __future__ import annotations

import httpx
import pytest
from fal_helpers import Server, settings_for
from prometheus_client.parser import text_string_to_metric_families

FLASH = "fal-ai/flux-2/flash"
SMALL = {"image_size": {"width": 512, "height": 512}}


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "stats-api"), auth_required=True) as running:
        store = running.store
        running.alice_id, running.alice = store.create_key("alice")
        running.bob_id, running.bob = store.create_key("bob")
        _, running.admin = store.create_key("ops", admin=True)
        with httpx.Client(base_url=running.url, timeout=120) as http:
            queued = http.post(f"/queue/{FLASH}", json={"prompt": "alice's queued owl", **SMALL},
                               headers={"Authorization": f"Key {running.alice}"})
            assert queued.status_code == 200, queued.text
            assert store.wait(queued.json()["request_id"], 120).status == "completed"
            sync = http.post("/v1/images/generations", headers={"Authorization": f"Bearer {running.bob}"},
                             json={"model": "flux-2-dev", "prompt": "bob's synchronous owl", "size": "64x64",
                                   "steps": 2})
            assert sync.status_code == 200, sync.text
        yield running


def stats(server, secret: str | None, **params) -> httpx.Response:
    headers = {"Authorization": f"Key {secret}"} if secret else {}
    return httpx.get(f"{server.url}/api/stats", params=params, headers=headers, timeout=60)


def test_a_key_sees_its_own_jobs_and_an_admin_everyones(server):
    alice = stats(server, server.alice, window="1h", group_by="dialect")
    assert alice.status_code == 200, alice.text
    body = alice.json()
    assert (body["window"], body["group_by"]) == ("1h", "dialect")
    [fal] = body["groups"]
    assert fal["key"] == "fal" and fal["jobs"] == fal["completed"] == 1 and fal["success_rate"] == 1.0
    assert fal["generation_ms"]["p50"] > 0 and fal["queue_wait_ms"]["p50"] >= 0
    # a queued call's first byte is its first progress event: before the job ended
    assert 0 < fal["ttfb_ms"]["p50"] <= fal["queue_wait_ms"]["p50"] + fal["generation_ms"]["p50"]

    [bob] = stats(server, server.bob, window="1h", group_by="dialect").json()["groups"]
    assert bob["key"] == "openai" and bob["jobs"] == 1
    # a synchronous call's first byte is the response: after the whole generation
    assert bob["ttfb_ms"]["p50"] >= bob["generation_ms"]["p50"] > 0

    admin = {g["key"]: g for g in stats(server, server.admin, window="24h", group_by="dialect").json()["groups"]}
    assert set(admin) == {"fal", "openai"} and admin["fal"]["jobs"] == 1 and admin["openai"]["jobs"] == 1
    by_endpoint = stats(server, server.admin, window="30d").json()
    assert by_endpoint["group_by"] == "endpoint" and by_endpoint["window"] == "30d"
    assert FLASH in {g["key"] for g in by_endpoint["groups"]}
    models = stats(server, server.alice, window="1h", group_by="model").json()["groups"]
    assert [g["key"] for g in models] == [server.store.list(owner=server.alice_id)[0].model]


def test_bad_query_values_and_missing_keys(server):
    for params, field, choices in (({"window": "7d"}, "window", "1h, 24h, 30d"),
                                   ({"group_by": "owner"}, "group_by", "endpoint, model, dialect")):
        answer = stats(server, server.alice, **params)
        assert answer.status_code == 422
        [error] = answer.json()["detail"]
        assert error["loc"] == ["query", field] and choices in error["msg"] and error["type"] == "value_error"
    assert stats(server, None).status_code == 401
    assert stats(server, "key_nobody:wrong").status_code == 401


def test_stats_page_is_served(server):
    page = httpx.get(f"{server.url}/stats", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/web/stats.js">' in page.text
    for asset, kind in (("stats.js", "text/javascript"), ("stats.css", "text/css")):
        assert httpx.get(f"{server.url}/web/{asset}", timeout=30).headers["content-type"].startswith(kind)
    assert 'href="/stats"' in httpx.get(f"{server.url}/", timeout=30).text  # linked from the playground


def test_metrics_histograms_are_labelled_by_endpoint_and_dialect(server):
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Key {server.admin}"}, timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    openai_endpoint = next(job.endpoint for job in server.store.list() if job.dialect == "openai")
    for endpoint, dialect in ((FLASH, "fal"), (openai_endpoint, "openai")):
        for histogram in ("fluxserve_inference_seconds", "fluxserve_queue_wait_seconds",
                          "fluxserve_time_to_first_byte_seconds"):
            assert value(f"{histogram}_count", endpoint=endpoint, dialect=dialect) >= 1, (histogram, dialect)
            assert value(f"{histogram}_bucket", endpoint=endpoint, dialect=dialect, le="+Inf") >= 1
        assert value("fluxserve_jobs_finished_total", endpoint=endpoint, dialect=dialect, status="completed") >= 1
