"""The gateway: an endpoint's routes tried in order, the request translated for each provider.

A job for an endpoint with a configured upstream route is queued with kind ``upstream`` and taken by gateway
workers (``Worker`` with a ``Gateway`` as its engine: no GPU, several at once). The first route that serves
wins; a connection error, timeout, 429 or 5xx moves on to the next; a 4xx from a provider is the caller's error
and ends the job as a validation error naming the field. The route ``local`` hands the job back to the queue
as an ordinary generation for this server's GPU workers. Outputs are downloaded and stored like local ones,
so URLs, retention and tenancy stay fluxserve's; the provider's logs are relayed to the job's logs.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from fluxserve.catalog import Catalog, EndpointSpec
from fluxserve.jobs.store import utcnow
from fluxserve.request import (
    GeneratedImage,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    InputError,
    Progress,
)
from fluxserve.upstream.errors import UpstreamError
from fluxserve.upstream.fal import FalUpstream
from fluxserve.upstream.replicate import ReplicateUpstream

log = logging.getLogger(__name__)

LOCAL = "local"
UPSTREAM_KIND = "upstream"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")


class RunLocally(Exception):
    """The next route is this server's own GPUs: the job goes back to the queue as a generation."""


class Gateway:
    """The engine of gateway workers. ``upstreams``: provider name -> client (``FalUpstream``)."""

    gpu = False  # no device behind it: workers sharing it do not take turns, and record no GPU seconds

    def __init__(self, catalog: Catalog, upstreams: dict[str, Any], store: Any = None):
        self.catalog = catalog
        self.upstreams = upstreams
        self.store = store  # where each call to a provider is recorded (JobStore.record_upstream_call)
        self.health = Health()

    def routes(self, endpoint_id: str) -> list[str]:
        """The endpoint's routes that can be taken here: those of configured providers, and ``local``."""
        spec = self.catalog.endpoints.get(endpoint_id)
        if spec is None:
            return []
        return [route for route in spec.routes if route == LOCAL or route.partition(":")[0] in self.upstreams]

    def kind_for(self, endpoint_id: str) -> str | None:
        """``upstream`` for an endpoint whose first usable route is a provider (the store's job kind)."""
        routes = self.routes(endpoint_id)
        return UPSTREAM_KIND if routes and routes[0] != LOCAL else None

    def run_job(self, job: Any, request: GenerationRequest, on_progress: Callable[[Progress], None],
                should_cancel: Callable[[], bool]) -> GenerationResult:
        spec = self.catalog.endpoint(job.endpoint)
        tried: list[str] = []
        routes = self.routes(job.endpoint)
        # A provider that failed recently is skipped while it cools down, unless no other route is left.
        usable = [route for route in routes if route == LOCAL or self.health.ok(route.partition(":")[0])]
        if not any(route != LOCAL for route in usable) and LOCAL not in routes:
            usable = routes
        for route in routes:
            if route == LOCAL:
                on_progress(Progress(step=0, total=0, message=_fell_back(tried, "this server's GPUs")))
                raise RunLocally(job.endpoint)
            provider, _, target = route.partition(":")
            if route not in usable:
                on_progress(Progress(step=0, total=0, message=f"{provider} skipped: {self.health.why(provider)}"))
                tried.append(provider)
                continue
            on_progress(Progress(step=0, total=0, message=f"routing to {provider} ({target})"))
            started, answered = utcnow(), []
            try:
                result = self._run_route(provider, target, spec, job, request, on_progress, should_cancel,
                                         answered)
            except UpstreamError as exc:
                self._record(job, provider, target, started, answered, "failed" if exc.retryable else "refused",
                             exc.message)
                if not exc.retryable:
                    raise InputError(exc.field or "request", exc.message) from None
                self.health.failed(provider, exc.message)
                log.warning("route %s of %s failed: %s", route, job.endpoint, exc.message)
                on_progress(Progress(step=0, total=0, message=f"{provider} failed: {exc.message}"))
                tried.append(provider)
                continue
            except GenerationCancelled:
                self._record(job, provider, target, started, answered, "cancelled")
                raise
            self._record(job, provider, target, started, answered, "served")
            self.health.served(provider)
            return result
        raise UpstreamError(f"every route of {job.endpoint} failed ({', '.join(tried) or 'none configured'})",
                            retryable=False)

    def _record(self, job: Any, provider: str, target: str, started: datetime, answered: list[datetime],
                outcome: str, error: str | None = None) -> None:
        if self.store is None:
            return
        try:
            self.store.record_upstream_call(job.id, job.owner, job.endpoint, provider, target, started,
                                            answered[-1] if answered else None, utcnow(), outcome, error)
        except Exception:
            log.exception("could not record the call of job %s to %s", job.id, provider)

    def _run_route(self, provider: str, target: str, spec: EndpointSpec, job: Any, request: GenerationRequest,
                   on_progress: Callable[[Progress], None], should_cancel: Callable[[], bool],
                   answered: list[datetime]) -> GenerationResult:
        upstream = self.upstreams[provider]
        if provider == "fal":
            arguments = fal_arguments(spec, request, _caller_fields(job, "fal"))
        else:
            arguments = replicate_arguments(target, request, _caller_fields(job, "replicate"))

        progress = [0, 0]  # the provider's "step n/N" lines drive this job's progress too

        def relay(message: str) -> None:
            if step := STEP_LINE.search(message):
                progress[:] = [int(step[1]), int(step[2])]
            on_progress(Progress(step=progress[0], total=progress[1], message=f"{provider}: {message}"))

        # A provider endpoint without num_images ([pro], [max], Replicate's models) makes one image a call: n
        # is emulated with that many calls at once, seeds seed, seed + 1, ...
        calls = 1 if "num_images" in arguments else request.num_images

        def call(index: int) -> tuple[dict, list[GeneratedImage]]:
            own = dict(arguments)
            if calls > 1 and request.seed is not None:
                own["seed"] = request.seed + index
            output = upstream.run(target, own, on_log=relay, should_cancel=should_cancel)
            answered.append(utcnow())
            nsfw = output.get("has_nsfw_concepts") or []
            return output, [self._fetched(upstream, image, request.output_format,
                                          bool(nsfw[i]) if i < len(nsfw) else False)
                            for i, image in enumerate(output.get("images") or [])]

        if calls == 1:
            results = [call(0)]
        else:
            with ThreadPoolExecutor(max_workers=calls, thread_name_prefix="gateway-n") as pool:
                results = list(pool.map(call, range(calls)))
        images = [image for _, produced in results for image in produced]
        if not images:
            raise UpstreamError(f"{provider} returned no images", retryable=True)
        seed = results[0][0].get("seed", request.seed)
        return GenerationResult(images=images, seed=int(seed or 0), prompt=request.prompt, timings={},
                                reference_sizes=[], served_by=provider)

    def _fetched(self, upstream: Any, image: dict, output_format: str, nsfw: bool) -> GeneratedImage:
        url = str(image.get("url") or "")
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            data, content_type = base64.b64decode(payload), header[5:].split(";")[0]
        else:
            data, content_type = upstream.fetch(url)
        data, content_type, size = _in_format(data, content_type, output_format)
        return GeneratedImage(data=data, width=size[0], height=size[1], content_type=content_type, nsfw=nsfw)


