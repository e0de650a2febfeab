"""The fal dialect: fal's synchronous, streaming and queue APIs for every endpoint of the catalogue.

URL layout (both work at once):
- prefixed: ``POST /run/{endpoint}``, ``POST /run/{endpoint}/stream``, ``POST /queue/{endpoint}``,
  ``GET|PUT /queue/{owner}/{alias}/requests/{id}[/status|/status/stream|/cancel]``. The official Python client
  reaches it with ``FAL_RUN_HOST=host:port/run FAL_QUEUE_RUN_HOST=host:port/queue``.
- fal's own: ``POST /{endpoint}`` runs synchronously, or queues when the Host header starts with ``queue.``
  (``fal.example.com`` + ``queue.fal.example.com`` behind one proxy: set only ``FAL_RUN_HOST``);
  ``/{owner}/{alias}/requests/{id}...`` as above.
Status, result and cancel URLs name only owner/alias (clients drop the sub-path): the job is looked up by id
and must belong to an endpoint of that owner/alias.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from fluxserve import fetch, jsonsafe
from fluxserve.api.auth import Identity, caller, is_cached, parse_authorization, queue_full, require_key
from fluxserve.api.bodies import off_loop
from fluxserve.api.common import OwnFileMissing, base_url, data_uri, image_url, resolve_own_file, tenant
from fluxserve.api.errors import (
    ApiError,
    FalValidationError,
    documented,
    fal_error,
    field_error,
    from_field_error,
    from_pydantic,
    query_error,
)
from fluxserve.api.fal_schemas import FalInput, ProOutput, TrainerInput, input_model, output_model
from fluxserve.api.fal_training import training_output, training_request
from fluxserve.api.file_urls import file_url
from fluxserve.api.limits import prompt_error
from fluxserve.api.openapi30 import to_openapi30
from fluxserve.catalog import Catalog, EndpointSpec
from fluxserve.inputs import needs_network
from fluxserve.jobs.store import QueueFull
from fluxserve.jobs.webhooks import WebhookURLError, check_webhook_url
from fluxserve.request import GenerationRequest, InputError, LoraSpec, TrainingRequest
from fluxserve.sizes import FAL_MIN_SIDE, SizeError, fal_image_size

DIALECT = "fal"
TERMINAL = ("completed", "failed", "cancelled")
KEEPALIVE_S = 15.0
STREAM_POLL_S = 0.2  # status streams are woken by this process's changes, and read the database this often
# A status answer may reuse a snapshot read this long ago, unless this process changed any job since
# (``JobStore.status``): changes made by worker processes elsewhere show up at most this much later.
STATUS_MAX_AGE_S = 0.025
MAX_REQUEST_TIMEOUT_S = 7 * 24 * 3600  # X-Fal-Request-Timeout: a week at most
IDEMPOTENCY_HEADERS = ("idempotency-key", "x-idempotency-key", "x-fal-idempotency-key")
PREVIEWS_HEADER = "x-fluxserve-previews"  # preview images during denoising (the canonical partial_images), 0-3
_IDEMPOTENCY_NS = uuid.UUID("5b0f3b8e-4d55-4c36-9c39-7c1f3f8f1a11")

router = APIRouter(dependencies=[Depends(require_key(DIALECT))], tags=["fal"],
                   responses=documented(400, 401, 404, 413, 422, 429))
root_router = APIRouter(dependencies=[Depends(require_key(DIALECT))], tags=["fal"])


# ---- helpers ---------------------------------------------------------------------------------------------
def _catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def endpoint_spec(request: Request, endpoint_id: str) -> EndpointSpec:
    endpoint_id = endpoint_id.strip("/")
    try:
        return _catalog(request).endpoint(endpoint_id)
    except KeyError:
        raise ApiError(
            404, f"Endpoint {endpoint_id!r} not found. Known endpoints: GET /api/endpoints", error_type="not_found"
        ) from None


def app_path(endpoint_id: str) -> str:
    """owner/alias of an endpoint id (``workflows/`` and ``comfy/`` namespaces keep one more part)."""
    parts = endpoint_id.strip("/").split("/")
    if parts[0] in ("workflows", "comfy"):
        return "/".join(parts[:3])
    return "/".join(parts[:2])


def queue_urls(request: Request, prefix: str, endpoint_id: str, request_id: str) -> dict[str, str]:
    return queue_urls_at(base_url(request), prefix, endpoint_id, request_id)


def queue_urls_at(base: str, prefix: str, endpoint_id: str, request_id: str) -> dict[str, str]:
    url = f"{base}{prefix}/{app_path(endpoint_id)}/requests/{request_id}"
    return {"response_url": url, "status_url": f"{url}/status", "cancel_url": f"{url}/cancel"}


def _json(body: Any, status: int = 200, request_id: str | None = None, headers: dict | None = None) -> Response:
    headers = dict(headers or {})
    if request_id:
        headers["x-fal-request-id"] = request_id
    return Response(
        json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json", headers=headers
    )


async def _store_call(request: Request, fn, *args, **kwargs):
    """Run a job-store call: inline for SQLite (sub-millisecond, no thread hop), in a thread otherwise."""
    if request.app.state.store_inline:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


# ---- input -> GenerationRequest ------------------------------------------------------------------------------
async def read_input(request: Request, spec: EndpointSpec) -> tuple[FalInput | TrainerInput, dict]:
    raw = await request.body()
    settings = request.app.state.settings
    return await off_loop(len(raw), parse_input, raw, spec, settings.max_prompt_chars, settings.max_json_depth)


def parse_input(raw: bytes, spec: EndpointSpec, max_prompt_chars: int,
                max_json_depth: int = jsonsafe.DEFAULT_MAX_DEPTH) -> tuple[FalInput | TrainerInput, dict]:
    """Decode and validate a fal body (a large one runs off the event loop: ``api/bodies.py``)."""
    try:
        body = jsonsafe.decode(raw, max_json_depth) if raw.strip() else {}
    except jsonsafe.BadJson as exc:
        raise FalValidationError([field_error(list(exc.path), exc.message, exc.kind)]) from None
    if not isinstance(body, dict):
        raise FalValidationError([field_error([], "Input should be a JSON object", "model_type")])
    try:
        inp = input_model(spec).model_validate(body)
    except ValidationError as exc:
        raise FalValidationError(from_pydantic(exc, body)) from None
    if isinstance(inp, FalInput) and (message := prompt_error(inp.prompt, max_prompt_chars)):
        raise FalValidationError([field_error(["prompt"], message, "string_too_long")])
    return inp, body


def generation_request(spec: EndpointSpec, inp: FalInput) -> GenerationRequest:
    """The canonical request: the endpoint's preset, overridden by what the schema family lets users set."""
    values = inp.model_dump()
    size = values.get("image_size")
    try:
        resolved = fal_image_size(size, default="auto" if spec.is_edit else "landscape_4_3")
    except SizeError as exc:
        raise FalValidationError(from_field_error(exc)) from None
    width, height = resolved if resolved else (None, None)
    loras = list(spec.loras) + [LoraSpec(path=lora["path"], scale=lora["scale"]) for lora in values.get("loras", [])]
    tolerance = values.get("safety_tolerance")
    try:
        return _canonical(spec, inp, values, width, height, loras, tolerance)
    except ValidationError as exc:  # the schema's limits are inside the canonical ones; this is a safety net
        raise FalValidationError(from_pydantic(exc)) from None


