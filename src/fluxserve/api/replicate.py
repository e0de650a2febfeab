"""The Replicate dialect: predictions on ``black-forest-labs/flux-2-*`` under ``/v1`` (the v1 client's
``https://api.replicate.com`` + ``/v1/...`` and the v2 client's ``.../v1`` + bare paths both land here).

A prediction is a canonical job with ``dialect="replicate"``: created by ``POST /v1/models/{owner}/{name}/
predictions`` or ``POST /v1/predictions`` (``version`` = ``owner/name``, ``owner/name:<id>`` or ``<id>``),
answered synchronously with ``Prefer: wait[=N]`` (at most 60 s), streamed as SSE at ``urls.stream`` (events
``logs``, ``output``, ``error``, ``done``, each with an ``id:``), and announced by webhooks
(``webhook_events_filter``: start, output, logs, completed). Errors are RFC 7807 problem details; invalid input
is a 422 naming the field. FLUX.2 models return one file: ``output`` is a single URL string.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve import fetch, jsonsafe
from fluxserve.api.auth import caller, check_request, queue_full
from fluxserve.api.bodies import off_loop
from fluxserve.api.common import BadReference, base_url, image_url, resolve_references, tenant
from fluxserve.api.errors import ApiError, documented
from fluxserve.api.file_urls import file_url
from fluxserve.api.files import checked_type
from fluxserve.api.limits import prompt_error
from fluxserve.api.openai import preset_request
from fluxserve.api.replicate_schemas import COG_VERSION, ReplicateModels
from fluxserve.api.stored_files import (
    UPLOAD_PREFIX,
    delete_files_blocking,
    storage_full,
    store_file,
    store_images,
)
from fluxserve.jobs.file_quota import StorageQuotaExceeded
from fluxserve.jobs.store import QueueFull
from fluxserve.jobs.webhooks import (
    WebhookURLError,
    check_webhook_url,
    register_event_builder,
    register_payload_builder,
)
from fluxserve.request import GenerationRequest, InputError
from fluxserve.sizes import SizeError, replicate_size

log = logging.getLogger(__name__)

STATUS = {"queued": "starting", "running": "processing", "completed": "succeeded", "failed": "failed",
          "cancelled": "canceled"}
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
MAX_WAIT_S = 60
MAX_PAGE_SIZE = 1000
FORMATS = {"webp": "webp", "jpg": "jpeg", "png": "png"}
_STEP = re.compile(r"step (\d+)\s*/\s*(\d+)", re.IGNORECASE)


class Problem(Exception):
    """An RFC 7807 problem detail, as Replicate answers errors."""

    def __init__(self, status: int, title: str, detail: str, invalid_fields: list[dict[str, str]] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.invalid_fields = status, title, detail, invalid_fields


class ReplicateRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return problem_response(request, Problem(exc.status, _title(exc.status), exc.message), exc.headers)
            except Problem as exc:
                return problem_response(request, exc)
            except StarletteHTTPException as exc:
                return problem_response(request, Problem(exc.status_code, _title(exc.status_code), str(exc.detail)))
            except RequestValidationError as exc:  # a path or query parameter of the wrong type or range
                return problem_response(request, invalid_input(
                    [(".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0]), err["type"], err["msg"])
                     for err in exc.errors()]))
            except Exception:  # an unexpected failure is still a problem detail
                log.exception("Replicate route %s failed", request.url.path)
                return problem_response(request, Problem(500, "Internal server error",
                                                         "The server had an error while processing the request"))

        return route


def _title(status: int) -> str:
    return {401: "Unauthenticated", 403: "Forbidden", 404: "Not found", 413: "Request too large",
            422: "Input validation failed", 429: "Request was throttled"}.get(status, "Error")


def problem_response(request: Request, exc: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://replicate.com/docs/reference/http#{exc.status}",
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
        "instance": request.url.path,
    }
    if exc.invalid_fields is not None:
        body["invalid_fields"] = exc.invalid_fields
    return JSONResponse(body, status_code=exc.status, headers=headers,
                        media_type="application/problem+json")


def not_found(what: str = "The requested resource could not be found") -> Problem:
    return Problem(404, "Not found", what)


def invalid_input(fields: list[tuple[str, str, str]]) -> Problem:
    """``fields``: (field, error type, description) -> 422 with ``invalid_fields``."""
    detail = "".join(f"- {field}: {description}\n" for field, _, description in fields)
    return Problem(422, "Input validation failed", detail,
                   [{"type": kind, "field": field, "description": description} for field, kind, description in fields])


router = APIRouter(prefix="/v1", tags=["Replicate"], route_class=ReplicateRoute,
                   responses=documented(400, 401, 404, 413, 422, 429))


def models(request: Request) -> ReplicateModels:
    state = request.app.state
    if getattr(state, "replicate_models", None) is None or state.replicate_models.catalog is not state.catalog:
        state.replicate_models = ReplicateModels(state.catalog)
    return state.replicate_models


# ---- translation ------------------------------------------------------------------------------------
# other names the input schema accepts for a field (seed 003's): an error names the one the caller sent
SENT_AS = {"steps": "num_inference_steps", "input_images": "input_image"}


def _validation_problem(exc: ValidationError, canonical: bool = False, sent: Any = None) -> Problem:
    """pydantic errors -> 422. ``canonical``: the errors are about the canonical request, whose field names
    are translated back to Replicate's. ``sent``: the caller's input, so a field is named as it was sent
    (``num_inference_steps`` rather than ``steps``)."""
    fields = []
    for err in exc.errors(include_url=False):
        parts = [str(part) for part in err["loc"]]
        if isinstance(sent, dict) and parts and parts[0] not in sent and SENT_AS.get(parts[0]) in sent:
            parts[0] = SENT_AS[parts[0]]
        path = ".".join(parts)
        if canonical and path:
            field = replicate_field(path)
        else:
            field = f"input.{path}" if path else "input"
        fields.append((field, err["type"], err["msg"]))
    return invalid_input(fields)


def replicate_field(field: str) -> str:
    """An internal field name (``image_urls[1]``, ``width``) -> Replicate's (``input.input_images.1``)."""
    match = re.match(r"^image_urls(?:\[(\d+)\])?", field)
    if match:
        return "input.input_images" + (f".{match.group(1)}" if match.group(1) is not None else "")
    head = re.split(r"[.\[]", field, maxsplit=1)[0]
    return "input." + {"safety_checker": "disable_safety_checker", "expand_prompt": "prompt_upsampling",
                       "acceleration": "go_fast"}.get(head, head)