class Health:
    """Which providers failed recently (in this process). After a failure (a connection error, timeout, 429 or
    5xx) a provider is skipped for ``base_s``, doubling with each further failure up to ``max_s``; the first
    request after that tries it again, and one that it serves clears the record."""

    def __init__(self, base_s: float = 15.0, max_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.base_s, self.max_s, self.clock = base_s, max_s, clock
        self._lock = threading.Lock()
        self._down: dict[str, tuple[float, int, str]] = {}  # provider -> (until, failures in a row, last error)

    def ok(self, provider: str) -> bool:
        with self._lock:
            record = self._down.get(provider)
            return record is None or self.clock() >= record[0]

    def why(self, provider: str) -> str:
        with self._lock:
            until, failures, error = self._down.get(provider, (0.0, 0, ""))
        wait = max(0.0, until - self.clock())
        return f"failed {failures} time(s) in a row, tried again in {wait:.0f} s (last: {error})"

    def failed(self, provider: str, error: str) -> None:
        with self._lock:
            _, failures, _ = self._down.get(provider, (0.0, 0, ""))
            failures += 1
            self._down[provider] = (self.clock() + min(self.max_s, self.base_s * 2 ** (failures - 1)), failures,
                                    error[:300])

    def served(self, provider: str) -> None:
        with self._lock:
            self._down.pop(provider, None)


def local_note(catalog: Catalog, job: Any) -> str | None:
    """The log line a routed endpoint's job gets when this server's GPUs serve it: which weights ran."""
    spec = catalog.endpoints.get(job.endpoint)
    if spec is None or not spec.routes or job.kind != "generate":
        return None
    return (f"served on this server's GPUs by the open FLUX.2 [dev] weights with {spec.id}'s preset: its own model "
            "is reached only through an upstream provider (docs/gateway.md)")


def _caller_fields(job: Any, provider: str) -> dict | None:
    """The caller's own fields to pass through: all of them when the caller spoke the provider's dialect, the
    ones the OpenAI dialect does not read for an OpenAI caller, none across fal and Replicate."""
    raw = job.input if isinstance(job.input, dict) else {}
    if job.dialect == provider:
        return raw
    if job.dialect == "openai":
        from fluxserve.api.openai import provider_fields

        return provider_fields(raw)
    return None


def _fell_back(tried: list[str], where: str) -> str:
    return f"no provider served it ({', '.join(tried)} failed): running on {where}" if tried else \
        f"running on {where}"


def _in_format(data: bytes, content_type: str, output_format: str) -> tuple[bytes, str, tuple[int, int]]:
    """The image in the caller's format (converted when the provider answered in another) and its size."""
    want = CONTENT_TYPES.get(output_format, "image/png")
    with Image.open(io.BytesIO(data)) as decoded:
        size = decoded.size
        actual = Image.MIME.get(decoded.format or "", content_type)
        if actual == want:
            return data, want, size
        out = io.BytesIO()
        picture = decoded.convert("RGB") if output_format == "jpeg" else decoded.copy()
        picture.save(out, format={"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}[want])
    return out.getvalue(), want, size


def fal_arguments(spec: EndpointSpec, request: GenerationRequest, caller_input: dict | None) -> dict[str, Any]:
    """The fal input for ``spec``'s schema family from the canonical request; a fal caller's own fields that
    fluxserve does not know pass through unchanged."""
    from fluxserve.api.fal_schemas import input_model

    known = set(input_model(spec).model_fields)
    arguments: dict[str, Any] = dict(caller_input or {})
    canonical: dict[str, Any] = {
        "prompt": request.prompt,
        "seed": request.seed,
        "output_format": request.output_format if request.output_format in ("jpeg", "png") else "png",
        "enable_safety_checker": request.safety_checker,
        "safety_tolerance": str(request.safety_tolerance),
        "guidance_scale": request.guidance,
        "num_inference_steps": request.steps,
        "enable_prompt_expansion": request.expand_prompt,
        "num_images": request.num_images,
    }
    if request.width and request.height:
        canonical["image_size"] = {"width": request.width, "height": request.height}
    if spec.is_edit:
        canonical["image_urls"] = [_as_url(url) for url in request.image_urls]
    for name, value in canonical.items():
        if name in known and value is not None:
            arguments[name] = value
        elif name not in known:
            arguments.pop(name, None)
    arguments.pop("sync_mode", None)  # outputs are fetched and stored here either way
    return arguments


def replicate_arguments(model: str, request: GenerationRequest, caller_input: dict | None) -> dict[str, Any]:
    """Replicate's input for ``model`` (``owner/name``) from the canonical request; a Replicate caller's own
    fields that fluxserve does not know pass through unchanged."""
    arguments: dict[str, Any] = {k: v for k, v in (caller_input or {}).items() if not k.startswith("__")}
    for alias in ("input_image", "num_inference_steps"):  # seed 003's names: the canonical ones are sent
        arguments.pop(alias, None)
    arguments.update({
        "prompt": request.prompt,
        "output_format": {"jpeg": "jpg"}.get(request.output_format, request.output_format),
        "safety_tolerance": request.safety_tolerance,
        "disable_safety_checker": not request.safety_checker,
    })
    if request.seed is not None:
        arguments["seed"] = request.seed
    if request.output_quality is not None:
        arguments["output_quality"] = request.output_quality
    if request.image_urls:
        arguments["input_images"] = [_as_url(url) for url in request.image_urls]
    if request.width and request.height:
        arguments.update(aspect_ratio="custom", width=request.width, height=request.height)
        arguments.pop("resolution", None)
    family = model.rsplit("/", 1)[-1]
    if family in ("flux-2-dev", "flux-2-flex"):
        arguments.update(steps=request.steps, guidance=request.guidance)
    if family == "flux-2-flex":
        arguments["prompt_upsampling"] = request.expand_prompt
    return arguments


def _as_url(reference: str) -> str:
    """A reference a provider can read: URLs as they are, this server's own files (resolved to local paths) as
    data URIs."""
    from fluxserve.api.common import data_uri, is_url_or_data_uri
    from fluxserve.inputs import image_type

    if is_url_or_data_uri(reference):
        return reference
    data = Path(reference).read_bytes()
    return data_uri(data, image_type(data) or "image/png")


def open_upstreams(specs: dict[str, str], keys: dict[str, str | None]) -> dict[str, Any]:
    """Clients for ``--upstream NAME=URL`` entries (``keys``: the provider's key from the environment)."""
    kinds = {"fal": FalUpstream, "replicate": ReplicateUpstream}
    clients: dict[str, Any] = {}
    for name, url in specs.items():
        if name not in kinds:
            raise ValueError(f"--upstream {name}={url}: the providers are {', '.join(kinds)}")
        clients[name] = kinds[name](url, keys.get(name))
    return clients