def _canonical(spec: EndpointSpec, inp: FalInput, values: dict, width: int | None, height: int | None,
               loras: list[LoraSpec], tolerance: Any) -> GenerationRequest:
    return GenerationRequest(
        model=spec.model,
        prompt=inp.prompt,
        image_urls=list(values.get("image_urls") or []),
        width=width,
        height=height,
        min_side=FAL_MIN_SIDE,  # an auto size holds to the endpoint's own limits
        num_images=values.get("num_images", 1),
        seed=inp.seed,
        steps=values.get("num_inference_steps", spec.steps),
        guidance=values.get("guidance_scale", spec.guidance),
        sigmas=list(spec.sigmas) if spec.sigmas else None,
        loras=loras,
        expand_prompt=values.get("enable_prompt_expansion", spec.expand_prompt),
        safety_checker=inp.enable_safety_checker,
        safety_tolerance=int(tolerance) if tolerance else 2,
        acceleration=values.get("acceleration", "regular"),
        output_format=values.get("output_format", spec.output_format),
    )


def _resolve_reference(request: Request, index: int, url: str) -> str:
    """Check one reference's form; a URL of this server's own files becomes a local path or a data URI so the
    worker needs no HTTP round trip (nor this server's certificate)."""
    loc = ["image_urls", index]
    if not isinstance(url, str) or not url.strip():
        raise FalValidationError([field_error(loc, "must be a non-empty URL or data URI")])
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "data"):
        raise FalValidationError([field_error(loc, f"{url[:60]!r} is not an http(s) URL or a data URI")])
    try:
        return resolve_own_file(request, url)
    except OwnFileMissing as exc:
        raise FalValidationError([field_error(loc, str(exc))]) from None


def _resolve_loras(request: Request, loras: list[LoraSpec]) -> list[LoraSpec]:
    """A caller's LoRAs with this server's own files (a trained LoRA's URL) read from storage, as references
    are: no download, and another key's file is as missing (blocking: runs in a thread)."""
    resolved = []
    for index, lora in enumerate(loras):
        try:
            resolved.append(LoraSpec(path=resolve_own_file(request, lora.path), scale=lora.scale))
        except OwnFileMissing as exc:
            raise FalValidationError([field_error(["loras", index, "path"], str(exc))]) from None
    return resolved


