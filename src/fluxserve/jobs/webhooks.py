"""Webhook delivery: in the background, with retries and exponential backoff, surviving restarts.

When a job with a ``webhook`` becomes terminal, the store queues a delivery row in the same transaction, so
nothing is lost if the process dies. A ``WebhookSender`` (one per API process) takes due deliveries, builds the
payload on the first attempt with the builder its dialect registered, POSTs it as JSON and retries failures
(non-2xx or transport errors) with backoff ``base_delay * 2**(attempt-1)`` capped at ``max_delay``.

Dialects register a builder: ``register_payload_builder("fal", fn)`` where ``fn(job) -> (url, json_body)``, or
None to send nothing. The dialect name is ``job.webhook["dialect"]`` (else ``job.dialect``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx

from fluxserve import fetch
from fluxserve.jobs.store import Delivery, Job, JobStore, utcnow

log = logging.getLogger(__name__)

PayloadBuilder = Callable[[Job], "tuple[str, Any] | None"]
_builders: dict[str, PayloadBuilder] = {}


def register_payload_builder(dialect: str, builder: PayloadBuilder) -> None:
    _builders[dialect] = builder


def payload_builders() -> dict[str, PayloadBuilder]:
    return dict(_builders)


class WebhookSender:
    """Delivers pending webhooks from a thread pool. ``notify`` (usable as a worker's ``on_finished``) wakes it
    at once; otherwise it looks for due deliveries every ``poll_s`` seconds."""

    def __init__(self, store: JobStore, *, max_attempts: int = 10, base_delay: float = 1.0,
                 max_delay: float = 600.0, timeout: float = 15.0, concurrency: int = 4, poll_s: float = 1.0,
                 builders: dict[str, PayloadBuilder] | None = None):
        self.store = store
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_s = poll_s
        self._builders = builders
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = fetch.webhook_client(timeout)  # internal addresses refused
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="webhook")
        store.add_terminal_listener(lambda _job_id: self._wake.set())

    @property
    def builders(self) -> dict[str, PayloadBuilder]:
        return self._builders if self._builders is not None else _builders

    def notify(self, job: Job | None = None) -> None:
        self._wake.set()

    def start(self) -> WebhookSender:
        """Start the background thread (again after ``stop``, if need be)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        if self._client.is_closed:
            self._client = fetch.webhook_client(self.timeout)
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                deliveries = self.store.claim_deliveries(list(self.builders), limit=self.concurrency,
                                                         lease_s=self.timeout + 30)
                futures = [self._pool.submit(self.deliver, d) for d in deliveries]
                for future in futures:
                    future.result()
                if len(deliveries) == self.concurrency:
                    continue
                wait = self.poll_s
                due = self.store.next_delivery_due(list(self.builders))
                if due is not None:
                    wait = max(0.0, min(wait, (due - utcnow()).total_seconds()))
            except Exception:
                log.exception("webhook sender: database error; retrying")
                wait = self.poll_s
            self._wake.wait(wait)

    def deliver_due(self) -> int:
        """One pass in the calling thread (for tools and tests): deliver what is due; returns how many."""
        deliveries = self.store.claim_deliveries(list(self.builders), limit=100, lease_s=self.timeout + 30)
        for delivery in deliveries:
            self.deliver(delivery)
        return len(deliveries)

    def deliver(self, delivery: Delivery) -> bool:
        """One attempt; records the outcome (and the next attempt's time) in the store."""
        url, body = delivery.url, delivery.body
        if url is None:
            job = self.store.get(delivery.job_id)
            builder = self.builders.get(delivery.dialect)
            built = builder(job) if job is not None and builder is not None else None
            if built is None:
                self.store.update_delivery(delivery.id, status="skipped")
                return False
            url, body = built
            self.store.update_delivery(delivery.id, url=url, body=body)
        attempts = delivery.attempts + 1
        status_code = None
        try:
            response = self._client.post(url, json=body, headers={"User-Agent": "fluxserve-webhook"})
            status_code = response.status_code
            error = None if response.is_success else f"HTTP {status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        now = utcnow()
        if error is None:
            self.store.update_delivery(delivery.id, status="delivered", attempts=attempts, delivered_at=now,
                                       last_status_code=status_code, last_error=None)
            return True
        if attempts >= self.max_attempts:
            log.warning("webhook for job %s failed %d times; giving up: %s", delivery.job_id, attempts, error)
            self.store.update_delivery(delivery.id, status="failed", attempts=attempts, last_error=error,
                                       last_status_code=status_code)
            return False
        delay = min(self.max_delay, self.base_delay * 2 ** (attempts - 1))
        self.store.update_delivery(delivery.id, attempts=attempts, last_error=error, last_status_code=status_code,
                                   next_attempt_at=now + timedelta(seconds=delay))
        return False
