"""fal's request history (``GET /v1/models/requests/by-endpoint``), payload deletion (``DELETE /v1/models/
requests/{id}/payloads``) and the Replicate models endpoint's ``json_request_schema``: real HTTP against a real
server (demo models) with requests made through the fal, OpenAI and Replicate dialects; the store's paging on
SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import jsonschema
import pytest
from dialect_server import live_server  # noqa: F401  (fixture)

from fluxserve.compat.replicate import client as replicate_client

pytest_plugins = ["db_fixtures"]

DEV = "fal-ai/flux-2"
PRO = "fal-ai/flux-2-pro"
HISTORY = "/v1/models/requests/by-endpoint"
FAL_TINY = {"image_size": {"width": 512, "height": 512}, "num_inference_steps": 4}
ITEM_FIELDS = {"request_id", "endpoint_id", "sent_at", "started_at", "ended_at", "status_code", "duration"}


def key_headers(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


def history(server, secret: str, **params) -> httpx.Response:
    return httpx.get(server.url + HISTORY, params=params, headers=key_headers(secret), timeout=60)


def items(server, secret: str, **params) -> list[dict]:
    response = history(server, secret, **params)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def wait_done(server, secret: str, request_id: str, app: str = DEV) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/queue/{app}/requests/{request_id}/status", headers=key_headers(secret),
                           timeout=60).json()
        if status["status"] == "COMPLETED":
            return
        time.sleep(0.2)
    raise AssertionError(f"request {request_id} did not finish")


def fal_submit(server, secret: str, body: dict, app: str = DEV) -> str:
    response = httpx.post(f"{server.url}/queue/{app}", json=body, headers=key_headers(secret), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


@pytest.fixture(scope="module")
def keys(live_server):  # noqa: F811
    """(owner, other): two plain keys of their own, so no other module's requests show up."""
    store = live_server.store
    return store.create_key("history owner")[1], store.create_key("history other")[1]


@pytest.fixture(scope="module")
def made(live_server, keys):  # noqa: F811
    """Requests to fal-ai/flux-2 by the owner key through each dialect, one cancelled and one failed by the
    server, and one by the other key; their request ids by name."""
    owner, other = keys
    ids = {"fal": fal_submit(live_server, owner, {"prompt": "history via fal", **FAL_TINY})}
    response = httpx.post(live_server.url + "/v1/models/black-forest-labs/flux-2-dev/predictions",
                          json={"input": {"prompt": "history via replicate", "aspect_ratio": "custom",
                                          "width": 64, "height": 64, "steps": 2, "go_fast": False}},
                          headers={"Authorization": f"Bearer {owner}", "Prefer": "wait"}, timeout=300)
    assert response.status_code == 201, response.text
    ids["replicate"] = response.json()["id"]
    response = httpx.post(live_server.url + "/v1/images/generations",
                          json={"prompt": "history via openai", "model": "flux-2-dev", "size": "64x64", "steps": 1},
                          headers={"Authorization": f"Bearer {owner}"}, timeout=300)
    assert response.status_code == 200, response.text
    ids["other"] = fal_submit(live_server, other, {"prompt": "someone else's", **FAL_TINY})
    with live_server.workers_paused():
        ids["cancelled"] = fal_submit(live_server, owner, {"prompt": "history cancelled", **FAL_TINY})
        cancel = httpx.put(f"{live_server.url}/queue/{DEV}/requests/{ids['cancelled']}/cancel",
                           headers=key_headers(owner), timeout=60)
        assert cancel.status_code == 202
        ids["failed"] = fal_submit(live_server, owner, {"prompt": "history failed", **FAL_TINY})
        live_server.store.fail(ids["failed"], "RuntimeError: the engine broke", "internal_error")
    wait_done(live_server, owner, ids["fal"])
    deadline = time.monotonic() + 600
    while httpx.get(f"{live_server.url}/v1/predictions/{ids['replicate']}", headers={"Authorization": f"Bearer {owner}"},
                    timeout=60).json()["status"] not in ("succeeded", "failed", "canceled"):
        assert time.monotonic() < deadline, "the prediction did not finish"
        time.sleep(0.2)
    wait_done(live_server, other, ids["other"])
    listed = items(live_server, owner, endpoint_id=DEV, expand="payloads")
    ids["openai"] = next(i["request_id"] for i in listed if (i["json_input"] or {}).get("prompt") == "history via openai")
    return ids


