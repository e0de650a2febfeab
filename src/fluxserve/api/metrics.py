"""Prometheus metrics: jobs by status and endpoint, queue depth, inference time and queue wait."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from fluxserve.api.auth import require_admin

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

router = APIRouter(tags=["operations"])


class _StoreCollector:
    """Read at scrape time from the job store (shared by every replica): jobs per status, queue depth."""

    def __init__(self, store: Any):
        self.store = store

    def collect(self):
        counts = self.store.counts()
        jobs = GaugeMetricFamily("fluxserve_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("fluxserve_queue_depth", "Jobs waiting to run", value=counts.get("queued", 0))
        yield GaugeMetricFamily("fluxserve_running_jobs", "Jobs running now", value=counts.get("running", 0))


class Metrics:
    """One registry per app (so several apps in one process do not collide)."""

    def __init__(self, store: Any):
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.submitted_total = Counter("fluxserve_jobs_submitted", "Jobs accepted by this API process",
                                       ["endpoint"], registry=self.registry)
        self.finished_total = Counter("fluxserve_jobs_finished", "Jobs finished by this process's workers",
                                      ["endpoint", "status"], registry=self.registry)
        self.inference_seconds = Histogram("fluxserve_inference_seconds", "Time from start to end of a job",
                                           ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram("fluxserve_queue_wait_seconds", "Time a job waited in the queue",
                                            ["endpoint"], buckets=BUCKETS, registry=self.registry)

    def submitted(self, endpoint: str) -> None:
        self.submitted_total.labels(endpoint).inc()

    def finished(self, job: Any) -> None:
        self.finished_total.labels(job.endpoint, job.status).inc()
        if job.started_at and job.created_at:
            self.queue_wait_seconds.labels(job.endpoint).observe(
                max(0.0, (job.started_at - job.created_at).total_seconds()))
        if job.started_at and job.completed_at:
            self.inference_seconds.labels(job.endpoint).observe(
                max(0.0, (job.completed_at - job.started_at).total_seconds()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@router.get("/metrics", summary="Prometheus metrics (needs an admin key when keys are required)",
            dependencies=[Depends(require_admin("fal"))])
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