def _check_references(spec: EndpointSpec, urls: list[str]) -> None:
    """Load every reference (blocking: runs in a thread) and check the endpoint's limits."""
    from fluxserve import inputs

    try:
        inputs.load_references(urls, spec)
    except (InputError, SizeError) as exc:
        raise FalValidationError(from_field_error(exc)) from None


async def prepare(request: Request, spec: EndpointSpec
                  ) -> tuple[GenerationRequest | TrainingRequest, dict, FalInput | TrainerInput]:
    inp, body = await read_input(request, spec)
    if isinstance(inp, TrainerInput):
        return await training_request(request, spec, inp, body), body, inp
    gen = await off_loop(len(await request.body()), generation_request, spec, inp)
    if getattr(inp, "loras", None):
        presets = len(spec.loras)
        gen.loras[presets:] = await fetch.run_blocking(_resolve_loras, request, gen.loras[presets:],
                                                       tenant=tenant(request), network=False)
    if spec.is_edit:
        gen.image_urls = [_resolve_reference(request, i, url) for i, url in enumerate(gen.image_urls)]
        await fetch.run_blocking(_check_references, spec, gen.image_urls, tenant=tenant(request),
                                 network=needs_network(gen.image_urls))
    return gen, body, inp


def _options(request: Request, inp: FalInput | TrainerInput) -> dict[str, Any]:
    headers = request.headers
    priority = headers.get("x-fal-queue-priority", "normal").strip().lower() or "normal"
    if priority not in ("normal", "low"):
        raise ApiError(400, f"X-Fal-Queue-Priority must be 'normal' or 'low', not {priority!r}")
    timeout_s = None
    if raw := headers.get("x-fal-request-timeout"):
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ApiError(400, f"X-Fal-Request-Timeout must be a number of seconds, not {raw!r}") from None
        if not 0 < timeout_s <= MAX_REQUEST_TIMEOUT_S:  # also refuses nan
            raise ApiError(400, f"X-Fal-Request-Timeout must be a number of seconds from 0 to {MAX_REQUEST_TIMEOUT_S}")
    store_io = headers.get("x-fal-store-io", "1").strip() not in ("0", "false") and not getattr(inp, "sync_mode", False)
    return {"priority": priority, "timeout_s": timeout_s, "store_io": store_io}


def _previews(request: Request) -> int:
    """``X-Fluxserve-Previews: N``: how many preview images the job reports during denoising. fal's input has
    no such field; clients that do not know the header get none, and extra fields in the status logs
    (``preview_url``) are ignored by fal's clients."""
    raw = request.headers.get(PREVIEWS_HEADER, "0").strip() or "0"
    if not (raw.isascii() and raw.isdigit() and int(raw) <= 3):  # '²'.isdigit() is true, int('²') fails
        raise FalValidationError([{"loc": ["header", PREVIEWS_HEADER], "type": "value_error",
                                   "msg": f"X-Fluxserve-Previews must be a whole number from 0 to 3, not {raw!r}"}])
    return int(raw)


def _idempotent_id(request: Request, endpoint_id: str) -> str | None:
    for name in IDEMPOTENCY_HEADERS:
        if key := request.headers.get(name):
            owner = request.headers.get("authorization", "")
            return str(uuid.uuid5(_IDEMPOTENCY_NS, f"{owner}\n{endpoint_id}\n{key}"))
    return None


async def submit(request: Request, spec: EndpointSpec, webhook_url: str | None = None, *, sync: bool = False):
    """Validate and queue; returns the job (an existing one for a repeated idempotency key). A ``sync`` job
    names this server process as its caller (unless an idempotency key lets the caller come back for it), so
    it is cancelled rather than run for nobody if the process stops."""
    previews = _previews(request)
    if webhook_url is not None:
        try:  # the host name is resolved (the outbound address policy): off the event loop
            await asyncio.to_thread(check_webhook_url, webhook_url)
        except WebhookURLError as exc:
            raise query_error("fal_webhook", exc.message) from None
    gen, body, inp = await prepare(request, spec)
    if isinstance(gen, GenerationRequest):
        gen.partial_images = previews
    options = _options(request, inp)
    store = request.app.state.store
    job_id = _idempotent_id(request, spec.id)
    if job_id and (existing := await asyncio.to_thread(store.get, job_id)) is not None:
        return existing
    if webhook_url is not None:
        options["webhook"] = {"url": webhook_url, "events": ["completed"], "dialect": DIALECT,
                              "base_url": base_url(request)}
    try:
        job = await asyncio.to_thread(
            store.submit,
            endpoint=spec.id,
            dialect=DIALECT,
            request=gen.model_dump(mode="json"),
            input=body,
            job_id=job_id,
            owner=caller(request).key_id,
            caller=getattr(request.app.state, "process_id", None) if sync and not job_id else None,
            **options,
        )
    except QueueFull as exc:
        raise queue_full(exc, DIALECT) from None
    except Exception:
        if job_id and (existing := await asyncio.to_thread(store.get, job_id)) is not None:
            return existing  # a concurrent retry with the same key won the race
        raise
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.submitted(spec.id)
    return job