async def _resolve_own_files(request: Request, images: list[str]) -> list[str]:
    try:
        return await resolve_references(request, images)
    except BadReference as exc:
        raise invalid_input([(f"input.input_images.{exc.index}", "value", exc.message)]) from None


async def _load_references(spec: Any, images: list[str], remote: bool = True, owner: str | None = None
                           ) -> list[Any]:
    """Every input image, loaded and checked against the endpoint's limits before a prediction exists, so a
    bad one is a 422 naming ``input.input_images.N`` (the engine checks again)."""
    from fluxserve import inputs

    current = [0]

    def work() -> list[Any]:
        return inputs.load_references(images, spec, remote=remote)

    try:
        return await fetch.run_blocking(work, tenant=owner, network=inputs.needs_network(images))
    except (InputError, SizeError) as exc:
        raise invalid_input([(replicate_field(exc.field), "value", exc.message)]) from None
    except Exception as exc:  # noqa: BLE001 - an unreadable image is the caller's input error
        field = f"input.input_images.{current[0]}"
        raise invalid_input([(field, "format", f"could not read the image: {exc}")]) from None


async def translate(catalog_models: ReplicateModels, model_name: str, raw: Any,
                    request: Request | None = None) -> tuple[str, dict[str, Any]]:
    """Replicate input -> (endpoint id, canonical request dict). Raises Problem (422). With the ``request``,
    input images that are this server's own files (``/v1/files`` uploads, earlier outputs) are read from
    storage rather than over HTTP, and a large body is validated off the event loop."""
    if not isinstance(raw, dict):
        raise invalid_input([("input", "type", "input must be an object")])
    size = len(await request.body()) if request is not None else 0
    try:
        parsed = await off_loop(size, catalog_models.input_model(model_name).model_validate, raw)
    except ValidationError as exc:
        raise _validation_problem(exc, sent=raw) from None
    text_spec, edit_spec = catalog_models.specs(model_name)
    images = parsed.input_images
    if images and request is not None:
        images = await _resolve_own_files(request, images)
    spec = edit_spec if images else text_spec
    # resolved by _resolve_own_files (which checked the caller's forms) when the request is at hand
    owner = tenant(request) if request is not None else None
    loaded = await _load_references(spec, images, remote=request is None, owner=owner) if images else []
    input_size = loaded[0].size if loaded and "match_input_image" in (parsed.aspect_ratio, parsed.resolution) \
        else None
    try:
        width, height = replicate_size(parsed.aspect_ratio, parsed.resolution, parsed.width, parsed.height,
                                       input_size)
    except SizeError as exc:
        raise invalid_input([(f"input.{exc.field}", "value", exc.message)]) from None
    fields: dict[str, Any] = {
        "prompt": parsed.prompt,
        "image_urls": images,
        "width": width,
        "height": height,
        "num_images": 1,
        "seed": parsed.seed,
        "steps": parsed.steps,
        "guidance": parsed.guidance,
        "safety_checker": not parsed.disable_safety_checker,
        "safety_tolerance": parsed.safety_tolerance,
        "fail_if_blocked": True,  # as Replicate's FLUX models: a blocked output fails the prediction
        "output_format": FORMATS[parsed.output_format],
        "output_quality": parsed.output_quality,
    }
    family = catalog_models.family(model_name)
    if family == "dev":
        fields["acceleration"] = "high" if parsed.go_fast else "regular"
    if family == "flex":
        fields["expand_prompt"] = parsed.prompt_upsampling
    request = preset_request(spec, **fields)
    try:
        canonical = GenerationRequest.model_validate(request).model_dump(mode="json")
    except ValidationError as exc:
        raise _validation_problem(exc, canonical=True) from None
    return spec.id, canonical


