"""The OpenAI Images dialect: ``/v1/images/generations``, ``/v1/images/edits``, ``/v1/models``.

A translation, nothing more: an OpenAI request becomes one or more canonical jobs (``n`` above the model's
batch limit is split into parallel jobs), which run on the shared workers; their results become an
``ImagesResponse`` (or an SSE stream of ``image_generation.*`` / ``image_edit.*`` events).

Sizes follow seed 004 (``WxH``, ``W:H``, ``auto``, ``aspect_ratio`` + ``resolution`` tiers, ``size`` wins);
parameters we do not model pass through to the canonical request when they name one of its knobs
(``steps``, ``guidance``, ``safety_tolerance``, ...). Errors have OpenAI's shape; every response carries
``x-request-id``; a 5xx once work has started carries ``x-should-retry: false``; a retry (same
``Idempotency-Key``, or the SDK's own retry of the same body) reattaches to the jobs it already made.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from fluxserve import fetch, jsonsafe
from fluxserve.api.auth import caller, check_request, queue_full
from fluxserve.api.bodies import off_loop
from fluxserve.api.common import BadReference, data_uri, image_url, resolve_references, tenant
from fluxserve.api.errors import ApiError, documented
from fluxserve.api.limits import prompt_error
from fluxserve.api.openai_usage import image_usage, jobs_usage
from fluxserve.api.stored_files import InlineFull, delete_files_blocking, storage_full, store_images
from fluxserve.catalog import Catalog, EndpointSpec
from fluxserve.jobs.store import BLOCKED_ERROR_TYPE, QueueFull
from fluxserve.request import MAX_SEED, GenerationRequest, InputError
from fluxserve.sizes import SizeError, gateway_size

log = logging.getLogger(__name__)

MAX_N = 10
MAX_BATCH = 4  # images one job makes (GenerationRequest.num_images)
SINGLE_IMAGE_SCHEMAS = ("pro", "flex")  # fal's [pro] and [flex] make one image per call (no num_images)
OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp", "gif": "gif", "avif": "avif"}
TERMINAL = ("completed", "failed", "cancelled")
INPUT_ERRORS = ("input_error", "invalid_input", "validation_error", "bad_request")

# Provider fields (seed 004 "passthrough") -> canonical request fields.
PASSTHROUGH: dict[str, str] = {
    "steps": "steps",
    "num_inference_steps": "steps",
    "guidance": "guidance",
    "guidance_scale": "guidance",
    "safety_tolerance": "safety_tolerance",
    "enable_safety_checker": "safety_checker",
    "acceleration": "acceleration",
    "enable_prompt_expansion": "expand_prompt",
    "prompt_upsampling": "expand_prompt",
    "output_quality": "output_quality",
}
# Accepted and not modelled by FLUX.2 (quality tiers, styles, transparency, user ids).
IGNORED = ("quality", "style", "background", "user", "input_fidelity", "safety_identifier", "moderation")
BOOL_FIELDS = ("stream", "enable_safety_checker", "disable_safety_checker", "enable_prompt_expansion",
               "prompt_upsampling", "sync_mode", "go_fast")
# Every field the dialect reads; the rest of a request is the caller's provider-specific options, passed to an
# upstream provider as they came when the gateway routes the request there (seed 004's "passthrough").
MODELLED = frozenset(("model", "prompt", "n", "size", "aspect_ratio", "resolution", "response_format",
                      "output_format", "output_compression", "seed", "stream", "partial_images", "mask", "image",
                      "image_url", "image_count", "width", "height", "disable_safety_checker", "go_fast",
                      "sync_mode", *PASSTHROUGH, *IGNORED))


def provider_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of an OpenAI request (as recorded) that the dialect does not read."""
    return {name: value for name, value in raw.items() if name not in MODELLED and not name.startswith("image[")}


