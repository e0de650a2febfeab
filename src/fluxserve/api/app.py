"""The FastAPI application: job store, storage, catalogue, engine, workers and webhook sender, wired once.

``create_app(settings)`` builds everything; the lifespan starts and stops the workers and the webhook sender.
Routers: the fal dialect (``api/fal.py``), files and uploads, health and metrics, and the OpenAI and Replicate
dialects. fal's catch-all routes (``POST /{endpoint}``) are included last.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from fluxserve import fetch
from fluxserve.api import fal, fal_platform, file_urls, files, metrics, stats, web
from fluxserve.api import health as probes
from fluxserve.api import openai as openai_api
from fluxserve.api import replicate as replicate_api
from fluxserve.api import usage as usage_api
from fluxserve.api.auth import KeyChecker, check_request
from fluxserve.api.bodies import JsonValueLimit
from fluxserve.api.errors import ApiError, FalValidationError, api_error_handler, fal_validation_handler
from fluxserve.api.framing import NoFraming
from fluxserve.api.limits import MIB, BodyLimitMiddleware
from fluxserve.api.waits import JobWaits
from fluxserve.catalog import Catalog
from fluxserve.config import Settings

log = logging.getLogger("fluxserve.api")


class RequestIdMiddleware:
    """Every answer carries ``x-fal-request-id`` (the job id where a route set one, else a fresh id)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if not any(name.lower() == b"x-fal-request-id" for name, _ in headers):
                    headers.append((b"x-fal-request-id", str(uuid.uuid4()).encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


@functools.cache
def favicon_png() -> bytes:
    """The site icon: a light triangle on a dark square, 32x32."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (32, 32), (17, 24, 39, 255))
    ImageDraw.Draw(image).polygon([(5, 27), (16, 5), (27, 27)], fill=(250, 204, 21, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def open_gateway(settings: Settings, catalog: Catalog):
    """The gateway over the configured upstreams, or None without any (every endpoint runs locally)."""
    from fluxserve.upstream.gateway import Gateway, open_upstreams

    upstreams = settings.upstreams
    if not upstreams:
        return None
    return Gateway(catalog, open_upstreams(upstreams, {name: settings.upstream_key(name) for name in upstreams}))


def create_app(settings: Settings, *, start_workers: bool = True) -> FastAPI:
    from fluxserve.engine import engines_for
    from fluxserve.jobs.identity import ProcessSlot
    from fluxserve.jobs.retention import RetentionSweeper
    from fluxserve.jobs.store import JobStore
    from fluxserve.jobs.webhooks import WebhookSender, payload_builders, register_payload_builder
    from fluxserve.jobs.worker import Worker
    from fluxserve.storage import open_storage
    from fluxserve.upstream.gateway import local_note

    fetch.configure(fetch.FetchPolicy.from_settings(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.load(settings.catalog or None)
    store = JobStore(settings.db_url)
    storage = open_storage(settings.storage_location)
    engines = engines_for(settings, catalog)
    app_metrics = metrics.Metrics(store, catalog.endpoints)
    register_payload_builder(fal.DIALECT, partial(fal.webhook_payload, catalog, storage))
    # this app's own builders: they read this app's store and storage (several apps may share a process)
    webhooks = WebhookSender(store, concurrency=settings.webhook_concurrency,
                             per_key=settings.webhook_concurrency_per_key, builders=payload_builders() | {
        fal.DIALECT: partial(fal.webhook_payload, catalog, storage),
        "replicate": partial(replicate_api.build_webhook, store=store)})
    retention = RetentionSweeper(store, storage, settings.retention_hours) if settings.retention_hours > 0 else None

    def on_finished(job) -> None:
        app_metrics.finished(job)
        webhooks.notify(job)

    # this process's slot on the machine: its jobs are recovered at once if it is killed and started again
    slot = ProcessSlot.acquire(settings.data_dir, "serve")
    per_device = max(1, settings.workers_per_device) if start_workers else 0
    gateway = open_gateway(settings, catalog)
    gateway_workers = max(1, settings.gateway_workers) if gateway is not None and start_workers else 0
    worker_ids = iter(slot.auto_worker_ids(per_device * len(engines) + gateway_workers))
    local_kinds = ["generate", "train"] if gateway is not None else None  # upstream jobs are the gateway's
    workers = [
        Worker(store, engine, storage, worker_id=next(worker_ids), on_finished=on_finished, kinds=local_kinds,
               note=partial(local_note, catalog))
        for engine in engines
        for _ in range(per_device)
    ] + [
        Worker(store, gateway, storage, worker_id=next(worker_ids), on_finished=on_finished, kinds=["upstream"])
        for _ in range(gateway_workers)
    ]
    if gateway is not None:
        store.endpoint_kind, gateway.store = gateway.kind_for, store

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        slot.start(store, [worker.worker_id for worker in workers])
        for worker in workers:
            worker.start()
        webhooks.start()
        if retention is not None:
            retention.start()
        try:
            yield
        finally:
            if retention is not None:
                retention.stop()
            for worker in workers:
                worker.stop()
            webhooks.stop()
            slot.close()

    # the documentation pages (/docs, /redoc) with their scripts served here: they work offline
    app = FastAPIOffline(
        static_url="/static-docs",
        favicon_url="/favicon.ico",
        title="fluxserve",
        version="0.1.0",
        description="Self-hosted FLUX.2: the fal, OpenAI Images and Replicate APIs on your own GPUs. "
        "Per-endpoint fal documents: /api/openapi/queue/openapi.json?endpoint_id=fal-ai/flux-2",
        lifespan=lifespan,
    )
    app.state.settings, app.state.catalog, app.state.store = settings, catalog, store
    app.state.storage, app.state.engines, app.state.workers = storage, engines, workers
    app.state.metrics, app.state.webhooks = app_metrics, webhooks
    app.state.process_id = slot.process_id  # recorded as the caller of synchronous requests
    app.state.auth = KeyChecker(store)
    app.state.waits = JobWaits(store)  # synchronous callers wait for their jobs without holding a thread
    store.max_queued = settings.max_queued or None
    store.max_queued_per_owner = settings.max_queued_per_key or None
    app.state.signer = files.Signer(store.secret("upload-tokens"))  # shared by replicas and restarts
    file_urls.configure(store.secret("file-urls"), settings.file_url_hours * 3600)
    app.state.store_inline = store.is_sqlite  # SQLite reads are fast enough to run on the event loop

    app.add_middleware(JsonValueLimit, max_values=settings.max_json_values)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_mb * MIB)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(fal.StatusFastPath)  # status polls skip routing and the middleware stack
    app.add_middleware(NoFraming)  # outermost: no answer may be framed by another site
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(FalValidationError, fal_validation_handler)

    @app.get("/health", tags=["operations"], summary="Liveness; with an admin key, placement and queue depth")
    async def health(request: Request) -> JSONResponse:
        try:
            identity = await check_request(request, "fal")
        except ApiError:  # liveness for probes without a key
            return JSONResponse({"status": "ok"})
        if not identity.sees_all:  # the placement and the queue are for operators (admin keys)
            return JSONResponse({"status": "ok"})
        counts = await asyncio.to_thread(store.counts)
        return JSONResponse({
            "status": "ok",
            "demo": settings.demo,
            "workers": len(workers),
            "queue_depth": counts.get("queued", 0),
            "jobs": counts,
            "placement": [engine.placement() for engine in engines],
        })

    @app.get(settings.webhook_jwks_path, tags=["webhooks"],
             summary="Public keys that verify fal-dialect webhook signatures (JWKS)")
    def webhook_jwks() -> JSONResponse:
        """fal-dialect webhooks are signed with this ED25519 key; receivers fetch it as they fetch fal's."""
        return JSONResponse(webhooks.keys.fal_jwks(), headers={"Cache-Control": "max-age=3600"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(favicon_png(), media_type="image/png", headers={"Cache-Control": "public, max-age=86400"})

    app.include_router(probes.router)  # /health/live, /health/ready
    app.include_router(metrics.router)
    app.include_router(files.router)
    app.include_router(fal.docs_router)
    app.include_router(fal.router)
    app.include_router(fal_platform.router)  # before Replicate's /v1/models/{owner}/{name}
    # ---- other dialects (OpenAI, Replicate) go here, before fal's catch-all routes ----
    app.include_router(openai_api.router)
    app.include_router(replicate_api.router)
    # ------------------------------------------------------------------------------------
    app.include_router(web.router)  # the playground: GET /, /playground, /web/*, /api/history
    app.include_router(usage_api.router)  # GET /api/usage
    app.include_router(stats.router)  # GET /api/stats and its page, /stats
    app.include_router(fal.root_router)  # must stay last: POST /{endpoint_id:path}
    return app