# ---- prediction objects -----------------------------------------------------------------------------
def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def log_line(message: str) -> str:
    """Step lines become tqdm-style progress bars, which ``Prediction.progress`` parses."""
    m = _STEP.search(message)
    if not m:
        return message
    current, total = int(m.group(1)), max(1, int(m.group(2)))
    filled = min(10, current * 10 // total)
    return f"{current * 100 // total:3d}%|{'█' * filled}{' ' * (10 - filled)}| {current}/{total} [{message}]"


def logs_text(job: Any, lines: list[Any]) -> str:
    text = [log_line(line.message) for line in lines]
    seed = (job.result or {}).get("seed")
    if seed is not None:
        text.insert(0, f"Using seed: {seed}")
    return "\n".join(text) + ("\n" if text else "")


def error_text(job: Any) -> str:
    """A failed job's error; an input error names Replicate's field (``input.input_images.0: ...``)."""
    detail = getattr(job, "error_detail", None) or {}
    if detail.get("field") and detail.get("message"):
        return f"{replicate_field(detail['field'])}: {detail['message']}"
    return job.error or "prediction failed"


def output_of(job: Any, base: str) -> str | None:
    images = (job.result or {}).get("images") or []
    if job.status != "completed" or not images:
        return None
    return file_url(base, images[0]["key"])


def prediction(job: Any, base: str, lines: list[Any] | None, version: str, model_name: str) -> dict[str, Any]:
    raw = dict(job.input or {})
    raw.pop("__model__", None)
    raw.pop("__version__", None)
    metrics: dict[str, Any] = {}
    if job.started_at and job.completed_at:
        metrics["predict_time"] = round((job.completed_at - job.started_at).total_seconds(), 6)
    if job.created_at and job.completed_at:
        metrics["total_time"] = round((job.completed_at - job.created_at).total_seconds(), 6)
    if job.status == "completed":
        metrics["image_count"] = len((job.result or {}).get("images") or [])
    get = f"{base}/v1/predictions/{job.id}"
    return {
        "id": job.id,
        "model": model_name,
        "version": version,
        "input": raw,
        "output": output_of(job, base),
        "logs": logs_text(job, lines) if lines is not None else None,
        "error": error_text(job) if job.status == "failed" else None,
        "status": STATUS.get(job.status, job.status),
        "source": "api",
        "data_removed": not job.store_io,
        "metrics": metrics,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "urls": {"get": get, "cancel": f"{get}/cancel", "stream": f"{get}/stream", "web": f"{base}/?job={job.id}"},
    }


async def load_prediction(request: Request, job_id: str, with_logs: bool = True) -> tuple[Any, dict[str, Any]]:
    store = request.app.state.store
    job = await run_in_threadpool(store.get, job_id)
    if job is None or job.dialect != "replicate" or not caller(request).may_see(job.owner):
        raise not_found(f"Prediction {job_id!r} not found")
    lines = await run_in_threadpool(store.logs, job_id) if with_logs else None
    meta = job.input or {}
    return job, prediction(job, base_url(request), lines, meta.get("__version__", ""), meta.get("__model__", ""))


def build_webhook(job: Any, store: Any = None) -> tuple[str, Any] | None:
    """The terminal webhook: the prediction object, with every log line when ``store`` is given
    (jobs/webhooks.py calls this when the job ends). Sent for ``completed``, and for ``output`` when the job
    produced its file (FLUX.2's one output appears at the end)."""
    hook = job.webhook or {}
    events = hook.get("events", WEBHOOK_EVENTS)
    has_output = job.status == "completed" and bool((job.result or {}).get("images"))
    if not hook.get("url") or not ("completed" in events or ("output" in events and has_output)):
        return None
    meta = job.input or {}
    lines = store.logs(job.id) if store is not None else None
    return hook["url"], prediction(job, hook.get("base_url", ""), lines, meta.get("__version__", ""),
                                   meta.get("__model__", ""))


register_payload_builder("replicate", build_webhook)


def _wake_sender(app: Any) -> None:
    sender = getattr(app.state, "webhooks", None)
    if sender is not None:
        sender.notify()


def build_event(job: Any, event: str, store: Any) -> dict[str, Any] | None:
    """A ``logs`` event webhook: the prediction with its logs so far, while it runs (the store queues one when
    the job logs; the webhook sender builds it here)."""
    if event != "logs" or job.terminal:
        return None
    meta = job.input or {}
    return prediction(job, (job.webhook or {}).get("base_url", ""), store.logs(job.id), meta.get("__version__", ""),
                      meta.get("__model__", ""))


register_event_builder("replicate", build_event)


# ---- routes --------------------------------------------------------------------------------------------
async def _authorize(request: Request) -> None:
    await check_request(request, "replicate")


def _wait_seconds(prefer: str | None) -> float | None:
    if not prefer:
        return None
    for part in prefer.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            if not value:
                return float(MAX_WAIT_S)
            try:
                return float(min(MAX_WAIT_S, max(1, int(value))))
            except ValueError:
                raise Problem(400, "Bad request", f"Invalid Prefer header {prefer!r}: use 'wait' or "
                              f"'wait=N' with N from 1 to {MAX_WAIT_S}") from None
    return None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    # a large body off the event loop (``api/bodies.py``)
    return await off_loop(len(raw), _decode, raw, request.app.state.settings.max_json_depth)


def _decode(raw: bytes, max_json_depth: int = jsonsafe.DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    try:
        body = jsonsafe.decode(raw or b"{}", max_json_depth)
    except jsonsafe.BadJson as exc:
        if not exc.path:
            raise Problem(400, "Bad request", "The request body is not valid JSON") from None
        raise invalid_input([(jsonsafe.dotted(exc.path, "."), exc.kind, exc.message)]) from None
    if not isinstance(body, dict):
        raise Problem(400, "Bad request", "The request body must be a JSON object")
    return body


IMAGE_FIELDS = ("input_images", "input_image")  # seed 003's name, and the list the schema reads


async def _stored_inputs(request: Request, raw_input: Any, job_id: str) -> tuple[Any, list[str]]:
    """The input with its data URI images stored once as the caller's files of the prediction ``job_id``
    (``stored_files``): the job's request and its recorded input reference the file, not two copies of the
    image. (the input, the keys stored)."""
    if not isinstance(raw_input, dict) or not any(isinstance(raw_input.get(name), (str, list))
                                                  for name in IMAGE_FIELDS):
        return raw_input, []
    out, stored = dict(raw_input), []
    try:
        for name in IMAGE_FIELDS:
            value = raw_input.get(name)
            images = value if isinstance(value, list) else [value] if isinstance(value, str) else None
            if not images or not all(isinstance(image, str) for image in images):
                continue  # absent, or of a type the schema refuses naming the field
            try:
                references, keys = await store_images(request, images, caller(request).key_id, job_id)
            except StorageQuotaExceeded as exc:
                raise storage_full(exc, "replicate") from None
            stored += keys
            out[name] = references if isinstance(value, list) else references[0]
    except BaseException:
        await run_in_threadpool(delete_files_blocking, request, stored)
        raise
    return out, stored


async def create(request: Request, model_name: str, body: dict[str, Any]) -> Response:
    raw_input = body.get("input", {})
    prompt = raw_input.get("prompt") if isinstance(raw_input, dict) else None
    if message := prompt_error(prompt, request.app.state.settings.max_prompt_chars):
        raise invalid_input([("input.prompt", "string_too_long", message)])
    webhook = body.get("webhook")
    events = body.get("webhook_events_filter") or list(WEBHOOK_EVENTS)
    if not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events):
        raise invalid_input([("webhook_events_filter", "enum",
                              f"must be a list of: {', '.join(WEBHOOK_EVENTS)}")])
    if webhook is not None:
        try:  # the host name is resolved (the outbound address policy): off the event loop
            await run_in_threadpool(check_webhook_url, webhook)
        except WebhookURLError as exc:
            raise invalid_input([("webhook", "format", exc.message)]) from None
    job_id = str(uuid.uuid4())
    raw_input, stored = await _stored_inputs(request, raw_input, job_id)
    try:
        return await _create(request, model_name, raw_input, job_id, webhook, events)
    except BaseException:  # no prediction was made: nothing references the stored images
        if stored:
            await run_in_threadpool(delete_files_blocking, request, stored)
        raise


async def _create(request: Request, model_name: str, raw_input: Any, job_id: str, webhook: str | None,
                  events: list[str]) -> Response:
    catalog_models = models(request)
    endpoint, canonical = await translate(catalog_models, model_name, raw_input, request)
    wait = _wait_seconds(request.headers.get("prefer"))
    base = base_url(request)
    version = catalog_models.version(model_name)
    raw = dict(raw_input or {}) | {"__model__": model_name, "__version__": version}
    hook = ({"url": webhook, "events": events, "dialect": "replicate", "base_url": base, "model": model_name}
            if webhook else None)
    store = request.app.state.store
    owner = caller(request).key_id
    try:
        job = await run_in_threadpool(lambda: store.submit(endpoint=endpoint, dialect="replicate",
                                                           request=canonical, input=raw, webhook=hook, owner=owner,
                                                           job_id=job_id))
    except QueueFull as exc:
        raise queue_full(exc, "replicate") from None
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.submitted(endpoint)
    if webhook and "start" in events:
        start = prediction(job, base, [], version, model_name)
        await run_in_threadpool(store.queue_webhook_event, job.id, "replicate", "start", webhook, start)
        _wake_sender(request.app)
    if wait is not None:
        await request.app.state.waits.wait(job.id, wait)  # holds no thread (``api/waits.py``)
    job, body_out = await load_prediction(request, job.id)
    if wait is not None and not job.terminal:
        body_out["status"] = "starting"  # the client polls a "starting" prediction after Prefer: wait
    return JSONResponse(body_out, status_code=201, headers={"Location": body_out["urls"]["get"]})


def _prediction_body(with_version: bool) -> dict[str, Any]:
    """The documented body of the create routes (the routes read and validate it themselves)."""
    from fluxserve.api.replicate_schemas import Flux2Input

    properties: dict[str, Any] = {
        "input": Flux2Input.model_json_schema(),
        "webhook": {"type": "string", "description": "http(s) URL to notify"},
        "webhook_events_filter": {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)}},
    }
    required = ["input"]
    if with_version:
        properties["version"] = {"type": "string",
                                 "description": "'owner/name', 'owner/name:<version id>' or a version id"}
        required.append("version")
    schema = {"type": "object", "required": required, "properties": properties}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post("/models/{owner}/{name}/predictions", summary="Create a prediction (Replicate, official model)",
             openapi_extra=_prediction_body(with_version=False))