class OpenAIRoute(APIRoute):
    """Every response of the dialect carries ``x-request-id``; errors keep OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
            request.state.request_id = request_id
            try:
                response = await handler(request)
            except ApiError as exc:
                if exc.dialect != "openai":
                    exc = ApiError(exc.status, exc.message, dialect="openai", param=exc.param,
                                   error_type=exc.error_type, headers=exc.headers)
                response = _error_response(exc)
            except StarletteHTTPException as exc:
                response = _error_response(ApiError(exc.status_code, str(exc.detail), dialect="openai",
                                                    error_type="http_error", headers=dict(exc.headers or {})))
            except RequestValidationError as exc:  # a path or query parameter of the wrong type or range
                err = exc.errors()[0]
                param = str(err["loc"][-1]) if err.get("loc") else None
                response = _error_response(invalid(param, f"Invalid '{param}': {err['msg']}.", "invalid_value"))
            except Exception:  # an unexpected failure still answers in OpenAI's shape
                log.exception("OpenAI route %s failed", request.url.path)
                response = _error_response(ApiError(500, "The server had an error while processing your request.",
                                                    dialect="openai", error_type="server_error"))
            if response.status_code >= 500 and getattr(request.state, "work_started", False):
                response.headers["x-should-retry"] = "false"  # a retry would start the GPU work again
            response.headers["x-request-id"] = request_id
            return response

        return route


router = APIRouter(prefix="/v1", tags=["OpenAI Images"], route_class=OpenAIRoute,
                   responses=documented(400, 401, 404, 413, 429))


def _error_response(exc: ApiError) -> JSONResponse:
    error_type = "invalid_request_error" if exc.status < 500 else "server_error"
    if exc.status == 401:
        error_type = "invalid_request_error"
    if exc.status == 429:  # OpenAI names what ran out ("requests"), with code "rate_limit_exceeded"
        error_type = exc.error_type or "requests"
    body = {"error": {"message": exc.message, "type": error_type, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def invalid(param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, message, dialect="openai", param=param, error_type=code)


# ---- translation ------------------------------------------------------------------------------------
def preset_request(spec: EndpointSpec, **fields: Any) -> dict[str, Any]:
    """A canonical request dict: the endpoint's preset, then ``fields`` (shared with the Replicate dialect).
    Fixed sigmas (the Turbo preset) fix the step count."""
    request: dict[str, Any] = {
        "model": spec.model,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "expand_prompt": spec.expand_prompt,
        "output_format": spec.output_format,
    }
    if spec.loras:
        request["loras"] = [lora.model_dump() for lora in spec.loras]
    request.update({k: v for k, v in fields.items() if v is not None})
    if spec.sigmas:
        request["sigmas"] = list(spec.sigmas)
        request["steps"] = len(spec.sigmas)
    return request


def resolve_model(catalog: Catalog, name: Any, edit: bool) -> EndpointSpec:
    name = name or catalog.openai_default
    if not isinstance(name, str) or name not in catalog.openai_models:
        known = ", ".join(sorted(catalog.openai_models))
        raise invalid("model", f"The model '{name}' does not exist. Models served here: {known}.",
                      code="model_not_found", status=404)
    text_id, edit_id = catalog.openai_models[name]
    return catalog.endpoint(edit_id if edit else text_id)


def _int(fields: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise invalid(name, f"'{name}' must be an integer between {low} and {high}.", "invalid_type")
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 parses as infinity
        raise invalid(name, f"Invalid type for '{name}': expected an integer, got {value!r}.",
                      "invalid_type") from None
    if number < low:
        raise invalid(name, f"{number} is less than the minimum of {low} - '{name}'.", "integer_below_min_value")
    if number > high:
        raise invalid(name, f"{number} is greater than the maximum of {high} - '{name}'.",
                      "integer_above_max_value")
    return number


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    if isinstance(value, int):
        return bool(value)
    raise invalid(name, f"Invalid value for '{name}': expected a boolean, got {value!r}.", "invalid_type")


def _choice(fields: dict[str, Any], name: str, allowed: dict[str, str] | tuple[str, ...], default: str) -> str:
    value = fields.get(name)
    if value is None or value == "":
        return default
    mapping = allowed if isinstance(allowed, dict) else {a: a for a in allowed}
    if not isinstance(value, str) or value.lower() not in mapping:
        names = ", ".join(dict.fromkeys(mapping))
        raise invalid(name, f"Invalid value: {value!r}. Supported values are: {names}.")
    return mapping[value.lower()]


# Canonical request fields -> the OpenAI parameter a client sent for them (errors name the latter).
OPENAI_NAMES: dict[str, str] = {
    "width": "size",
    "height": "size",
    "num_images": "n",
    "image_urls": "image",
    "output_quality": "output_compression",
    "safety_checker": "enable_safety_checker",
    "expand_prompt": "enable_prompt_expansion",
}
_INDEXED = re.compile(r"^image_urls\[(\d+)\]")


def openai_param(field: str | None, names: list[str] | None = None) -> str | None:
    """An internal field name (``image_urls[1]``, ``width``) -> the OpenAI parameter the client sent
    (``names[i]`` is the parameter that carried reference ``i``: ``image``, ``image[1]``, ``image_url``)."""
    if not field:
        return None
    names = names or []
    whole = names[0].split("[")[0] if names else "image"
    match = _INDEXED.match(field)
    if match:
        index = int(match.group(1))
        return names[index] if index < len(names) else whole
    if field == "image_urls":
        return whole
    head = re.split(r"[.\[]", field, maxsplit=1)[0]
    return OPENAI_NAMES.get(head, head)


def batch_limit(spec: EndpointSpec) -> int:
    """Images one job of this endpoint makes: fal's [pro] and [flex] make one per call, the rest up to 4."""
    return 1 if spec.schema in SINGLE_IMAGE_SCHEMAS else MAX_BATCH