def test_lists_the_requests_of_every_dialect(live_server, keys, made):  # noqa: F811
    owner, _ = keys
    response = history(live_server, owner, endpoint_id=DEV)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"items", "next_cursor", "has_more"}
    assert body["has_more"] is False and body["next_cursor"] is None
    by_id = {item["request_id"]: item for item in body["items"]}
    assert set(by_id) == {made[name] for name in ("fal", "replicate", "openai", "cancelled", "failed")}
    for item in by_id.values():
        assert set(item) == ITEM_FIELDS  # no payloads unless asked
        assert item["endpoint_id"] == DEV
        assert when(item["sent_at"]) <= when(item["ended_at"])
        assert item["duration"] == pytest.approx((when(item["ended_at"]) - when(item["sent_at"])).total_seconds(),
                                                 abs=0.002)
    for name in ("fal", "replicate", "openai"):
        item = by_id[made[name]]
        assert item["status_code"] == 200
        assert when(item["sent_at"]) <= when(item["started_at"]) <= when(item["ended_at"])
    assert by_id[made["cancelled"]]["status_code"] == 400 and by_id[made["cancelled"]]["started_at"] is None
    assert by_id[made["failed"]]["status_code"] == 500
    ended = [when(item["ended_at"]) for item in body["items"]]
    assert ended == sorted(ended, reverse=True)  # latest end first, fal's default order


def test_expand_payloads(live_server, keys, made):  # noqa: F811
    owner, _ = keys
    by_id = {item["request_id"]: item for item in items(live_server, owner, endpoint_id=DEV, expand="payloads")}
    fal_item = by_id[made["fal"]]
    assert fal_item["json_input"] == {"prompt": "history via fal", **FAL_TINY}
    output = fal_item["json_output"]
    assert output["prompt"] == "history via fal" and len(output["images"]) == 1
    image = httpx.get(output["images"][0]["url"], headers=key_headers(owner), timeout=60)
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    replicate_item = by_id[made["replicate"]]
    assert replicate_item["json_input"]["prompt"] == "history via replicate"
    assert not any(name.startswith("__") for name in replicate_item["json_input"])
    assert replicate_item["json_output"]["images"][0]["width"] == 64
    assert by_id[made["openai"]]["json_input"]["model"] == "flux-2-dev"
    assert by_id[made["cancelled"]]["json_output"]["error_type"] == "cancelled"
    assert by_id[made["failed"]]["json_output"] == {"detail": "RuntimeError: the engine broke",
                                                    "error_type": "internal_error"}