# ---- job -> fal bodies -------------------------------------------------------------------------------------
def _timestamp(value: datetime | None) -> str:
    value = value or datetime.now(UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def log_entry(line: Any, base: str) -> dict[str, Any]:
    """A status log line; a step that made a preview (``X-Fluxserve-Previews``) carries its signed
    ``preview_url`` under ``base``, an extra field fal's clients ignore."""
    entry = {"message": line.message, "level": line.level, "source": "USER", "timestamp": _timestamp(line.timestamp)}
    if line.preview_key:
        entry["preview_url"] = file_url(base, line.preview_key)
    return entry


def inference_time(job: Any) -> float | None:
    """The engine's inference time of a job (a ``Job`` or a ``JobStatus``), else its run time."""
    if hasattr(job, "inference"):
        if job.inference is not None:
            return job.inference
    else:
        timings = (job.result or {}).get("timings") or {}
        if isinstance(timings.get("inference"), (int, float)):
            return float(timings["inference"])
    if job.started_at and job.completed_at:
        return max(0.0, (job.completed_at - job.started_at).total_seconds())
    return None


def job_error(job: Any) -> tuple[str, str]:
    """(error, error_type) of a failed or cancelled job, as fal names them."""
    if job.status == "cancelled":
        return job.error or "Request was cancelled", job.error_type or "request_cancelled"
    return job.error or "Internal server error", job.error_type or "internal_server_error"


def status_body(job: Any, urls: dict[str, str], logs: list[dict] | None, position: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, **urls}
    if job.status == "queued":
        body.update(status="IN_QUEUE", queue_position=position or 0)
    elif job.status == "running":
        body.update(status="IN_PROGRESS", logs=logs)
    else:
        seconds = inference_time(job)
        body.update(status="COMPLETED", logs=logs, metrics={"inference_time": seconds} if seconds is not None else {})
        if job.status != "completed":
            body["error"], body["error_type"] = job_error(job)
    return body


def output_body(storage: Any, base: str, job: Any, spec: EndpointSpec) -> dict[str, Any]:
    """The endpoint's output JSON: file URLs under ``base``, or data URIs for sync_mode / X-Fal-Store-IO: 0."""
    if spec.is_training:
        return training_output(base, job)
    result = job.result or {}
    inline = bool((job.input or {}).get("sync_mode")) or not job.store_io
    images = []
    for image in result.get("images", []):
        if inline:
            data, content_type = storage.get(image["key"])
            url = data_uri(data, image.get("content_type") or content_type)
        else:
            url = file_url(base, image["key"])
        images.append(
            {"url": url, "width": image.get("width"), "height": image.get("height"),
             "content_type": image.get("content_type")}
        )
    nsfw = result.get("has_nsfw_concepts") or [bool(i.get("nsfw")) for i in result.get("images", [])]
    if output_model(spec) is ProOutput:  # pro's schema has no flags field: it says so only for a blocked image
        return {"images": images, "seed": result.get("seed"), **({"has_nsfw_concepts": nsfw} if any(nsfw) else {})}
    return {
        "images": images,
        "timings": result.get("timings") or {},
        "seed": result.get("seed"),
        "has_nsfw_concepts": nsfw,
        "prompt": result.get("prompt", (job.request or {}).get("prompt", "")),
    }


def error_response(job: Any) -> Response:
    """A failed or cancelled job as the endpoint's own error answer."""
    error, error_type = job_error(job)
    detail = getattr(job, "error_detail", None) or {}
    if error_type in ("validation_error", "input_error", "invalid_input") or detail.get("field"):
        field = detail.get("field") or "body"
        loc = [part for part in field.replace("]", "").replace("[", ".").split(".") if part]
        loc = [int(p) if p.isascii() and p.isdigit() else p for p in loc]
        body = {"detail": [field_error(loc, detail.get("message") or error)]}
        return _json(body, 422, job.id)
    if error_type == "request_timeout":
        return _json({"detail": "Request timed out", "error_type": error_type}, 504, job.id,
                     {"X-Fal-Error-Type": error_type, "X-Fal-Request-Timeout-Type": "user"})
    status = 400 if job.status == "cancelled" else 500
    return _json({"detail": error, "error_type": error_type}, status, job.id, {"X-Fal-Error-Type": error_type})


def _forget(request: Request, job: Any) -> None:
    """Drop a store_io=0 / sync_mode job's bodies and files once answered."""
    store, storage = request.app.state.store, request.app.state.storage
    for image in (job.result or {}).get("images", []):
        with contextlib.suppress(Exception):  # already gone
            storage.delete(image["key"])
    store.forget_io(job.id)


def result_response(request: Request, job: Any, spec: EndpointSpec) -> Response:
    if job.status != "completed":
        return error_response(job)
    body = output_body(request.app.state.storage, base_url(request), job, spec)
    if not job.store_io or (job.input or {}).get("sync_mode"):
        _forget(request, job)
    return _json(body, 200, job.id)


# ---- synchronous run ------------------------------------------------------------------------------------------
async def wait_for(request: Request, job_id: str) -> Any:
    """The job once it ended (None if it is gone), holding no thread while it waits (``api/waits.py``); a
    caller that hangs up first has its job cancelled."""
    store = request.app.state.store
    if not await request.app.state.waits.wait(job_id, math.inf, caller_gone=request.is_disconnected):
        await asyncio.to_thread(store.request_cancel, job_id)
    return await asyncio.to_thread(store.get, job_id)


async def run(request: Request, endpoint_id: str) -> Response:
    spec = endpoint_spec(request, endpoint_id)
    job = await submit(request, spec, sync=True)
    job = await wait_for(request, job.id)
    return await asyncio.to_thread(result_response, request, job, spec)


async def _stream_events(request: Request, spec: EndpointSpec, job_id: str):
    """The events of ``run_stream`` until the job ends (or, the caller gone, is cancelled)."""
    store = request.app.state.store
    after, last_beat = 0, time.monotonic()
    while True:
        current = await asyncio.to_thread(store.get, job_id)
        lines = await asyncio.to_thread(store.logs, job_id, after)
        if lines:
            after = lines[-1].seq
            progress = {"step": current.step, "total": current.total_steps}
            event: dict[str, Any] = {"status": "IN_PROGRESS", "progress": progress,
                                     "logs": [log_entry(line, base_url(request)) for line in lines]}
            previews = [line.preview_key for line in lines if line.preview_key]
            if previews:
                event["images"] = [{"url": image_url(request, key)} for key in previews]
            yield f"data: {json.dumps(event)}\n\n"
            last_beat = time.monotonic()
        if current.status in TERMINAL:
            response = await asyncio.to_thread(result_response, request, current, spec)
            yield f"data: {response.body.decode()}\n\n"
            return
        if await request.is_disconnected():
            await asyncio.to_thread(store.request_cancel, job_id)
            return
        if time.monotonic() - last_beat > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_beat = time.monotonic()
        await asyncio.sleep(STREAM_POLL_S)


async def run_stream(request: Request, endpoint_id: str) -> Response:
    """SSE: a ``data:`` event per progress step, then the output (or the error)."""
    spec = endpoint_spec(request, endpoint_id)
    job = await submit(request, spec, sync=True)
    store = request.app.state.store

    async def events():
        answered = False
        try:
            async for event in _stream_events(request, spec, job.id):
                yield event
            answered = True
        finally:
            if not answered:  # the caller hung up (the response was cancelled): nobody will read the result
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(store.request_cancel, job.id)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"x-fal-request-id": job.id, "Cache-Control": "no-cache"})