def translate(
    fields: dict[str, Any], catalog: Catalog, images: list[str], edit: bool
) -> tuple[EndpointSpec, list[dict[str, Any]], dict[str, Any]]:
    """OpenAI fields -> (endpoint, one canonical request per job, response options). Raises ApiError.
    ``n`` is batched up to the model's per-call limit; the remaining jobs run in parallel on the workers,
    with consecutive seeds."""
    prompt = fields.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise invalid("prompt", "Invalid type for 'prompt': expected a string.", "invalid_type")
    if fields.get("mask") not in (None, ""):
        raise invalid(
            "mask",
            "Masks are not supported: the served FLUX.2 models do not inpaint. Send the image(s) without a mask "
            "and describe the change in the prompt; FLUX.2 edits the whole image from its references.",
            "unsupported_parameter",
        )
    spec = resolve_model(catalog, fields.get("model"), edit)
    if edit and not images:
        raise invalid("image", "Missing required parameter: 'image' (one or more images to edit).",
                      "missing_required_parameter")
    if spec.max_references and len(images) > spec.max_references:
        raise invalid("image", f"Too many images: {len(images)}; this model takes at most "
                      f"{spec.max_references} reference images.")

    n = _int(fields, "n", 1, MAX_N, default=1)
    response_format = _choice(fields, "response_format", ("url", "b64_json"), "url")
    output_format = _choice(fields, "output_format", OUTPUT_FORMATS, "png")
    compression = _int(fields, "output_compression", 0, 100)
    seed = _int(fields, "seed", 0, MAX_SEED)
    stream = _bool(fields.get("stream", False), "stream")
    partial_images = _int(fields, "partial_images", 0, 3, default=0) if stream else 0
    for name in ("size", "aspect_ratio", "resolution"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise invalid(name, f"Invalid type for '{name}': expected a string.", "invalid_type")
    try:
        size = gateway_size(fields.get("size"), fields.get("aspect_ratio"), fields.get("resolution"))
    except SizeError as exc:
        raise invalid(exc.field, f"Invalid '{exc.field}': {exc.message}.") from None
    if size is None and "width" in fields and "height" in fields:  # Replicate-style passthrough
        width, height = _int(fields, "width", 64, 2048), _int(fields, "height", 64, 2048)
        size = (width, height) if width and height else None

    passthrough: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, target in PASSTHROUGH.items():
        if fields.get(name) is not None and fields[name] != "":
            value = fields[name]
            if target in ("safety_checker", "expand_prompt"):
                value = _bool(value, name)
            passthrough[target], origin[target] = value, name
    if fields.get("disable_safety_checker") is not None:
        passthrough["safety_checker"] = not _bool(fields["disable_safety_checker"], "disable_safety_checker")
        origin["safety_checker"] = "disable_safety_checker"
    if fields.get("go_fast") is not None:
        passthrough["acceleration"] = "high" if _bool(fields["go_fast"], "go_fast") else "regular"
        origin["acceleration"] = "go_fast"
    if fields.get("moderation") == "low" and "safety_tolerance" not in passthrough:
        passthrough["safety_tolerance"] = 5  # the most permissive FLUX.2 tolerance

    base = preset_request(
        spec, prompt=prompt, image_urls=images, width=size[0] if size else None,
        height=size[1] if size else None, output_format=output_format, output_quality=compression,
        partial_images=partial_images, fail_if_blocked=True,  # OpenAI rejects what its safety system blocks
    )
    base.update(passthrough)
    if spec.sigmas:  # fixed schedules fix the step count
        base["steps"] = len(spec.sigmas)
    requests = []
    offset = 0
    limit = batch_limit(spec)
    while offset < n:
        count = min(limit, n - offset)
        request = dict(base, num_images=count, seed=None if seed is None else seed + offset)
        try:
            requests.append(GenerationRequest.model_validate(request).model_dump(mode="json"))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            target = str(err["loc"][0]) if err["loc"] else None
            param = origin.get(target) or openai_param(target)
            raise invalid(param, f"Invalid '{param}': {err['msg']}.") from None
        offset += count
    options = {
        "response_format": response_format,
        "output_format": output_format,
        "stream": stream,
        "partial_images": partial_images,
        "sync_mode": _bool(fields.get("sync_mode", False), "sync_mode"),
        "prompt": prompt,
    }
    return spec, requests, options


# ---- jobs ----------------------------------------------------------------------------------------------
class RetryMemory:
    """Which jobs a request made, so a retry reattaches instead of making duplicates.

    ``Idempotency-Key`` gives deterministic job ids (works across replicas). Without one, the OpenAI SDK's
    own retries (``x-stainless-retry-count`` > 0, same credentials and body) are matched in memory."""

    def __init__(self, ttl_s: float = 3600.0):
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, list[str]]] = {}

    def remember(self, fingerprint: str, job_ids: list[str]) -> None:
        now = time.monotonic()
        if len(self._seen) > 5000:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.ttl_s}
        self._seen[fingerprint] = (now, job_ids)

    def recall(self, fingerprint: str) -> list[str] | None:
        entry = self._seen.get(fingerprint)
        if entry and time.monotonic() - entry[0] < self.ttl_s:
            return entry[1]
        return None

    def forget_jobs(self, job_ids: list[str]) -> None:
        """Forget the request that made these jobs (they were cancelled: a retry must make new ones)."""
        self._seen = {k: v for k, v in self._seen.items() if v[1] != job_ids}