async def create_model_prediction(owner: str, name: str, request: Request) -> Response:
    await _authorize(request)
    model_name = f"{owner}/{name}"
    if model_name not in request.app.state.catalog.replicate_models:
        raise not_found(f"Model {model_name!r} not found")
    return await create(request, model_name, await _body(request))


@router.post("/predictions", summary="Create a prediction (Replicate, by version)",
             openapi_extra=_prediction_body(with_version=True))
async def create_prediction(request: Request) -> Response:
    await _authorize(request)
    body = await _body(request)
    version = body.get("version")
    catalog_models = models(request)
    if not isinstance(version, str) or not version:
        message = "version is required: 'owner/name', 'owner/name:<id>' or a version id"
        raise invalid_input([("version", "required", message)])
    name, _, version_id = version.partition(":") if "/" in version else ("", "", version)
    if name and name not in request.app.state.catalog.replicate_models:
        raise invalid_input([("version", "value", f"unknown model {name!r}")])
    if version_id:
        known = catalog_models.by_version.get(version_id)
        if known is None or (name and known != name):
            raise invalid_input([("version", "value", f"Invalid version or not permitted: {version!r}")])
        name = known
    return await create(request, name, body)


@router.get("/predictions", summary="List predictions (Replicate)")
async def list_predictions(
    request: Request,
    cursor: str | None = Query(None, description="The page to read: the cursor of a previous page's `next` URL"),
    page_size: int = Query(100, ge=1, le=MAX_PAGE_SIZE, description="Predictions per page"),
) -> Response:
    await _authorize(request)
    before = None
    if cursor:
        try:
            before = datetime.fromisoformat(base64.urlsafe_b64decode(cursor.encode()).decode())
            before = before.astimezone(UTC) if before.tzinfo else before.replace(tzinfo=UTC)
        except (ValueError, OverflowError):  # OverflowError: 0001-01-01T00:00:00+14:00 is before year 1 in UTC
            raise invalid_input([("cursor", "format", "not a cursor of this server: use a page's `next` URL")]) \
                from None
    store = request.app.state.store
    owner = caller(request).list_owner
    jobs = await run_in_threadpool(lambda: store.list(dialect="replicate", limit=page_size + 1, before=before,
                                                      owner=owner))
    base = base_url(request)
    results = []
    for job in jobs[:page_size]:
        meta = job.input or {}
        results.append(prediction(job, base, None, meta.get("__version__", ""), meta.get("__model__", "")))
    next_url = None
    if len(jobs) > page_size:
        token = base64.urlsafe_b64encode(jobs[page_size - 1].created_at.isoformat().encode()).decode()
        next_url = f"{base}/v1/predictions?cursor={token}&page_size={page_size}"
    return JSONResponse({"previous": None, "next": next_url, "results": results})