def test_filters(live_server, keys, made):  # noqa: F811
    owner, _ = keys
    ids = lambda **params: {item["request_id"] for item in items(live_server, owner, **params)}
    assert ids(endpoint_id=DEV, status="success") == {made["fal"], made["replicate"], made["openai"]}
    assert ids(endpoint_id=DEV, status="user_error") == {made["cancelled"]}
    assert ids(endpoint_id=DEV, status="error") == {made["failed"]}
    assert ids(endpoint_id=DEV, request_id=made["fal"]) == {made["fal"]}
    assert ids(endpoint_id=PRO) == set()
    both = {made["fal"], made["replicate"], made["openai"], made["cancelled"], made["failed"]}
    assert ids(endpoint_id=f"{PRO},{DEV}") == both
    assert ids(endpoint_id=[PRO, DEV]) == both  # repeated, as fal accepts too
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ids(endpoint_id=DEV, start=future, end=(datetime.now(UTC) + timedelta(hours=2)).isoformat()) == set()
    assert ids(endpoint_id=DEV, end=(datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")) == set()
    assert ids(endpoint_id=DEV, start=datetime.now(UTC).strftime("%Y-%m-%d"), status="error") == {made["failed"]}
    longest = items(live_server, owner, endpoint_id=DEV, sort_by="duration")
    durations = [item["duration"] for item in longest]
    assert durations == sorted(durations, reverse=True)


def test_a_key_sees_only_its_own_requests(live_server, keys, made):  # noqa: F811
    _, other = keys
    assert {item["request_id"] for item in items(live_server, other, endpoint_id=DEV)} == {made["other"]}
    assert items(live_server, other, endpoint_id=DEV, request_id=made["fal"]) == []
    admin = {item["request_id"] for item in items(live_server, live_server.admin_key, endpoint_id=DEV, limit=100)}
    assert {made["fal"], made["other"]} <= admin
    delete = httpx.delete(f"{live_server.url}/v1/models/requests/{made['fal']}/payloads", headers=key_headers(other),
                          timeout=60)
    assert delete.status_code == 404
    assert httpx.get(live_server.url + HISTORY, params={"endpoint_id": DEV}, timeout=60).status_code == 401


def test_paging_has_no_duplicates_or_gaps(live_server):  # noqa: F811
    _, secret = live_server.store.create_key("history pager")
    with live_server.workers_paused():
        made = [fal_submit(live_server, secret, {"prompt": f"page {i}", **FAL_TINY}, app=PRO) for i in range(7)]
        for request_id in made[1:6:2]:  # three end (cancelled); four stay queued
            httpx.put(f"{live_server.url}/queue/{PRO}/requests/{request_id}/cancel", headers=key_headers(secret),
                      timeout=60)
        try:
            for sort_by in ("ended_at", "duration"):
                seen, cursor, pages = [], None, 0
                while pages < 10:
                    params = {"endpoint_id": PRO, "limit": 2, "sort_by": sort_by} | ({"cursor": cursor} if cursor else {})
                    body = history(live_server, secret, **params).json()
                    seen += [item["request_id"] for item in body["items"]]
                    pages += 1
                    if pages == 1:  # requests sent meanwhile sort before the cursor: later pages do not shift
                        made.append(fal_submit(live_server, secret, {"prompt": "meanwhile", **FAL_TINY}, app=PRO))
                    assert body["has_more"] == (body["next_cursor"] is not None)
                    if not body["has_more"]:
                        break
                    cursor = body["next_cursor"]
                    assert len(body["items"]) == 2
                assert len(seen) == len(set(seen)), "a request was listed twice"
                assert set(seen) == set(made[:-1]), "a request was skipped"
                (first,) = items(live_server, secret, endpoint_id=PRO, limit=1, sort_by=sort_by)
                assert first["request_id"] == made[-1]  # in flight sorts as ending last, the latest sent first
        finally:
            for request_id in made:
                httpx.put(f"{live_server.url}/queue/{PRO}/requests/{request_id}/cancel", headers=key_headers(secret),
                          timeout=60)


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
    ({"limit": "many"}, "limit"),
    ({"status": "done"}, "status"),
    ({"sort_by": "prompt"}, "sort_by"),
    ({"start": "yesterday"}, "start"),
    ({"end": "2025-13-01"}, "end"),
    ({"start": "2025-02-01", "end": "2025-01-01"}, "start"),
    ({"cursor": "not a cursor"}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"[1, 2]").decode()}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(json.dumps(["duration", 1.5, "x"]).encode()).decode()}, "cursor"),
    ({"expand": "everything"}, "expand"),
    ({"endpoint_id": None}, "endpoint_id"),
    ({"endpoint_id": " , "}, "endpoint_id"),
    ({"endpoint_id": ",".join(["fal-ai/flux-2"] * 51)}, "endpoint_id"),
])
def test_bad_parameters_are_named(live_server, keys, params, field):  # noqa: F811
    query = {k: v for k, v in ({"endpoint_id": DEV} | params).items() if v is not None}
    response = history(live_server, keys[0], **query)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["query", field] and detail[0]["msg"] and detail[0]["type"]