def _memory(request: Request) -> RetryMemory:
    state = request.app.state
    if getattr(state, "openai_retries", None) is None:
        state.openai_retries = RetryMemory()
    return state.openai_retries


def _fingerprint(request: Request, body: bytes) -> str:
    digest = hashlib.sha256()
    digest.update((request.headers.get("authorization") or "").encode())
    digest.update(request.url.path.encode())
    digest.update(body)
    return digest.hexdigest()


async def submit_jobs(
    request: Request, spec: EndpointSpec, requests: list[dict[str, Any]], raw: dict[str, Any],
    store_io: bool, body: bytes,
) -> list[str]:
    store = request.app.state.store
    idempotency_key = request.headers.get("idempotency-key")
    # the caller waits on this connection; with an Idempotency-Key it may come back for the jobs elsewhere
    held_by = None if idempotency_key else getattr(request.app.state, "process_id", None)
    ids: list[str | None] = [None] * len(requests)
    if idempotency_key:
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, "fluxserve/openai")
        owner = request.headers.get("authorization") or ""
        ids = [str(uuid.uuid5(namespace, f"{owner}\n{idempotency_key}\n{i}")) for i in range(len(requests))]
        existing = [await run_in_threadpool(store.get, job_id) for job_id in ids]
        if all(job is not None for job in existing):
            return [job_id for job_id in ids if job_id]
    fingerprint = _fingerprint(request, body)
    retries = request.headers.get("x-stainless-retry-count", "0")
    if retries not in ("", "0"):
        earlier = _memory(request).recall(fingerprint)
        if earlier:
            return earlier
    job_ids = []
    for index, canonical in enumerate(requests):
        if idempotency_key:
            job = await run_in_threadpool(store.get, ids[index])
            if job is not None:
                job_ids.append(job.id)
                continue
        try:
            job = await run_in_threadpool(
                lambda c=canonical, i=ids[index]: store.submit(
                    endpoint=spec.id, dialect="openai", request=c, input=raw, store_io=store_io, job_id=i,
                    owner=caller(request).key_id, caller=held_by,
                )
            )
        except QueueFull as exc:
            for queued in job_ids:  # the caller gets no images: the request's other jobs must not run either
                await run_in_threadpool(store.cancel_queued, queued)
            raise queue_full(exc, "openai") from None
        job_ids.append(job.id)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.submitted(spec.id)
    _memory(request).remember(fingerprint, job_ids)
    return job_ids