@router.get("/predictions/{prediction_id}", summary="Get a prediction (Replicate)")
async def get_prediction(prediction_id: str, request: Request) -> Response:
    await _authorize(request)
    _, body = await load_prediction(request, prediction_id)
    return JSONResponse(body)


@router.post("/predictions/{prediction_id}/cancel", summary="Cancel a prediction (Replicate)")
async def cancel_prediction(prediction_id: str, request: Request) -> Response:
    await _authorize(request)
    await load_prediction(request, prediction_id, with_logs=False)
    await run_in_threadpool(request.app.state.store.request_cancel, prediction_id)
    _, body = await load_prediction(request, prediction_id)
    return JSONResponse(body)


def _event(event: str, data: str, event_id: int) -> bytes:
    lines = "".join(f"data: {line}\n" for line in (data.split("\n") or [""]))
    return f"event: {event}\nid: {event_id}\n{lines}\n".encode()


async def stream_prediction(request: Request, job_id: str) -> AsyncIterator[bytes]:
    store = request.app.state.store
    base = base_url(request)
    seen, event_id = 0, 0
    while True:
        job, lines = await run_in_threadpool(store.changes, job_id, seen)
        for line in lines:
            seen = max(seen, line.seq)
            event_id += 1
            yield _event("logs", log_line(line.message), event_id)
        if job is None:
            event_id += 1
            yield _event("error", json.dumps({"detail": "prediction not found"}), event_id)
            return
        if job.terminal:
            event_id += 1
            if job.status == "completed":
                yield _event("output", output_of(job, base) or "", event_id)
                yield _event("done", "{}", event_id + 1)
            elif job.status == "cancelled":
                yield _event("done", json.dumps({"reason": "canceled"}), event_id)
            else:
                yield _event("error", json.dumps({"detail": error_text(job)}), event_id)
                yield _event("done", json.dumps({"reason": "error"}), event_id + 1)
            return
        await asyncio.sleep(0.2)


