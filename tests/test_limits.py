"""Limits and contracts at the edge, in every dialect: seeds out of range or of the wrong type, prompts past
what the model reads, bodies past the server's limit (refused before they are read), bad query parameters.
Each is a 4xx naming the field in the calling dialect's error format, never a 5xx."""

from __future__ import annotations

import io
from dataclasses import replace

import httpx
import pytest
from fal_helpers import Server, settings_for
from PIL import Image

from fluxserve.config import Settings

MIB = 1024 * 1024
HUGE = 100 * MIB
BODY_LIMIT_MB = 1
PROMPT_LIMIT = 8192
FAL_RUN, FAL_QUEUE = "/run/fal-ai/flux-2", "/queue/fal-ai/flux-2"
OPENAI = "/v1/images/generations"
REPLICATE = "/v1/models/black-forest-labs/flux-2-dev/predictions"
TOO_BIG_SEED = 18446744073709551616  # 2**64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """No workers: nothing is generated, and a request that passes validation stays queued."""
    base = Settings(data_dir=tmp_path_factory.mktemp("limits"), demo=True, device="cpu")
    settings = replace(settings_for(base, "limits"), max_body_mb=BODY_LIMIT_MB, max_prompt_chars=PROMPT_LIMIT)
    with Server(settings, start_workers=False, auth_required=False) as running:
        yield running


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


# ---- seeds -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [FAL_RUN, FAL_QUEUE])
@pytest.mark.parametrize("seed", [TOO_BIG_SEED, -1, True, "7", 1.5])
def test_fal_refuses_bad_seeds(server, path, seed):
    response = post(server, path, {"prompt": "a fox", "seed": seed})
    assert response.status_code == 422, response.text
    assert [entry["loc"] for entry in response.json()["detail"]] == [["body", "seed"]]


def test_fal_accepts_the_largest_seed(server):
    response = post(server, FAL_QUEUE, {"prompt": "a fox", "seed": 2**63 - 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field,value", [("sync_mode", 1), ("enable_safety_checker", "false"),
                                         ("num_images", True), ("num_inference_steps", "20"),
                                         ("guidance_scale", True)])
def test_fal_types_are_strict(server, field, value):
    response = post(server, FAL_QUEUE, {"prompt": "a fox", field: value})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("seed", [TOO_BIG_SEED, -1, True, 2**63 - 1 + 1])
def test_openai_refuses_bad_seeds(server, seed):
    response = post(server, OPENAI, {"prompt": "a fox", "seed": seed})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "seed" and error["type"] == "invalid_request_error"


def test_openai_refuses_a_seed_that_overflows_with_n(server):
    # n=5 is two jobs (4 + 1 images) with consecutive seeds: the second one's would pass 2**63 - 1
    response = post(server, OPENAI, {"prompt": "a fox", "seed": 2**63 - 1, "n": 5})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [TOO_BIG_SEED, -1])
def test_replicate_refuses_bad_seeds(server, seed):
    response = post(server, REPLICATE, {"input": {"prompt": "a fox", "seed": seed}})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [f["field"] for f in problem["invalid_fields"]] == ["input.seed"]


# ---- prompts -----------------------------------------------------------------------------------------------
LONG_PROMPT = "a fox " * 166_000  # about 1 MB (inside the 1 MiB body limit of these tests)


@pytest.mark.parametrize("path", [FAL_RUN, FAL_QUEUE])
def test_fal_refuses_a_prompt_past_the_limit(server, path):
    response = post(server, path, {"prompt": LONG_PROMPT})
    assert response.status_code == 422, response.text
    entry = response.json()["detail"][0]
    assert entry["loc"] == ["body", "prompt"] and str(PROMPT_LIMIT) in entry["msg"]


def test_fal_accepts_a_prompt_at_the_limit(server):
    response = post(server, FAL_QUEUE, {"prompt": "x" * PROMPT_LIMIT})
    assert response.status_code == 200, response.text


def test_openai_refuses_a_prompt_past_the_limit(server):
    response = post(server, OPENAI, {"prompt": LONG_PROMPT})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "string_above_max_length"


def test_replicate_refuses_a_prompt_past_the_limit(server):
    response = post(server, REPLICATE, {"input": {"prompt": LONG_PROMPT}})
    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["invalid_fields"]] == ["input.prompt"]


# ---- query parameters --------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,field", [({"page_size": "abc"}, "page_size"), ({"page_size": 0}, "page_size"),
                                          ({"page_size": 1001}, "page_size"), ({"cursor": "%%%"}, "cursor"),
                                          ({"cursor": "bm90IGEgZGF0ZQ=="}, "cursor")])
def test_replicate_list_refuses_bad_query_parameters(server, params, field):
    response = httpx.get(server.url + "/v1/predictions", params=params, timeout=60)
    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["invalid_fields"]] == [field]


# ---- body size ---------------------------------------------------------------------------------------------
class CountingBody:
    """A request body of ``total`` bytes made on demand, counting how much the client was asked for."""

    def __init__(self, total: int, chunk: int = 64 * 1024):
        self.total, self.chunk, self.consumed = total, chunk, 0

    def __iter__(self):
        while self.consumed < self.total:
            piece = b" " * min(self.chunk, self.total - self.consumed)
            self.consumed += len(piece)
            yield piece


DIALECTS = [
    (FAL_QUEUE, lambda r: r.json()["error_type"] == "request_too_large"),
    (OPENAI, lambda r: r.json()["error"]["type"] == "invalid_request_error"),
    (REPLICATE, lambda r: r.json()["status"] == 413 and r.json()["title"] == "Request too large"),
]