async def wait_all(request: Request, job_ids: list[str]) -> list[Any]:
    """The request's jobs once all are terminal. A caller that disconnects first (without an Idempotency-Key
    to come back with) has its jobs that have not started cancelled: nobody would receive their images."""
    store, waits = request.app.state.store, request.app.state.waits
    jobs = []
    for job_id in job_ids:  # waiting holds no thread (``api/waits.py``)
        if not await waits.wait(job_id, math.inf, caller_gone=request.is_disconnected):
            await _caller_gone(request, job_ids)
        jobs.append(await run_in_threadpool(store.get, job_id))
    return jobs


async def _until_hang_up(request: Request, job_ids: list[str], events: AsyncIterator[bytes],
                         stored: list[str] | None = None) -> AsyncIterator[bytes]:
    """A streamed answer's events; if the caller hangs up first, its jobs that have not started are cancelled
    (as in ``wait_all``). Then the request's ``stored`` images are deleted once its jobs have ended."""
    answered = False
    try:
        async for event in events:
            yield event
        answered = True
    finally:
        with anyio.CancelScope(shield=True):
            if not answered:
                await anyio.to_thread.run_sync(_cancel_queued, request, job_ids)
            if stored:
                await anyio.to_thread.run_sync(_delete_when_done, request, job_ids, stored)


def _cancel_queued(request: Request, job_ids: list[str]) -> None:
    """The caller is gone: cancel the request's jobs that have not started (unless an Idempotency-Key lets it
    come back for them); a retry of the same body then makes new jobs."""
    if request.headers.get("idempotency-key"):
        return
    store = request.app.state.store
    if [job_id for job_id in job_ids if store.cancel_queued(job_id)]:
        _memory(request).forget_jobs(job_ids)


async def _caller_gone(request: Request, job_ids: list[str]) -> None:
    await run_in_threadpool(_cancel_queued, request, job_ids)
    raise ApiError(499, "The client closed the connection before the images were ready.", dialect="openai",
                   error_type="client_closed_request")


def job_failure(job: Any, names: list[str] | None = None) -> ApiError:
    """A terminal job that did not complete -> an OpenAI error naming the client's parameter (5xx ones carry
    ``x-should-retry: false``: the work already ran)."""
    message = job.error or f"The image generation {job.status}."
    if job.error_type in INPUT_ERRORS:
        detail = getattr(job, "error_detail", None) or {}
        param = openai_param(detail.get("field") or _field_of(message), names)
        if detail.get("message") and param:
            message = f"Invalid '{param}': {detail['message']}."
        return invalid(param, message)
    if job.error_type == BLOCKED_ERROR_TYPE:  # OpenAI's answer when its safety system blocks an image
        return ApiError(400, f"Your request was rejected by the safety system: {message}.", dialect="openai",
                        error_type="moderation_blocked")
    headers = {"x-should-retry": "false"}
    if job.status == "cancelled":
        return ApiError(500, "The image generation was cancelled.", dialect="openai", error_type="cancelled",
                        headers=headers)
    return ApiError(500, f"The image generation failed: {message}", dialect="openai",
                    error_type=job.error_type or "server_error", headers=headers)


def _field_of(message: str) -> str | None:
    head, sep, _ = message.partition(":")
    head = head.strip()
    return head if sep and re.fullmatch(r"[A-Za-z_][\w.]*(\[\d+\])?", head) else None


async def resolve_images(request: Request, images: list[str], names: list[str]) -> list[str]:
    """URLs of this server's own files (an upload, an earlier output) read from storage, not over HTTP; a bad,
    missing or foreign one is a 400 naming the parameter."""
    try:
        return await resolve_references(request, images)
    except BadReference as exc:
        param = names[exc.index] if exc.index < len(names) else "image"
        raise invalid(param, f"Invalid '{param}': {exc.message}.") from None