@router.get("/predictions/{prediction_id}/stream", summary="Stream a prediction's events (Replicate SSE)")
async def stream(prediction_id: str, request: Request) -> Response:
    await _authorize(request)
    await load_prediction(request, prediction_id, with_logs=False)
    return StreamingResponse(stream_prediction(request, prediction_id), media_type="text/event-stream",
                             headers={"cache-control": "no-store"})


def _version_object(request: Request, model_name: str) -> dict[str, Any]:
    catalog_models = models(request)
    source = request.app.state.catalog.source
    created = datetime.fromtimestamp(source.stat().st_mtime, UTC) if source.exists() else None
    return {"id": catalog_models.version(model_name), "created_at": iso(created) or "1970-01-01T00:00:00Z",
            "cog_version": COG_VERSION, "openapi_schema": catalog_models.schema(model_name)}


def model_object(request: Request, model_name: str) -> dict[str, Any]:
    owner, name = model_name.split("/", 1)
    text_spec, edit_spec = models(request).specs(model_name)
    model = request.app.state.catalog.models[text_spec.model]
    return {
        "url": f"{base_url(request)}/v1/models/{model_name}",
        "owner": owner,
        "name": name,
        "description": f"{text_spec.title} (text-to-image) and {edit_spec.title} (editing), served by fluxserve "
                       f"with {model.title} weights",
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": _version_object(request, model_name),
        "json_request_schema": models(request).request_schema(model_name),
    }


