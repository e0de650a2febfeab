"""Every OpenAPI document the server publishes is valid OpenAPI 3 (checked with openapi-spec-validator): the
app's /openapi.json (fal's prefixed routes, OpenAI, Replicate, files), each fal endpoint's own document and each
Replicate model version's Cog schema; path parameters are declared and error answers documented."""

from __future__ import annotations

import httpx
import pytest
from fal_helpers import Server, settings_for
from openapi_spec_validator import validate

from fluxserve.config import Settings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = Settings(data_dir=tmp_path_factory.mktemp("openapi"), demo=True, device="cpu")
    with Server(settings_for(base, "openapi"), start_workers=False, auth_required=False) as running:
        yield running


def test_the_app_document_is_valid(server):
    document = httpx.get(server.url + "/openapi.json", timeout=60).json()
    validate(document)
    paths = document["paths"]
    assert {"413", "422"} <= set(paths["/queue/{endpoint_id}"]["post"]["responses"])
    assert {"401", "404", "413"} <= set(paths["/v1/images/generations"]["post"]["responses"])
    listing = paths["/v1/predictions"]["get"]
    assert "422" in listing["responses"]
    page_size = next(p for p in listing["parameters"] if p["name"] == "page_size")
    assert page_size["schema"]["minimum"] == 1 and page_size["schema"]["maximum"] == 1000


def test_every_fal_endpoint_document_is_valid(server):
    endpoints = httpx.get(server.url + "/api/endpoints", timeout=60).json()
    assert endpoints
    for endpoint in endpoints:
        document = httpx.get(endpoint["openapi"], timeout=60).json()
        validate(document)
        for path, operations in document["paths"].items():
            for operation in operations.values():
                declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
                assert declared == ({"request_id"} if "{request_id}" in path else set()), path
                assert {"401", "404"} <= set(operation["responses"]), path
        submit = document["paths"][f"/{endpoint['endpoint_id']}"]["post"]
        assert {"401", "413", "422"} <= set(submit["responses"])
        name = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        seed = document["components"]["schemas"][name]["properties"]["seed"]
        assert (seed["type"], seed["minimum"], seed["maximum"], seed["nullable"]) == ("integer", 0, 2**63 - 1, True)


def test_every_replicate_version_schema_is_valid(server):
    models = httpx.get(server.url + "/v1/models", timeout=60).json()["results"]
    assert models
    for model in models:
        validate(model["latest_version"]["openapi_schema"])