async def check_images(spec: EndpointSpec, images: list[str], names: list[str], owner: str | None = None) -> None:
    """Load every reference and check the endpoint's limits before any job exists, so a bad image is a 400
    naming the parameter that carried it (the engine checks again)."""
    from fluxserve import inputs

    current = [0]

    def work() -> None:
        inputs.load_references(images, spec)  # callers' references were checked by resolve_images

    try:
        await fetch.run_blocking(work, tenant=owner, network=inputs.needs_network(images))
    except (InputError, SizeError) as exc:
        param = openai_param(exc.field, names)
        raise invalid(param, f"Invalid '{param}': {exc.message}.") from None
    except Exception as exc:  # noqa: BLE001 - an image that cannot be decoded is the caller's input error
        param = openai_param(f"image_urls[{current[0]}]" if current[0] >= 0 else "image_urls", names)
        raise invalid(param, f"Invalid '{param}': could not read the image: {exc}.") from None


def _images(job: Any) -> list[dict[str, Any]]:
    return list((job.result or {}).get("images") or [])


async def image_bytes(request: Request, key: str) -> bytes:
    data, _ = await run_in_threadpool(request.app.state.storage.get, key)
    return data


async def images_response(request: Request, jobs: list[Any], options: dict[str, Any]) -> dict[str, Any]:
    data = []
    size = None
    for job in jobs:
        revised = (job.result or {}).get("prompt") or options["prompt"]
        for image in _images(job):
            size = size or f"{image['width']}x{image['height']}"
            item: dict[str, Any] = {"revised_prompt": revised}
            if options["response_format"] == "b64_json":
                item["b64_json"] = base64.b64encode(await image_bytes(request, image["key"])).decode("ascii")
            elif options["sync_mode"]:
                item["url"] = data_uri(await image_bytes(request, image["key"]), image["content_type"])
            else:
                item["url"] = image_url(request, image["key"])
            data.append(item)
    return {
        "created": int(time.time()),
        "data": data,
        "background": "opaque",
        "output_format": options["output_format"],
        "size": size,
        "usage": await jobs_usage(request.app.state.store, jobs),  # in billable megapixels
    }


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


async def stream_events(
    request: Request, job_ids: list[str], options: dict[str, Any], prefix: str
) -> AsyncIterator[bytes]:
    """``{prefix}.partial_image`` events from the worker's previews, ``{prefix}.completed`` per image,
    then ``data: [DONE]``."""
    store = request.app.state.store
    common = {"background": "opaque", "output_format": options["output_format"], "quality": "auto"}
    for job_id in job_ids:
        seen = 0
        partial_index = 0
        while True:
            job = await run_in_threadpool(store.get, job_id)
            for line in await run_in_threadpool(store.logs, job_id, seen):
                seen = max(seen, line.seq)
                if line.preview_key and partial_index < options["partial_images"]:
                    try:
                        preview = await image_bytes(request, line.preview_key)
                    except KeyError:
                        continue
                    yield _sse(f"{prefix}.partial_image", {
                        **common, "type": f"{prefix}.partial_image", "created_at": int(time.time()),
                        "partial_image_index": partial_index, "size": "auto",
                        "b64_json": base64.b64encode(preview).decode("ascii"),
                    })
                    partial_index += 1
            if job is None or job.status in TERMINAL:
                break
            await asyncio.sleep(0.2)
        if job is None or job.status != "completed":
            error = job_failure(job, options.get("image_params")) if job else invalid(
                None, "The job disappeared.", status=500)
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            payload = {"message": error.message, "type": kind, "param": error.param, "code": error.error_type}
            yield f"data: {json.dumps({'error': payload})}\n\n".encode()
            break
        for index, image in enumerate(_images(job)):
            data = await image_bytes(request, image["key"])
            yield _sse(f"{prefix}.completed", {
                **common, "type": f"{prefix}.completed", "created_at": int(time.time()),
                "size": f"{image['width']}x{image['height']}", "b64_json": base64.b64encode(data).decode("ascii"),
                "usage": await image_usage(store, job, image, first=index == 0),
            })
    yield b"data: [DONE]\n\n"


# ---- routes --------------------------------------------------------------------------------------------
async def _authorize(request: Request) -> None:
    await check_request(request, "openai")