def models_page(request: Request) -> dict[str, Any]:
    """Replicate's ``models.list()`` page (merged into ``GET /v1/models`` by the OpenAI router)."""
    names = request.app.state.catalog.replicate_models
    return {"previous": None, "next": None, "results": [model_object(request, n) for n in names]}


def _known(request: Request, owner: str, name: str) -> str:
    model_name = f"{owner}/{name}"
    if model_name not in request.app.state.catalog.replicate_models:
        raise not_found(f"Model {model_name!r} not found")
    return model_name


@router.get("/models/{owner}/{name}", summary="Get a model with its input schema (Replicate)")
async def get_model(owner: str, name: str, request: Request) -> Response:
    await _authorize(request)
    return JSONResponse(model_object(request, _known(request, owner, name)))


@router.get("/models/{owner}/{name}/versions", summary="List a model's versions (Replicate)")
async def list_versions(owner: str, name: str, request: Request) -> Response:
    await _authorize(request)
    model_name = _known(request, owner, name)
    return JSONResponse({"previous": None, "next": None, "results": [_version_object(request, model_name)]})


@router.get("/models/{owner}/{name}/versions/{version_id}", summary="Get a model version (Replicate)")
async def get_version(owner: str, name: str, version_id: str, request: Request) -> Response:
    await _authorize(request)
    model_name = _known(request, owner, name)
    if version_id != models(request).version(model_name):
        raise not_found(f"Version {version_id!r} of {model_name!r} not found")
    return JSONResponse(_version_object(request, model_name))


@router.post("/files", summary="Upload a file (Replicate client file inputs)")
async def upload_file(request: Request) -> Response:
    await _authorize(request)
    form = await request.form()
    upload = form.get("content")
    if upload is None or isinstance(upload, str):
        raise invalid_input([("content", "required", "a file part named 'content' is required")])
    data = await upload.read()
    content_type = checked_type(data)
    try:
        key = await store_file(request, data, content_type, caller(request).key_id, UPLOAD_PREFIX, upload.filename)
    except StorageQuotaExceeded as exc:
        raise storage_full(exc, "replicate") from None
    url = image_url(request, key)
    now = iso(datetime.now(UTC))
    return JSONResponse({
        "id": key.replace("/", "_"), "name": upload.filename or key.rsplit("/", 1)[-1],
        "content_type": content_type, "size": len(data), "etag": "", "checksums": {}, "metadata": {},
        "created_at": now, "expires_at": None, "urls": {"get": url},
    }, status_code=201)


@router.get("/webhooks/default/secret", summary="The secret that signs webhooks (Replicate)")
async def webhook_secret(request: Request) -> Response:
    """``{"key": "whsec_..."}``: the caller's key's secret; verify the ``webhook-signature`` of its predictions'
    deliveries with it (Standard Webhooks). Every API key has its own."""
    await _authorize(request)
    owner = caller(request).key_id
    return JSONResponse({"key": await run_in_threadpool(request.app.state.webhooks.keys.replicate_secret, owner)})