# ---- queue -------------------------------------------------------------------------------------------------------
async def queue_submit(request: Request, endpoint_id: str, prefix: str) -> Response:
    spec = endpoint_spec(request, endpoint_id)
    job = await submit(request, spec, request.query_params.get("fal_webhook"))
    # Accepted: from here on nothing may turn into a 5xx, or a retrying client would submit twice.
    position = 0
    with contextlib.suppress(Exception):
        if job.status == "queued":
            position = await _store_call(request, request.app.state.store.queue_position, job.id) or 0
    body = {"status": "IN_QUEUE", "request_id": job.id, **queue_urls(request, prefix, spec.id, job.id),
            "queue_position": position}
    return _json(body, 200, job.id)


def _visible(job: Any, app: str, identity: Identity) -> bool:
    """A fal job of endpoint ``app`` (owner/alias) that this caller may see; anything else answers as missing."""
    return (job is not None and job.dialect == DIALECT and app_path(job.endpoint) == app.strip("/")
            and identity.may_see(job.owner))


async def job_status(request: Request, app: str, request_id: str) -> Any:
    """The status snapshot (``JobStatus``) of fal job ``request_id`` of ``app``, or 404."""
    store = request.app.state.store
    job = store.cached_status(request_id, STATUS_MAX_AGE_S)
    if job is None:
        job = await _store_call(request, store.status, request_id, STATUS_MAX_AGE_S)
    if not _visible(job, app, caller(request)):
        raise ApiError(404, f"Request {request_id!r} not found for {app!r}", error_type="not_found")
    return job


async def find_job(request: Request, app: str, request_id: str) -> Any:
    """The fal job ``request_id`` submitted to an endpoint of ``app`` (owner/alias), or 404."""
    job = await _store_call(request, request.app.state.store.get, request_id)
    if not _visible(job, app, caller(request)):
        raise ApiError(404, f"Request {request_id!r} not found for {app!r}", error_type="not_found")
    return job


def _wants_logs(request: Request) -> bool:
    return request.query_params.get("logs", "0").lower() in ("1", "true", "yes")