async def _run(request: Request, fields: dict[str, Any], images: list[str], edit: bool, body: bytes,
               names: list[str] | None = None, stored: list[str] | None = None) -> Response:
    """Translate, check, submit and answer. ``stored``: files this request stored for its images (uploads,
    data URIs), deleted once every job of the request has ended (or when none was made)."""
    stored = stored or []
    request.state.job_ids = []
    streaming = False
    try:
        response, streaming = await _answer(request, fields, images, edit, body, names, stored)
        return response
    finally:
        if stored and not streaming:  # a stream deletes them when it ends (``_until_hang_up``)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_delete_when_done, request, request.state.job_ids, stored)


async def _answer(request: Request, fields: dict[str, Any], images: list[str], edit: bool, body: bytes,
                  names: list[str] | None, stored: list[str]) -> tuple[Response, bool]:
    """The answer, and whether it is a stream; the jobs made are in ``request.state.job_ids``."""
    catalog: Catalog = request.app.state.catalog
    if message := prompt_error(fields.get("prompt"), request.app.state.settings.max_prompt_chars):
        raise invalid("prompt", f"Invalid 'prompt': {message}.", "string_above_max_length")
    names = names or [f"image[{i}]" for i in range(len(images))]
    if images:
        images = await resolve_images(request, images, names)
    spec, requests, options = await off_loop(len(body), translate, fields, catalog, images, edit)
    options["image_params"] = names
    if images:
        await check_images(spec, images, names, tenant(request))
    raw = {k: v for k, v in fields.items() if k not in ("image", "image[]", "mask")}
    if edit:
        raw["image_count"] = len(images)
    request.state.work_started = True
    job_ids = request.state.job_ids = await submit_jobs(request, spec, requests, raw, not options["sync_mode"], body)
    headers = {"x-fluxserve-job-ids": ",".join(job_ids)}
    if options["stream"]:
        prefix = "image_edit" if edit else "image_generation"
        events = _until_hang_up(request, job_ids, stream_events(request, job_ids, options, prefix), stored)
        return (StreamingResponse(events, media_type="text/event-stream",
                                  headers=headers | {"cache-control": "no-store"}), True)
    jobs = await wait_all(request, job_ids)
    for job in jobs:
        if job.status != "completed":
            raise job_failure(job, names)
    result = await images_response(request, jobs, options)
    if options["sync_mode"]:
        for job_id in job_ids:
            await run_in_threadpool(request.app.state.store.forget_io, job_id)
    return JSONResponse(result, headers=headers), False


def _delete_when_done(request: Request, job_ids: list[str], stored: list[str]) -> None:
    """Delete the request's stored images once none of its jobs may still read them: when it made none, or
    all have ended (a job still queued or running, e.g. of a caller that hung up with an Idempotency-Key,
    keeps them until retention)."""
    store = request.app.state.store
    jobs = [store.get(job_id) for job_id in job_ids]
    if all(job is None or job.status in TERMINAL for job in jobs):
        delete_files_blocking(request, stored)


@router.post("/images/generations", summary="Create an image (OpenAI Images)")
async def generations(request: Request) -> Response:
    await _authorize(request)
    body = await request.body()
    depth = request.app.state.settings.max_json_depth
    return await _run(request, await off_loop(len(body), _json_object, body, depth), [], edit=False, body=body)


def _refused(exc: jsonsafe.BadJson) -> ApiError:
    """A body ``jsonsafe`` refused, naming the parameter (``images[0].image_url``) where there is one."""
    if not exc.path:
        return invalid(None, "We could not parse the JSON body of your request.", "invalid_json")
    param = jsonsafe.dotted(exc.path)
    return invalid(param, f"Invalid '{param}': {exc.message}.")