def test_delete_payloads(live_server, keys):  # noqa: F811
    owner, _ = keys
    request_id = fal_submit(live_server, owner, {"prompt": "forget me", **FAL_TINY}, app=PRO)
    wait_done(live_server, owner, request_id, PRO)
    output = httpx.get(f"{live_server.url}/queue/{PRO}/requests/{request_id}", headers=key_headers(owner),
                       timeout=60).json()
    url = output["images"][0]["url"]
    response = httpx.delete(f"{live_server.url}/v1/models/requests/{request_id}/payloads",
                            headers=key_headers(owner), timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["cdn_delete_results"]
    assert len(results) == 1 and results[0]["exception"] is None
    assert results[0]["link"].split("?")[0] == url.split("?")[0]
    assert httpx.get(url, headers=key_headers(owner), timeout=60).status_code == 404
    assert httpx.get(f"{live_server.url}/queue/{PRO}/requests/{request_id}", headers=key_headers(owner),
                     timeout=60).status_code == 410
    (item,) = items(live_server, owner, endpoint_id=PRO, request_id=request_id, expand="payloads")
    assert item["json_input"] is None and item["json_output"] is None and item["status_code"] == 200
    with live_server.workers_paused():
        queued = fal_submit(live_server, owner, {"prompt": "still queued", **FAL_TINY}, app=PRO)
        try:
            busy = httpx.delete(f"{live_server.url}/v1/models/requests/{queued}/payloads", headers=key_headers(owner),
                                timeout=60)
            assert busy.status_code == 409 and busy.json()["error_type"] == "request_in_progress"
        finally:
            httpx.put(f"{live_server.url}/queue/{PRO}/requests/{queued}/cancel", headers=key_headers(owner), timeout=60)
    missing = httpx.delete(f"{live_server.url}/v1/models/requests/nope/payloads", headers=key_headers(owner),
                           timeout=60)
    assert missing.status_code == 404


# ---- the store, on SQLite and PostgreSQL -----------------------------------------------------------------------
def test_store_history_pages_and_outcomes(store):
    made = [store.submit(endpoint=DEV, dialect="fal", request={"prompt": str(i)}, owner="k").id for i in range(6)]
    store.submit(endpoint=PRO, dialect="fal", request={"prompt": "other endpoint"}, owner="k")
    for outcome in ("done", "done", "invalid", "broken"):
        job = store.claim("w")
        if outcome == "done":
            store.complete(job.id, "w", {"images": []})
        elif outcome == "invalid":
            store.fail(job.id, "bad prompt", "validation_error", worker_id="w",
                       error_detail={"field": "prompt", "message": "bad prompt"})
        else:
            store.fail(job.id, "boom", "internal_error", worker_id="w")
    store.submit(endpoint=DEV, dialect="fal", request={"prompt": "not k's"}, owner="j")  # after k's turns
    store.cancel_queued(made[4])  # made[5] stays queued
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)
    window = {"endpoints": [DEV], "start": start, "end": end, "owner": "k"}
    outcome = lambda name: {job.id for _, job in store.history(**window, outcome=name)}
    assert outcome("success") == set(made[:2])
    assert outcome("user_error") == {made[2], made[4]}
    assert outcome("error") == {made[3]}
    for sort in ("ended_at", "duration"):
        seen, after = [], None
        for page in range(10):
            rows = store.history(**window, sort=sort, after=after, limit=4)
            if page == 0:
                made.append(store.submit(endpoint=DEV, dialect="fal", request={"prompt": "new"}, owner="k").id)
            seen += [job.id for _, job in rows]
            if len(rows) < 4:
                break
            after = (rows[-1][0], rows[-1][1].created_at, rows[-1][1].id)
        assert sorted(seen) == sorted(made[:-1])
    first = store.history(**window, limit=len(made))
    assert [job.id for _, job in first[:3]] == [made[-1], made[-2], made[5]]  # in flight: ending last, latest first
    ended = [key for key, job in first if job.terminal]
    assert ended == sorted(ended, reverse=True)


# ---- Replicate: json_request_schema ---------------------------------------------------------------------------
def test_models_carry_a_json_request_schema(live_server):  # noqa: F811
    names = list(live_server.app.state.catalog.replicate_models)
    assert names
    for name in names:
        model = live_server.get(f"/v1/models/{name}").json()
        schema = model["json_request_schema"]
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        validator.validate({"input": {"prompt": "a lighthouse", "aspect_ratio": "16:9", "num_inference_steps": 28,
                                      "input_image": ["https://example.com/a.png"], "output_format": "jpg"},
                            "webhook": "https://example.com/hook", "webhook_events_filter": ["completed"]})
        for bad in ({}, {"input": {}}, {"input": {"prompt": "x", "aspect_ratio": "5:1"}},
                    {"input": {"prompt": "x", "steps": 51}}, {"input": {"prompt": "x", "output_quality": 101}},
                    {"input": {"prompt": "x"}, "webhook_events_filter": ["sometimes"]}):
            assert not validator.is_valid(bad), (name, bad)
        inputs = schema["properties"]["input"]["properties"]
        served = model["latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]["properties"]
        assert set(served) <= set(inputs)
        assert inputs["steps"]["default"] == served["steps"]["default"]
    pro = live_server.get("/v1/models/black-forest-labs/flux-2-pro").json()["json_request_schema"]
    steps = pro["properties"]["input"]["properties"]["num_inference_steps"]
    assert (steps["minimum"], steps["maximum"]) == (1, 50)  # seed 003: num_inference_steps 1-50


def test_replicate_client_still_reads_models(live_server):  # noqa: F811
    client = replicate_client(live_server.url, key=live_server.key)
    model = client.models.get("black-forest-labs/flux-2-pro")
    assert model.name == "flux-2-pro"
    assert "prompt" in model.latest_version.openapi_schema["components"]["schemas"]["Input"]["properties"]