async def _status(request: Request, job: Any, prefix: str, with_logs: bool, after: int = 0) -> tuple[dict, int]:
    """The status body of a ``JobStatus`` snapshot (with the log lines after ``after`` when asked)."""
    store = request.app.state.store
    position, logs = job.queue_position, None
    if job.status != "queued" and with_logs:
        lines = await _store_call(request, store.logs, job.id, after)
        logs = [log_entry(line, base_url(request)) for line in lines]
        if lines:
            after = lines[-1].seq
    body = status_body(job, queue_urls(request, prefix, job.endpoint, job.id), logs, position)
    return body, after


async def queue_status(request: Request, app: str, request_id: str, prefix: str) -> Response:
    job = await job_status(request, app, request_id)
    body, _ = await _status(request, job, prefix, _wants_logs(request))
    return _json(body, 200 if body["status"] == "COMPLETED" else 202, job.id)


async def queue_status_stream(request: Request, app: str, request_id: str, prefix: str) -> Response:
    """SSE of status bodies: one per change (logs are only the new lines), closed after COMPLETED. Changes made
    in this process wake the stream at once (a store change listener); others are seen within ``STREAM_POLL_S``."""
    job = await job_status(request, app, request_id)
    store, with_logs = request.app.state.store, _wants_logs(request)
    loop, changed = asyncio.get_running_loop(), asyncio.Event()
    watching = {"queued": job.status == "queued"}

    def on_change(job_ids: tuple[str, ...]) -> None:
        # a queued job's position moves with every other job; otherwise only its own changes matter
        if watching["queued"] or not job_ids or job.id in job_ids:
            loop.call_soon_threadsafe(changed.set)

    async def next_snapshot() -> Any:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), STREAM_POLL_S)
        changed.clear()
        snapshot = await _store_call(request, store.status, job.id)
        if snapshot is not None:
            watching["queued"] = snapshot.status == "queued"
        return snapshot

    async def events():
        store.add_change_listener(on_change)
        try:
            async for event in status_events():
                yield event
        finally:
            store.remove_change_listener(on_change)

    async def status_events():
        # read again now that the listener is in place: no change can slip between the read and the wait
        current = await _store_call(request, store.status, job.id) or job
        after, last_sent, last_beat = 0, None, time.monotonic()
        while True:
            body, after_now = await _status(request, current, prefix, with_logs, after)
            changed = after_now != after or (body["status"], body.get("queue_position")) != last_sent
            after = after_now
            if changed:
                yield f"data: {json.dumps(body)}\n\n"
                last_sent, last_beat = (body["status"], body.get("queue_position")), time.monotonic()
                if body["status"] == "COMPLETED":
                    return
            elif time.monotonic() - last_beat > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_beat = time.monotonic()
            if await request.is_disconnected():
                return
            current = await next_snapshot() or current

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"x-fal-request-id": job.id, "Cache-Control": "no-cache"})


async def queue_result(request: Request, app: str, request_id: str) -> Response:
    job = await find_job(request, app, request_id)
    if job.status not in TERMINAL:
        return _json({"detail": "Request is still in progress", "status": "IN_PROGRESS" if job.status == "running"
                      else "IN_QUEUE"}, 400, job.id)
    spec = endpoint_spec(request, job.endpoint)
    if job.status == "completed" and job.result is None:
        return fal_error(410, "The output of this request was not stored (sync_mode or X-Fal-Store-IO: 0)",
                         headers={"x-fal-request-id": job.id})
    return await asyncio.to_thread(result_response, request, job, spec)


async def queue_cancel(request: Request, app: str, request_id: str) -> Response:
    await find_job(request, app, request_id)
    outcome = await asyncio.to_thread(request.app.state.store.request_cancel, request_id)
    codes = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400}
    if outcome not in codes:
        raise ApiError(404, f"Request {request_id!r} not found", error_type="not_found")
    return _json({"status": outcome}, codes[outcome], request_id)


# ---- the status hot path ----------------------------------------------------------------------------------------
_STATUS_PATH = re.compile(r"^(/queue)?/(.*)/requests/([^/]+)/status$")