def _json_object(body: bytes, max_json_depth: int = jsonsafe.DEFAULT_MAX_DEPTH) -> dict:
    try:
        fields = jsonsafe.decode(body or b"{}", max_json_depth)
    except jsonsafe.BadJson as exc:
        raise _refused(exc) from None
    if not isinstance(fields, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    return fields


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


async def _stored_images(request: Request, images: list[bytes | str], names: list[str]
                         ) -> tuple[list[str], list[str]]:
    """The request's uploaded parts and data URIs stored once as the caller's files (``stored_files``): every
    job of the request references the same file instead of carrying a copy. (references, stored keys)."""
    try:
        return await store_images(request, images, caller(request).key_id)
    except InlineFull as exc:
        raise storage_full(exc, "openai", names[exc.index] if exc.index < len(names) else "image") from None


@router.post("/images/edits", summary="Edit images with references (OpenAI Images)")
async def edits(request: Request) -> Response:
    """Multipart (the SDK): ``image`` (one file) or repeated ``image[]`` parts, ``image_url`` strings, the other
    fields as strings. JSON: ``images: [{"image_url": ...}]`` and/or ``image_url``. Errors about a reference
    name the parameter that carried it: ``image``, ``image[1]``, ``image_url``, ``images[0].image_url``."""
    await _authorize(request)
    content_type = request.headers.get("content-type", "")
    images: list[str] = []
    names: list[str] = []
    if content_type.startswith("application/json"):
        body = await request.body()
        fields = await off_loop(len(body), _json_object, body, request.app.state.settings.max_json_depth)
        for index, item in enumerate(_as_list(fields.get("images"))):
            ref = item.get("image_url") if isinstance(item, dict) else item
            if not isinstance(ref, str):
                raise invalid("images", "Each entry of 'images' must be {\"image_url\": <URL or data URI>}.")
            images.append(ref)
            names.append(f"images[{index}].image_url")
    else:
        try:
            form = await request.form(max_files=64, max_fields=256)
        except MultiPartException as exc:
            raise invalid(None, f"Could not parse the multipart body: {exc}", "invalid_body") from None
        fields = {}
        files: list[tuple[str, UploadFile]] = []
        urls: list[str] = []
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            if isinstance(value, UploadFile):
                if name == "image":
                    files.append((key, value))
                elif name == "mask":
                    fields["mask"] = "<file>"
                continue
            if name in ("image_url", "image"):
                urls.append(value)
            else:
                fields[name] = value
        try:  # form fields are text: no NUL (nor, with an odd charset, a surrogate) gets past here either
            jsonsafe.check({**fields, **{"image_url" if len(urls) == 1 else f"image_url[{i}]": url
                                         for i, url in enumerate(urls)}})
        except jsonsafe.BadJson as exc:
            raise invalid(str(exc.path[0]), f"Invalid '{exc.path[0]}': {exc.message}.") from None
        listed = len(files) > 1 or any(key.endswith("[]") for key, _ in files)
        names = [f"image[{i}]" if listed else "image" for i in range(len(files))]
        images = [await upload.read() for _, upload in files]
        names += [f"image_url[{i}]" if len(urls) > 1 else "image_url" for i in range(len(urls))]
        images += urls
        body = json.dumps(fields, sort_keys=True).encode() + b"".join(  # the SDK's retries send the same parts
            hashlib.sha256(i if isinstance(i, bytes) else i.encode()).digest() for i in images)
    extra = _as_list(fields.pop("image_url", None))
    for index, ref in enumerate(extra):
        if not isinstance(ref, str):
            raise invalid("image_url", "'image_url' must be a URL or data URI, or a list of them.")
        images.append(ref)
        names.append(f"image_url[{index}]" if len(extra) > 1 else "image_url")
    references, stored = await _stored_images(request, images, names)
    return await _run(request, fields, references, edit=True, body=body, names=names, stored=stored)


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fluxserve"}


@router.get("/models", summary="List models (OpenAI; the response also carries Replicate's page shape)")
async def list_models(request: Request) -> Response:
    await _authorize(request)
    catalog: Catalog = request.app.state.catalog
    created = int(catalog.source.stat().st_mtime) if catalog.source.exists() else 0
    names = list(catalog.openai_models)
    body: dict[str, Any] = {"object": "list", "data": [_model_object(n, created) for n in names]}
    from fluxserve.api.replicate import models_page

    body.update(models_page(request))  # Replicate's models.list() reads {next, previous, results}
    return JSONResponse(body)


@router.get("/models/{model}", summary="Retrieve a model (OpenAI)")
async def retrieve_model(model: str, request: Request) -> Response:
    await _authorize(request)
    catalog: Catalog = request.app.state.catalog
    if model not in catalog.openai_models:
        raise invalid("model", f"The model '{model}' does not exist.", code="model_not_found", status=404)
    created = int(catalog.source.stat().st_mtime) if catalog.source.exists() else 0
    return JSONResponse(_model_object(model, created))
