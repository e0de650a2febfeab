"""Input checks at the edge, in every dialect, on SQLite and PostgreSQL: text no database or UTF-8 answer can
hold (an unpaired surrogate ``\\ud800``, U+0000), numbers that are no JSON, bodies nested past any use, odd
headers, cursors, tokens and file names. Each is a 4xx naming the field in the dialect's own format, no job is
made, and rows an older server already stored with such text never break a listing."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import httpx
import pytest
from db_fixtures import fresh_schema
from fal_helpers import Server, settings_for
from PIL import Image

from fluxserve.config import Settings

pytest_plugins = ["db_fixtures"]

FAL_QUEUE, FAL_RUN = "/queue/fal-ai/flux-2", "/run/fal-ai/flux-2"
TRAINER = "/queue/fal-ai/flux-2-trainer"
OPENAI, OPENAI_EDITS = "/v1/images/generations", "/v1/images/edits"
REPLICATE = "/v1/models/black-forest-labs/flux-2-dev/predictions"
# JSON text of strings no store or answer can hold, as a client's JSON encoder writes them
BAD = {"surrogate": '"a\\ud800b"', "nul": '"a\\u0000b"', "low-surrogate": '"\\udc00"'}
# deeper than the JSON decoder can recurse through (RecursionError), within FLUXSERVE_MAX_JSON_VALUES (a body
# of 100,000 levels is refused before it is parsed, with a 413, by that limit)
DEEP = 5_000
DEPTH_LIMIT = 32


class Keys:
    def __init__(self, store):
        self.alice_id, self.alice = store.create_key("alice")
        self.admin_id, self.admin = store.create_key("ops", admin=True)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request, tmp_path_factory):
    """Keys in use, no workers: a request that passes the edge stays queued."""
    base = Settings(data_dir=tmp_path_factory.mktemp("edge"), demo=True, device="cpu")
    settings = settings_for(base, f"edge-{request.param}")
    if request.param == "sqlite":
        with Server(settings, start_workers=False, auth_required=True) as running:
            running.keys = Keys(running.store)
            yield running
        return
    with fresh_schema(request.getfixturevalue("pg_url"), "fluxserve_edge") as url:
        with Server(replace(settings, db=url), start_workers=False, auth_required=True) as running:
            running.keys = Keys(running.store)
            yield running
        running.store.close()


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


def send(server, path: str, text: str | bytes, key: str | None = None, **headers) -> httpx.Response:
    body = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return httpx.post(server.url + path, content=body, timeout=60,
                      headers={"content-type": "application/json", **auth(key or server.keys.alice), **headers})


def answer(response: httpx.Response):
    """The answer as JSON, decoded strictly from UTF-8 (an answer that is not valid UTF-8 fails here)."""
    return json.loads(response.content.decode("utf-8"))


def jobs_of(server) -> int:
    return len(server.store.list(limit=10_000))


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# ---- fal -----------------------------------------------------------------------------------------------------
FAL_CASES = [  # (body with {bad} where the bad string goes, the loc it is named by)
    ('{{"prompt": {bad}}}', ["body", "prompt"]),
    ('{{"prompt": "a fox", "extra": {bad}}}', ["body", "extra"]),
    ('{{"prompt": "a fox", "meta": {{"tags": ["ok", {bad}]}}}}', ["body", "meta", "tags", 1]),
    ('{{"prompt": "a fox", "loras": [{{"path": {bad}, "scale": 1}}]}}', ["body", "loras", 0, "path"]),
]


@pytest.mark.parametrize("path", [FAL_QUEUE, FAL_RUN])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("body,loc", FAL_CASES, ids=["prompt", "extra", "nested", "lora"])
def test_fal_refuses_text_that_cannot_be_stored(server, path, bad, body, loc):
    before = jobs_of(server)
    response = send(server, path, body.format(bad=BAD[bad]))
    assert response.status_code == 422, response.text
    detail = answer(response)["detail"]
    assert [entry["loc"] for entry in detail] == [loc]
    assert ("U+0000" if bad == "nul" else "surrogate") in detail[0]["msg"]
    assert jobs_of(server) == before


def test_fal_names_a_bad_key_printably(server):
    response = send(server, FAL_QUEUE, '{"prompt": "a fox", "x\\ud800": 1}')
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"] == ["body", "x\\ud800"]


def test_fal_refuses_the_utf8_bytes_of_a_surrogate(server):
    response = send(server, FAL_QUEUE, b'{"prompt": "a fox \xed\xa0\x80"}')
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"] == ["body", "prompt"]


def test_fal_trainer_input_is_checked_too(server):
    response = send(server, TRAINER, '{"image_data_url": "https://example.com/a.zip", "trigger_word": "\\ud800"}')
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"] == ["body", "trigger_word"]


def test_fal_still_takes_emoji_and_escaped_pairs(server):
    response = send(server, FAL_QUEUE, '{"prompt": "a fox \U0001f98a and \\ud83e\\udd8a", "extra": "\\u00e9"}')
    assert response.status_code == 200, response.text
    job = server.store.get(answer(response)["request_id"])
    assert job.request["prompt"] == "a fox \U0001f98a and \U0001f98a"


@pytest.mark.parametrize("path", [FAL_QUEUE, FAL_RUN, TRAINER])
@pytest.mark.parametrize("levels", [DEEP, DEPTH_LIMIT + 1])
def test_fal_refuses_deep_nesting(server, path, levels):
    response = send(server, path, f'{{"prompt": "a fox", "image_data_url": "x", "extra": {deep(levels)}}}')
    assert response.status_code == 422, response.text
    (entry,) = answer(response)["detail"]
    assert entry["loc"] == ["body", "extra", *[0] * (DEPTH_LIMIT - 1)]
    assert f"at most {DEPTH_LIMIT} levels" in entry["msg"]


def test_fal_takes_nesting_at_the_limit(server):
    response = send(server, FAL_QUEUE, f'{{"prompt": "a fox", "extra": {deep(DEPTH_LIMIT - 1)}}}')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("literal", ["NaN", "1e400"])
def test_fal_refuses_numbers_json_cannot_hold_in_extra_fields(server, literal):
    response = send(server, FAL_QUEUE, f'{{"prompt": "a fox", "extra": {{"x": {literal}}}}}')
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"] == ["body", "extra", "x"]


# ---- OpenAI --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("body,param", [
    ('{{"prompt": {bad}}}', "prompt"),
    ('{{"prompt": "a fox", "provider": {{"style": [{bad}]}}}}', "provider.style[0]"),
    ('{{"prompt": "a fox", "user": {bad}}}', "user"),
], ids=["prompt", "passthrough", "ignored"])
def test_openai_refuses_text_that_cannot_be_stored(server, bad, body, param):
    before = jobs_of(server)
    response = send(server, OPENAI, body.format(bad=BAD[bad]))
    assert response.status_code == 400, response.text
    error = answer(response)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert jobs_of(server) == before


def test_openai_edits_refuse_it_in_json_and_in_multipart(server):
    body = '{"prompt": "a fox", "images": [{"image_url": "https://example.com/\\ud800.png"}]}'
    response = send(server, OPENAI_EDITS, body)
    assert response.status_code == 400, response.text
    assert answer(response)["error"]["param"] == "images[0].image_url"
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(png, format="PNG")
    for fields, param in (({"prompt": "a \x00 fox"}, "prompt"),
                          ({"prompt": "a fox", "image_url": "https://example.com/\x00.png"}, "image_url"),
                          ({"prompt": "a fox", "style_hint": "\x00"}, "style_hint")):
        response = httpx.post(server.url + OPENAI_EDITS, data=fields, files={"image": ("a.png", png.getvalue())},
                              headers=auth(server.keys.alice), timeout=60)
        assert response.status_code == 400, response.text
        assert answer(response)["error"]["param"] == param


def test_openai_refuses_deep_nesting(server):
    for levels in (DEEP, DEPTH_LIMIT + 1):
        response = send(server, OPENAI, f'{{"prompt": "a fox", "provider": {deep(levels)}}}')
        assert response.status_code == 400, response.text
        assert answer(response)["error"]["param"] == "provider" + "[0]" * (DEPTH_LIMIT - 1)


def test_openai_client_sees_a_bad_request_naming_the_field(server):
    import openai

    from fluxserve.compat.openai import client as openai_client

    client = openai_client(server.url, key=server.keys.alice, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # (the SDK cannot even encode an unpaired surrogate)
        client.images.generate(prompt="a fox \x00")
    assert err.value.param == "prompt"


# ---- Replicate -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("path,body,field", [
    (REPLICATE, '{{"input": {{"prompt": {bad}}}}}', "input.prompt"),
    (REPLICATE, '{{"input": {{"prompt": "a fox", "extra": {{"x": [{bad}]}}}}}}', "input.extra.x.0"),
    (REPLICATE, '{{"input": {{"prompt": "a fox"}}, "webhook": {bad}}}', "webhook"),
    ("/v1/predictions", '{{"version": {bad}, "input": {{"prompt": "a fox"}}}}', "version"),
], ids=["prompt", "extra", "webhook", "version"])
def test_replicate_refuses_text_that_cannot_be_stored(server, bad, path, body, field):
    before = jobs_of(server)
    response = send(server, path, body.format(bad=BAD[bad]))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [f["field"] for f in answer(response)["invalid_fields"]] == [field]
    assert jobs_of(server) == before


def test_replicate_refuses_deep_nesting(server):
    for levels in (DEEP, DEPTH_LIMIT + 1):
        response = send(server, REPLICATE, f'{{"input": {{"prompt": "a fox", "extra": {deep(levels)}}}}}')
        assert response.status_code == 422, response.text
        assert [f["field"] for f in answer(response)["invalid_fields"]] == [
            ".".join(["input", "extra", *["0"] * (DEPTH_LIMIT - 2)])]


def test_replicate_client_sees_a_422_naming_the_field(server):
    from replicate.exceptions import ReplicateError

    from fluxserve.compat.replicate import client as replicate_client

    client = replicate_client(server.url, key=server.keys.alice)
    with pytest.raises(ReplicateError) as err:
        client.predictions.create(model="black-forest-labs/flux-2-dev", input={"prompt": "a fox \x00"})
    assert err.value.status == 422 and "input.prompt" in err.value.detail


# ---- rows an older server stored: every reader answers ---------------------------------------------------------
SURROGATE, NUL = "\ud800", "\x00"


def claim(store, job_id: str, worker_id: str) -> None:
    """Claim ``job_id`` for ``worker_id``, giving back any other queued job claimed on the way."""
    others = []
    for _ in range(10_000):
        claimed = store.claim(worker_id)
        assert claimed is not None, f"job {job_id} was not queued"
        if claimed.id == job_id:
            break
        others.append(claimed.id)
    for other in others:
        store.release(other, worker_id)


def old_rows(server) -> dict[str, str]:
    """Jobs of every dialect holding what an older server let through, written through the store as it did."""
    store, owner = server.store, server.keys.alice_id
    bad = f"a fox {SURROGATE} {NUL} \udc00"
    request = {"model": "dev", "prompt": bad, "steps": 2, "width": 64, "height": 64}
    extra = {"prompt": bad, "extra": {"x": [SURROGATE, NUL], f"key{SURROGATE}": 1}}
    if store.is_sqlite:
        extra["nan"] = float("nan")  # PostgreSQL's json refuses NaN: no older server could store it there
    ids = {}
    for dialect, input_ in (("fal", extra), ("openai", extra),
                            ("replicate", extra | {"__model__": "black-forest-labs/flux-2-dev",
                                                   "__version__": "x"})):
        ids[dialect] = store.submit(endpoint="fal-ai/flux-2", dialect=dialect, request=request, input=input_,
                                    owner=owner).id
    done = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request=request, input=extra, owner=owner).id
    claim(store, done, "old-worker")
    store.complete(done, "old-worker", {"images": [], "prompt": bad, "seed": 1, "timings": {"inference": 0.5}})
    claim(store, ids["replicate"], "old-worker")
    store.fail(ids["replicate"], "failed", "input_error", worker_id="old-worker",
               error_detail={"field": f"extra.{SURROGATE}", "message": bad})
    ids["completed"] = done
    return ids


def test_rows_an_older_server_stored_never_break_a_listing(server):
    ids = old_rows(server)
    alice, admin = auth(server.keys.alice), auth(server.keys.admin)
    gets = [
        ("/api/history", alice), ("/api/history", admin), ("/api/history?q=fox", alice),
        ("/api/history?q=fox", admin), ("/api/history?q=zebra", admin),
        ("/v1/models/requests/by-endpoint?endpoint_id=fal-ai/flux-2&expand=payloads", alice),
        ("/v1/models/requests/by-endpoint?endpoint_id=fal-ai/flux-2&expand=payloads", admin),
        ("/v1/predictions", alice), ("/v1/predictions", admin),
        (f"/v1/predictions/{ids['replicate']}", alice),
        (f"/queue/fal-ai/flux-2/requests/{ids['completed']}/status", alice),
        (f"/queue/fal-ai/flux-2/requests/{ids['completed']}/status?logs=1", alice),
        (f"/queue/fal-ai/flux-2/requests/{ids['completed']}", alice),
        (f"/queue/fal-ai/flux-2/requests/{ids['fal']}/status", alice),
    ]
    for path, headers in gets:
        response = httpx.get(server.url + path, headers=headers, timeout=60)
        assert response.status_code in (200, 202), (path, response.status_code, response.text[:300])
        answer(response)
    history = answer(httpx.get(server.url + "/api/history?q=fox", headers=alice, timeout=60))["items"]
    assert {ids["fal"], ids["openai"], ids["replicate"], ids["completed"]} <= {item["id"] for item in history}
    assert all("\ufffd" in item["prompt"] for item in history if item["id"] in ids.values())


def test_a_failure_message_is_always_storable(server):
    """A worker's failure quotes the caller's LoRA URL, NUL and all: the job still ends at once."""
    store = server.store
    job = store.submit(endpoint="fal-ai/flux-2", dialect="fal", owner=server.keys.alice_id,
                       request={"model": "dev", "prompt": "a fox", "steps": 2})
    claim(store, job.id, "worker-nul")
    url = f"https://example.com/lora{NUL}{SURROGATE}.safetensors"
    failed = store.fail(job.id, f"could not download {url!s}", "input_error", worker_id="worker-nul",
                        error_detail={"field": "loras[0].path", "message": f"no LoRA at {url}"},
                        lines=[{"message": f"fetching {url}"}])
    assert failed is not None and failed.status == "failed"
    stored = store.get(job.id)
    assert stored.status == "failed" and NUL not in stored.error and "\ufffd" in stored.error
    assert NUL not in stored.error_detail["message"]
    assert [NUL in line.message for line in store.logs(job.id)] == [False]
    store.log(job.id, f"late line {NUL}{SURROGATE}")
    assert all(NUL not in line.message for line in store.logs(job.id))
    response = httpx.get(f"{server.url}/queue/fal-ai/flux-2/requests/{job.id}?logs=1",
                         headers=auth(server.keys.alice), timeout=60)
    assert response.status_code == 422 and answer(response)["detail"][0]["loc"] == ["body", "loras", 0, "path"]


# ---- headers, tokens, cursors, file names ----------------------------------------------------------------------
def test_a_file_token_with_a_non_ascii_digit_is_refused(server):
    response = httpx.get(server.url + "/files/x?token=%C2%B2.abc", timeout=60)
    assert response.status_code == 401, response.text


def test_a_previews_header_with_a_non_ascii_digit_is_refused(server):
    response = send(server, FAL_QUEUE, '{"prompt": "a fox"}', **{"X-Fluxserve-Previews": b"\xb2"})
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"] == ["header", "x-fluxserve-previews"]


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_replicate_cursor_out_of_range_is_refused(server, when):
    cursor = base64.urlsafe_b64encode(when.encode()).decode()
    response = httpx.get(server.url + "/v1/predictions", params={"cursor": cursor},
                         headers=auth(server.keys.alice), timeout=60)
    assert response.status_code == 422, response.text
    assert [f["field"] for f in answer(response)["invalid_fields"]] == ["cursor"]


def test_a_fal_history_cursor_out_of_range_or_too_deep_is_refused(server):
    for value in (["ended_at", "0001-01-01T00:00:00+14:00", "2025-01-01T00:00:00+00:00", "x"],
                  ["ended_at", "2025-01-01T00:00:00+00:00", "0001-01-01T00:00:00+14:00", "x"]):
        cursor = base64.urlsafe_b64encode(json.dumps(value).encode()).decode()
        response = httpx.get(server.url + "/v1/models/requests/by-endpoint", headers=auth(server.keys.alice),
                             params={"endpoint_id": "fal-ai/flux-2", "cursor": cursor}, timeout=60)
        assert response.status_code == 422, response.text
        assert answer(response)["detail"][0]["loc"] == ["query", "cursor"]
    cursor = base64.urlsafe_b64encode(deep(3000).encode()).decode()
    response = httpx.get(server.url + "/v1/models/requests/by-endpoint", headers=auth(server.keys.alice),
                         params={"endpoint_id": "fal-ai/flux-2", "cursor": cursor}, timeout=60)
    assert response.status_code == 422, response.text


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_file_names_that_look_like_the_storage_sidecar_are_stored(server):
    data, name = png_bytes(), "photo.content-type"
    response = httpx.post(server.url + "/files/upload", content=data, timeout=60,
                          headers={**auth(server.keys.alice), "X-Fal-File-Name": name})
    assert response.status_code == 200, response.text
    assert httpx.get(answer(response)["access_url"], timeout=60).content == data
    response = httpx.post(server.url + "/storage/upload/initiate", json={"file_name": name,
                          "content_type": "image/png"}, headers=auth(server.keys.alice), timeout=60)
    assert response.status_code == 200, response.text
    put = httpx.put(answer(response)["upload_url"], content=data, timeout=60)
    assert put.status_code == 200, put.text
    assert httpx.get(answer(response)["file_url"], timeout=60).content == data
    response = httpx.post(server.url + "/v1/files", files={"content": (name, data, "image/png")},
                          headers=auth(server.keys.alice), timeout=60)
    assert response.status_code == 201, response.text
    assert httpx.get(answer(response)["urls"]["get"], timeout=60).content == data


@pytest.mark.parametrize("body,loc", [
    ({"file_name": 5, "content_type": "image/png"}, ["body", "file_name"]),
    ({"file_name": "a.png", "content_type": ["image/png"]}, ["body", "content_type"]),
    ({"file_name": "a\x00.png"}, ["body", "file_name"]),
])
def test_initiate_refuses_fields_of_the_wrong_type(server, body, loc):
    response = httpx.post(server.url + "/storage/upload/initiate", json=body, headers=auth(server.keys.alice),
                          timeout=60)
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"] == loc


def test_initiate_refuses_deep_nesting(server):
    response = send(server, "/storage/upload/initiate", f'{{"file_name": {deep(DEEP)}}}')
    assert response.status_code == 422, response.text
    assert answer(response)["detail"][0]["loc"][:2] == ["body", "file_name"]


def test_a_safetensors_upload_with_a_deep_header_is_refused_as_unsupported(server):
    header = deep(DEEP).encode()
    data = len(header).to_bytes(8, "little") + header
    response = httpx.post(server.url + "/files/upload", content=data, headers=auth(server.keys.alice), timeout=60)
    assert response.status_code == 415, response.text


def test_the_depth_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_MAX_JSON_DEPTH", "8")
    assert Settings.from_env().max_json_depth == 8
    assert Settings().max_json_depth == DEPTH_LIMIT


def test_the_check_is_a_pure_function_fit_for_a_large_body():
    """``jsonsafe.decode`` is what every dialect calls; a large plain body is not walked value by value."""
    from fluxserve import jsonsafe

    body = json.dumps({"prompt": "a fox", "loras": [{"path": f"https://example.com/{i}.safetensors",
                                                      "scale": 1.0} for i in range(20_000)]}).encode()
    assert jsonsafe.decode(body)["loras"][-1]["scale"] == 1.0
    assert jsonsafe._plainly_fine(body, DEPTH_LIMIT)
    for bad, path in ((b'"\\ud800"', ("loras", 19_999, "path")), (b"NaN", ("loras", 19_999, "scale"))):
        needle = b'"https://example.com/19999.safetensors"' if b"ud800" in bad else b"1.0}]"
        broken = body.replace(needle, bad if b"ud800" in bad else bad + b"}]")
        with pytest.raises(jsonsafe.BadJson) as caught:
            jsonsafe.decode(broken)
        assert caught.value.path == path


def test_a_worker_fails_a_job_whose_lora_url_holds_a_nul_at_once(db_url, engine, tmp_path):
    """The engine's error quotes the LoRA URL, NUL and all; the job fails on its first attempt (it used to stay
    running on PostgreSQL, its failure unstorable, until three leases had expired)."""
    from fluxserve.jobs.store import JobStore
    from fluxserve.jobs.worker import Worker
    from fluxserve.storage import LocalStorage

    store = JobStore(db_url)
    worker = Worker(store, engine, LocalStorage(tmp_path / "files"), poll_s=0.2).start()
    try:
        job = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request={
            "model": "dev", "prompt": "a fox", "width": 64, "height": 64, "steps": 1,
            "loras": [{"path": f"https://127.0.0.1:9/lora{NUL}.safetensors", "scale": 1.0}]})
        done = store.wait(job.id, timeout=120)
        assert done.status == "failed", (done.status, done.attempts)
        assert done.attempts == 1 and "\ufffd" in done.error and NUL not in done.error
    finally:
        worker.stop(timeout=60)
        store.close()


def test_every_error_the_store_records_is_storable(store):
    """Errors that quote what a caller or a provider sent: upstream calls, webhook attempts."""
    from fluxserve.jobs.store import utcnow

    job = store.submit(endpoint="fal-ai/flux-2", dialect="replicate", request={"model": "dev", "prompt": "a fox"},
                       webhook={"url": "https://example.com/hook", "dialect": "replicate"})
    now = utcnow()
    store.record_upstream_call(job.id, None, "fal-ai/flux-2", "fal", "fal-ai/flux-2", now, now, now, "failed",
                               error=f"provider said {NUL}{SURROGATE}")
    event = store.queue_webhook_event(job.id, "replicate", "start", "https://example.com/hook", {"x": 1})
    store.update_webhook_event(event, attempts=1, last_error=f"InvalidURL: https://example.com/{NUL}")
    claim(store, job.id, "w")
    store.fail(job.id, "failed", worker_id="w")
    (delivery,) = store.claim_deliveries(["replicate"])
    store.update_delivery(delivery.id, attempts=1, last_error=f"InvalidURL: https://example.com/{NUL}")
    assert NUL not in store.delivery(job.id)["last_error"]