class StatusFastPath:
    """ASGI middleware answering ``GET .../requests/{id}/status`` (without logs) before FastAPI's routing,
    validation and middleware stack. It answers only what it can answer exactly as the route would (the
    caller's key is in the auth cache, the job exists and belongs to the URL's app); anything else (a 404, a
    401, ``?logs=1``, a mounted app) falls through to the route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].endswith("/status"):
            return await self.app(scope, receive, send)
        match = _STATUS_PATH.match(scope["path"])
        if match is None or scope["path"].startswith("/files/") or scope.get("root_path"):
            return await self.app(scope, receive, send)
        if scope["query_string"]:
            logs = [v for k, v in parse_qsl(scope["query_string"].decode("latin-1")) if k == "logs"]
            if logs and logs[-1].lower() in ("1", "true", "yes"):
                return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-case names; a repeated header's last value
        state = scope["app"].state
        authorization = headers.get(b"authorization")
        secret = parse_authorization(authorization.decode("latin-1")) if authorization else None
        identity = is_cached(state.auth, secret)
        if identity is None:
            return await self.app(scope, receive, send)
        prefix, app, request_id = match.group(1) or "", match.group(2), match.group(3)
        store = state.store
        job = store.cached_status(request_id, STATUS_MAX_AGE_S)
        if job is None:
            if state.store_inline:
                job = store.status(request_id, STATUS_MAX_AGE_S)
            else:
                job = await asyncio.to_thread(store.status, request_id, STATUS_MAX_AGE_S)
        host = headers.get(b"x-forwarded-host", b"").split(b",")[0].strip() or headers.get(b"host")
        if not _visible(job, app, identity) or not host:
            return await self.app(scope, receive, send)
        scheme = headers.get(b"x-forwarded-proto", b"").split(b",")[0].strip().decode("latin-1") or scope["scheme"]
        base = f"{scheme}://{host.decode('latin-1')}"
        body = status_body(job, queue_urls_at(base, prefix, job.endpoint, job.id), None, job.queue_position)
        payload = json.dumps(body, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 200 if body["status"] == "COMPLETED" else 202,
                    "headers": [(b"content-length", str(len(payload)).encode()),
                                (b"content-type", b"application/json"),
                                (b"x-fal-request-id", job.id.encode())]})
        await send({"type": "http.response.body", "body": payload})


# ---- routes: prefixed layout ----------------------------------------------------------------------------------
@router.post("/run/{endpoint_id:path}", summary="Run an endpoint and wait for its output")
async def run_route(request: Request, endpoint_id: str) -> Response:
    endpoint_id = endpoint_id.strip("/")
    if endpoint_id.endswith("/stream") and endpoint_id not in _catalog(request).endpoints:
        return await run_stream(request, endpoint_id.removesuffix("/stream"))
    return await run(request, endpoint_id)


@router.get("/queue/{app:path}/requests/{request_id}/status", summary="Status of a queued request")
async def status_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_status(request, app, request_id, "/queue")


@router.get("/queue/{app:path}/requests/{request_id}/status/stream", summary="Status events (SSE)")
async def status_stream_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_status_stream(request, app, request_id, "/queue")


@router.get("/queue/{app:path}/requests/{request_id}", summary="Output of a completed request")
async def result_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_result(request, app, request_id)


@router.put("/queue/{app:path}/requests/{request_id}/cancel", summary="Cancel a queued or running request")
async def cancel_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_cancel(request, app, request_id)


@router.post("/queue/{endpoint_id:path}", summary="Queue a request")
async def submit_route(request: Request, endpoint_id: str) -> Response:
    return await queue_submit(request, endpoint_id, "/queue")


# ---- routes: fal's own layout (included last: catch-all paths) ---------------------------------------------------
def _is_queue_host(request: Request) -> bool:
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or ""
    return host.lower().startswith("queue.")


@root_router.get("/{app:path}/requests/{request_id}/status", include_in_schema=False)
async def root_status_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_status(request, app, request_id, "")


@root_router.get("/{app:path}/requests/{request_id}/status/stream", include_in_schema=False)
async def root_status_stream_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_status_stream(request, app, request_id, "")


@root_router.get("/{app:path}/requests/{request_id}", include_in_schema=False)
async def root_result_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_result(request, app, request_id)


@root_router.put("/{app:path}/requests/{request_id}/cancel", include_in_schema=False)
async def root_cancel_route(request: Request, app: str, request_id: str) -> Response:
    return await queue_cancel(request, app, request_id)


@root_router.post("/{endpoint_id:path}", include_in_schema=False)
async def root_post_route(request: Request, endpoint_id: str) -> Response:
    if _is_queue_host(request):
        return await queue_submit(request, endpoint_id, "")
    return await run_route(request, endpoint_id)


# ---- per-endpoint OpenAPI documents (fal's path) -----------------------------------------------------------------
docs_router = APIRouter(tags=["fal"])


@docs_router.get("/api/openapi/queue/openapi.json", summary="fal-style OpenAPI document of one endpoint")
async def endpoint_openapi(request: Request, endpoint_id: str) -> JSONResponse:
    spec = endpoint_spec(request, endpoint_id)
    return JSONResponse(endpoint_openapi_document(spec, base_url(request)))


def _alias(table: dict[str, tuple[str, str]], spec: EndpointSpec) -> str | None:
    """The first name of an OpenAI or Replicate model table that reaches ``spec`` (None: no name does)."""
    return next((name for name, ids in table.items() if ids[1 if spec.is_edit else 0] == spec.id), None)


@docs_router.get("/api/endpoints", summary="Every endpoint of the catalogue")
async def list_endpoints(request: Request) -> JSONResponse:
    """Each endpoint, with the OpenAI ``model`` and the Replicate model that reach it (null when none does)."""
    catalog = _catalog(request)
    base = base_url(request)
    return JSONResponse([
        {"endpoint_id": s.id, "title": s.title, "model": s.model, "task": s.task, "schema": s.schema,
         "openapi": f"{base}/api/openapi/queue/openapi.json?endpoint_id={s.id}",
         "openai_model": _alias(catalog.openai_models, s), "replicate_model": _alias(catalog.replicate_models, s),
         **({"max_references": s.max_references, "max_input_megapixels": s.max_input_megapixels}
            if s.is_edit else {})}
        for s in catalog.endpoints.values()
    ])


def endpoint_openapi_document(spec: EndpointSpec, server: str) -> dict[str, Any]:
    input_schema = input_model(spec).model_json_schema(ref_template="#/components/schemas/{model}")
    output_schema = output_model(spec).model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = {}
    for schema in (input_schema, output_schema):
        components.update(schema.pop("$defs", {}))
    input_name, output_name = input_model(spec).__name__, output_model(spec).__name__
    components[input_name], components[output_name] = input_schema, output_schema
    components = to_openapi30(components)
    status = {"type": "object", "properties": {
        "status": {"type": "string", "enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]},
        "request_id": {"type": "string"}, "response_url": {"type": "string"}, "status_url": {"type": "string"},
        "cancel_url": {"type": "string"}, "queue_position": {"type": "integer"}, "logs": {"type": "array"},
        "metrics": {"type": "object"}, "error": {"type": "string"}, "error_type": {"type": "string"}}}
    components["QueueStatus"] = status
    components.update(ERROR_SCHEMAS)
    app = app_path(spec.id)
    ok = {"description": "Successful Response"}
    request_id = [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"},
                   "description": "The request_id the queue answered"}]
    errors = {code: ERROR_RESPONSES[code] for code in ("401", "404")}
    return {
        "openapi": "3.0.4",
        "info": {"title": spec.title, "version": "1.0.0", "x-fal-metadata": {"endpointId": spec.id}},
        "servers": [{"url": f"{server}/queue"}],
        "paths": {
            f"/{spec.id}": {"post": {
                "operationId": "submit",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{input_name}"}}}},
                "responses": {"200": {**ok, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/QueueStatus"}}}}, **ERROR_RESPONSES}}},
            f"/{app}/requests/{{request_id}}/status": {"get": {
                "operationId": "status", "parameters": request_id,
                "responses": {"200": ok, "202": ok, **errors}}},
            f"/{app}/requests/{{request_id}}/cancel": {"put": {
                "operationId": "cancel", "parameters": request_id,
                "responses": {"202": ok, "400": ERROR_RESPONSES["400"], **errors}}},
            f"/{app}/requests/{{request_id}}": {"get": {
                "operationId": "result", "parameters": request_id,
                "responses": {"200": {**ok, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{output_name}"}}}},
                    "400": ERROR_RESPONSES["400"], **errors}}},
        },
        "components": {"schemas": components},
    }


# Error answers of fal's queue, as the per-endpoint documents describe them.
ERROR_SCHEMAS: dict[str, Any] = {
    "FalError": {"type": "object", "required": ["detail"], "properties": {
        "detail": {"type": "string"}, "error_type": {"type": "string"}}},
    "ValidationError": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"}, "type": {"type": "string"}}},
    "HTTPValidationError": {"type": "object", "properties": {
        "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}}},
}


def _error(description: str, schema: str = "FalError") -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


ERROR_RESPONSES: dict[str, Any] = {
    "400": _error("Bad request: a bad header, or a request that is not finished or cannot be cancelled"),
    "401": _error("No valid API key (Authorization: Key <key>)"),
    "404": _error("Unknown endpoint or request id"),
    "413": _error("The request body is larger than the server accepts"),
    "422": _error("Invalid input: each entry names its field in `loc`", "HTTPValidationError"),
    "429": _error("The queue is full for this key or for the server, or the key is over one of its quotas; "
                  "retry after `Retry-After` seconds"),
}


# ---- webhooks ----------------------------------------------------------------------------------------------------
def webhook_payload(catalog: Catalog, storage: Any, job: Any) -> tuple[str, dict[str, Any]] | None:
    """fal's webhook body: ``status`` OK with the output as ``payload``, or ERROR with the error answer."""
    hook = job.webhook or {}
    if not hook.get("url"):
        return None
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    try:
        spec = catalog.endpoint(job.endpoint)
        if job.status == "completed":
            body.update(status="OK", payload=output_body(storage, hook.get("base_url", ""), job, spec), error=None)
            return hook["url"], body
    except Exception as exc:  # noqa: BLE001 - report rather than lose the notification
        body.update(status="ERROR", payload=None, error=f"Could not build the output: {exc}")
        return hook["url"], body
    response = error_response(job)
    body.update(status="ERROR", error=f"Invalid status code: {response.status_code}",
                payload=json.loads(response.body))
    return hook["url"], body
