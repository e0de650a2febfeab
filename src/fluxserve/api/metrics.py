"""Prometheus metrics: jobs by status, endpoint and dialect, queue depth, generation time, queue wait and time to
first byte (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from fluxserve.api.auth import require_admin
from fluxserve.jobs.stats import time_to_first_byte

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
    """One registry per app (so several apps in one process do not collide). Jobs are observed when this
    process's workers finish them, labelled by endpoint and dialect; an endpoint outside ``endpoints`` (the
    catalogue's ids) is labelled ``other``, so the label sets stay bounded."""

    def __init__(self, store: Any, endpoints: Iterable[str] | None = None):
        """``store`` None: no store gauges (a worker process's metrics; the API replicas report the queue)."""
        self.registry = CollectorRegistry()
        if store is not None:
            self.registry.register(_StoreCollector(store))
        self.endpoints = frozenset(endpoints) if endpoints is not None else None
        self.submitted_total = Counter("fluxserve_jobs_submitted", "Jobs accepted by this API process",
                                       ["endpoint"], registry=self.registry)
        self.finished_total = Counter("fluxserve_jobs_finished", "Jobs finished by this process's workers",
                                      ["endpoint", "dialect", "status"], registry=self.registry)
        self.inference_seconds = Histogram("fluxserve_inference_seconds",
                                           "Generation time: from start to end of a completed job",
                                           ["endpoint", "dialect"], buckets=BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram("fluxserve_queue_wait_seconds", "Time a job waited in the queue",
                                            ["endpoint", "dialect"], buckets=BUCKETS, registry=self.registry)
        self.first_byte_seconds = Histogram(
            "fluxserve_time_to_first_byte_seconds",
            "From submit to the first progress event (queued calls) or to the response (synchronous calls)",
            ["endpoint", "dialect"], buckets=BUCKETS, registry=self.registry)

    def _endpoint(self, endpoint: str) -> str:
        return endpoint if self.endpoints is None or endpoint in self.endpoints else "other"

    def submitted(self, endpoint: str) -> None:
        self.submitted_total.labels(self._endpoint(endpoint)).inc()

    def finished(self, job: Any) -> None:
        labels = (self._endpoint(job.endpoint), job.dialect)
        self.finished_total.labels(*labels, job.status).inc()
        if job.started_at and job.created_at:
            self.queue_wait_seconds.labels(*labels).observe(
                max(0.0, (job.started_at - job.created_at).total_seconds()))
        if job.status == "completed" and job.started_at and job.completed_at:
            self.inference_seconds.labels(*labels).observe(
                max(0.0, (job.completed_at - job.started_at).total_seconds()))
        first_byte = time_to_first_byte(job)
        if first_byte is not None:
            self.first_byte_seconds.labels(*labels).observe(first_byte)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@router.get("/metrics", summary="Prometheus metrics (needs an admin key when keys are required)",
            dependencies=[Depends(require_admin("fal"))])
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