@pytest.mark.parametrize("path,shape", DIALECTS)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_body_is_refused_before_it_is_read(server, path, shape, declared):
    body = CountingBody(HUGE)
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(HUGE)
    response = httpx.post(server.url + path, content=body, headers=headers, timeout=120)
    assert response.status_code == 413, response.text
    assert shape(response)
    assert body.consumed < HUGE // 4  # the server stopped reading long before the end


def test_uploads_have_their_own_larger_limit(server):
    small = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(small, format="PNG")
    data = small.getvalue() + b"\0" * (2 * BODY_LIMIT_MB * MIB)  # a real PNG (uploads are checked) made big
    token = httpx.post(server.url + "/storage/auth/token", timeout=60).json()["token"]
    response = httpx.post(server.url + "/files/upload", content=data, timeout=60,
                          headers={"Authorization": f"Bearer {token}", "content-type": "image/png"})
    assert response.status_code == 200, response.text
    response = httpx.post(server.url + "/v1/files", files={"content": ("big.png", data, "image/png")}, timeout=60)
    assert response.status_code == 201, response.text
    assert response.json()["size"] == len(data)


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-5", "soon"])
def test_fal_refuses_a_bad_request_timeout(server, value):
    response = httpx.post(server.url + FAL_QUEUE, json={"prompt": "a fox"}, timeout=60,
                          headers={"X-Fal-Request-Timeout": value})
    assert response.status_code == 400, response.text
    assert "X-Fal-Request-Timeout" in response.json()["detail"]


@pytest.mark.parametrize("field", ["n", "seed", "output_compression"])
def test_openai_refuses_an_infinite_integer(server, field):
    response = httpx.post(server.url + OPENAI, content=f'{{"prompt": "a fox", "{field}": 1e400}}', timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_the_limits_come_from_the_environment_and_the_serve_flags(monkeypatch):
    import argparse

    from fluxserve.commands import serve
    from fluxserve.commands.common import settings_from_args

    monkeypatch.setenv("FLUXSERVE_MAX_BODY_MB", "5")
    monkeypatch.setenv("FLUXSERVE_MAX_PROMPT_CHARS", "300")
    assert (Settings.from_env().max_body_mb, Settings.from_env().max_prompt_chars) == (5, 300)
    assert Settings().max_body_mb == 32 and Settings().max_prompt_chars == 8192
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--max-body-mb", "7", "--max-prompt-chars", "1000"])
    settings = settings_from_args(args, max_body_mb=args.max_body_mb, max_prompt_chars=args.max_prompt_chars)
    assert (settings.max_body_mb, settings.max_prompt_chars) == (7, 1000)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_openai_refuses_a_guidance_that_is_not_a_number(server, literal):
    response = httpx.post(server.url + OPENAI, content=f'{{"prompt": "a fox", "guidance": {literal}}}', timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "guidance"


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_fal_refuses_a_guidance_that_is_not_a_number(server, literal):
    response = httpx.post(server.url + FAL_QUEUE, content=f'{{"prompt": "a fox", "guidance_scale": {literal}}}',
                          timeout=60, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "guidance_scale"]


# ---- the official clients see these as their own error types ----------------------------------------------
def test_fal_client_sees_a_422_naming_the_seed(server):
    import fal_client

    import fluxserve.compat.fal

    names = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")
    saved = {name: getattr(fal_client.client, name) for name in names}
    fluxserve.compat.fal.use(server.url)
    try:
        for arguments in ({"prompt": "a fox", "seed": True}, {"prompt": "a fox", "seed": TOO_BIG_SEED}):
            with pytest.raises(fal_client.client.FalClientHTTPError) as err:
                fal_client.submit("fal-ai/flux-2", arguments=arguments)
            assert err.value.status_code == 422
            assert err.value.response.json()["detail"][0]["loc"] == ["body", "seed"]
    finally:
        for name, value in saved.items():
            setattr(fal_client.client, name, value)


def test_openai_client_sees_a_bad_request_naming_the_field(server):
    import openai

    from fluxserve.compat.openai import client as openai_client

    client = openai_client(server.url, key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a fox", extra_body={"seed": TOO_BIG_SEED})
    assert err.value.param == "seed"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt=LONG_PROMPT)
    assert err.value.param == "prompt" and err.value.code == "string_above_max_length"


def test_replicate_client_sees_a_422_naming_the_field(server):
    from replicate.exceptions import ReplicateError

    from fluxserve.compat.replicate import client as replicate_client

    client = replicate_client(server.url, key="unused")
    with pytest.raises(ReplicateError) as err:
        client.predictions.create(model="black-forest-labs/flux-2-dev", input={"prompt": "a fox", "seed": -1})
    assert err.value.status == 422 and "input.seed" in err.value.detail
    with pytest.raises(ReplicateError) as err:
        client.predictions.create(model="black-forest-labs/flux-2-dev", input={"prompt": LONG_PROMPT})
    assert err.value.status == 422 and "input.prompt" in err.value.detail


def test_a_huge_body_to_a_route_that_ignores_bodies_is_not_read_either(server):
    body = CountingBody(HUGE)
    response = httpx.request("GET", server.url + "/health", content=body, timeout=120,
                             headers={"content-length": str(HUGE)})
    assert response.status_code == 200 and response.headers["connection"] == "close"
    assert body.consumed < HUGE // 4
