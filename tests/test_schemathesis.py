"""Property-based checks of every dialect's OpenAPI document against a real server (demo models, no workers,
so nothing is generated): schemathesis sends generated requests, valid and invalid, to every documented
operation, and no answer may be a 5xx. Bounded and derandomized: the same requests on every run."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from fal_helpers import Server, settings_for
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from fluxserve.config import Settings

MAX_EXAMPLES = 30
# Operations that wait for a worker: with none running, a valid request would wait for ever.
WAITING = {("POST", "/run/{endpoint_id}"), ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits")}
# Path parameters fixed to a served model, so that generated bodies reach input validation instead of a 404.
FIXED_PATHS = {("POST", "/v1/models/{owner}/{name}/predictions"): {"owner": "black-forest-labs",
                                                                    "name": "flux-2-dev"}}
# One text and one edit endpoint of each fal schema family: their documents differ only in the input schema.
FAL_ENDPOINTS = ["fal-ai/flux-2", "fal-ai/flux-2/edit", "fal-ai/flux-2/turbo", "fal-ai/flux-2/lora",
                 "fal-ai/flux-2/lora/edit", "fal-ai/flux-2-pro", "fal-ai/flux-2-pro/edit", "fal-ai/flux-2-flex",
                 "fal-ai/flux-2/klein/4b", "fal-ai/flux-2-klein-4b-base-trainer"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = Settings(data_dir=tmp_path_factory.mktemp("schemathesis"), demo=True, device="cpu")
    with Server(settings_for(base, "schemathesis"), start_workers=False, auth_required=False) as running:
        yield running


def fuzz(schema, base_url: str, skip: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Run every operation of ``schema`` (but ``skip``) against ``base_url``; the operations that ran."""
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in skip:
            continue

        fixed = FIXED_PATHS.get((operation.method.upper(), operation.path))
        cases = (operation.as_strategy(GenerationMode.POSITIVE, path_parameters=fixed)
                 | operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=fixed))

        @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def check(case):
            response = case.call(base_url=base_url, timeout=30)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
            case.validate_response(response, checks=[not_a_server_error])

        check()
        ran.append(f"{operation.method.upper()} {operation.path}")
    return ran


def test_the_app_document(server):
    document = httpx.get(server.url + "/openapi.json", timeout=60).json()
    ran = fuzz(schemathesis.openapi.from_dict(document), server.url, WAITING)
    assert {"GET /v1/predictions", "POST /v1/predictions", "POST /queue/{endpoint_id}"} <= set(ran)


@pytest.mark.parametrize("endpoint_id", FAL_ENDPOINTS)
def test_a_fal_endpoint_document(server, endpoint_id):
    document = httpx.get(server.url + "/api/openapi/queue/openapi.json", params={"endpoint_id": endpoint_id},
                         timeout=60).json()
    skip = set() if endpoint_id == FAL_ENDPOINTS[0] else {  # the request-id operations are the same for all
        (method.upper(), path) for path, ops in document["paths"].items() if "{request_id}" in path for method in ops}
    ran = fuzz(schemathesis.openapi.from_dict(document), server.url + "/queue", skip)
    assert f"POST /{endpoint_id}" in ran

