"""Webhook delivery: in the background, with retries and exponential backoff, surviving restarts.

When a job with a ``webhook`` becomes terminal, the store queues a delivery row in the same transaction, so
nothing is lost if the process dies. A ``WebhookSender`` (one per API process) takes due deliveries, builds the
payload on the first attempt with the builder its dialect registered, POSTs it as JSON and retries failures
(non-2xx or transport errors) with backoff ``base_delay * 2**(attempt-1)`` capped at ``max_delay``.

Dialects register a builder: ``register_payload_builder("fal", fn)`` where ``fn(job) -> (url, json_body)``, or
None to send nothing. The dialect name is ``job.webhook["dialect"]`` (else ``job.dialect``).

Event webhooks (Replicate's ``start`` and ``logs``) go through the same retries; a job's events go out in
order, and its terminal webhook waits until they are done. ``start`` is queued with its body
(``JobStore.queue_webhook_event``); ``logs`` is queued by the store whenever the running job writes log lines,
without a body, and the sender that first delivers it builds the body from the job as it is then, with the
builder its dialect registered (``register_event_builder``). So the events keep coming whichever worker runs
the job and whichever API process is alive: none depends on the process that accepted the request.

Deliveries are signed as the services that a dialect imitates sign theirs, so receivers written for those
services verify them unchanged:

- fal: ED25519 over ``"{request_id}\n{user_id}\n{timestamp}\n{sha256_hex(body)}"``, hex in
  ``X-Fal-Webhook-Signature``, with ``X-Fal-Webhook-Request-Id``, ``-User-Id`` and ``-Timestamp`` (Unix seconds);
  the public key is served as a JWKS (``fal_jwks``). The user id is the API key that made the request (its id,
  ``key_...``; ``fluxserve`` without keys): one key signs for every tenant, as fal's does for every account, and
  the signed user id tells a receiver whose delivery it is.
- Replicate: Standard Webhooks: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
  (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``) with the ``whsec_`` secret of the API key that made
  the prediction, which ``GET /v1/webhooks/default/secret`` returns to that key (as Replicate has one per
  account): a symmetric secret shared by tenants would let each forge the others' deliveries.

The keys are generated on first use and kept in the job store, so restarts and API replicas sign alike.
``cryptography`` (the ED25519 key) is imported then too: a server that never signs a fal webhook runs without it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx

from fluxserve import fetch
from fluxserve.jobs.store import Delivery, EventDelivery, Job, JobStore, utcnow

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

PayloadBuilder = Callable[[Job], "tuple[str, Any] | None"]
EventBuilder = Callable[[Job, str, JobStore], Any]
_builders: dict[str, PayloadBuilder] = {}
_event_builders: dict[str, EventBuilder] = {}


def register_payload_builder(dialect: str, builder: PayloadBuilder) -> None:
    _builders[dialect] = builder


def register_event_builder(dialect: str, builder: EventBuilder) -> None:
    """``builder(job, event, store) -> body`` (None: send nothing) for the events the store queues without a
    body (``logs``, as a job logs)."""
    _event_builders[dialect] = builder


def payload_builders() -> dict[str, PayloadBuilder]:
    return dict(_builders)


# ---- signing ---------------------------------------------------------------------------------------------
FAL_KEY = "fal_ed25519"
REPLICATE_KEY = "replicate_whsec"
# the X-Fal-Webhook-User-Id of a request made without keys (fal sends the account's user id; with keys, the key's)
FAL_USER_ID = "fluxserve"
# how far a delivery's timestamp may be from the receiver's clock in the verifiers both services document
TIMESTAMP_TOLERANCE_S = 300


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class WebhookKeys:
    """The signing keys kept in a job store, read (or generated) on first use and cached by this process."""

    def __init__(self, store: JobStore):
        self.store = store
        self._fal: Ed25519PrivateKey | None = None
        self._replicate: dict[str | None, str] = {}  # API key id (None: no keys) -> its secret
        self._lock = threading.Lock()

    def fal_private_key(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # only where signing

        with self._lock:
            if self._fal is None:
                stored = self.store.webhook_key(FAL_KEY, lambda: base64.b64encode(
                    Ed25519PrivateKey.generate().private_bytes_raw()).decode())
                self._fal = Ed25519PrivateKey.from_private_bytes(base64.b64decode(stored))
            return self._fal

    def replicate_secret(self, owner: str | None = None) -> str:
        """The Standard Webhooks secret of API key ``owner`` (None: the server's, for requests made without
        keys): ``whsec_`` followed by 32 random bytes in base64, made on first use. No two keys share one."""
        with self._lock:
            if owner not in self._replicate:
                name = REPLICATE_KEY if owner is None else f"{REPLICATE_KEY}:{owner}"
                self._replicate[owner] = self.store.webhook_key(
                    name, lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
            return self._replicate[owner]

    def fal_jwks(self) -> dict[str, Any]:
        """The public key as a JSON Web Key Set (RFC 7517/8037), as fal serves its webhook keys."""
        x = _b64url(self.fal_private_key().public_key().public_bytes_raw())
        thumbprint = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
        kid = _b64url(hashlib.sha256(thumbprint.encode()).digest())  # RFC 7638
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}]}


def fal_signature_headers(key: Ed25519PrivateKey, request_id: str, user_id: str, body: bytes,
                          timestamp: int | None = None) -> dict[str, str]:
    """fal's webhook headers for ``body``."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    message = "\n".join((request_id, user_id, ts, hashlib.sha256(body).hexdigest())).encode()
    return {"X-Fal-Webhook-Request-Id": request_id, "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": ts, "X-Fal-Webhook-Signature": key.sign(message).hex()}


def standard_signature_headers(secret: str, message_id: str, body: bytes,
                               timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers for ``body`` (the scheme Replicate uses)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    raw_key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(raw_key, f"{message_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": message_id, "webhook-timestamp": ts,
            "webhook-signature": "v1," + base64.b64encode(digest).decode()}


# a dialect's signer: (keys, job id, the job's owner (API key id or None), message id, body bytes) -> headers
Signer = Callable[[WebhookKeys, str, "str | None", str, bytes], dict[str, str]]
SIGNERS: dict[str, Signer] = {
    "fal": lambda keys, job_id, owner, _message_id, body: fal_signature_headers(
        keys.fal_private_key(), job_id, owner or FAL_USER_ID, body),
    "replicate": lambda keys, _job_id, owner, message_id, body: standard_signature_headers(
        keys.replicate_secret(owner), message_id, body),
}


class WebhookSender:
    """Delivers pending webhooks from a thread pool. ``notify`` (usable as a worker's ``on_finished``) wakes it
    at once; otherwise it looks for due deliveries every ``poll_s`` seconds."""

    def __init__(self, store: JobStore, *, max_attempts: int = 10, base_delay: float = 1.0,
                 max_delay: float = 600.0, timeout: float = 15.0, concurrency: int = 4, poll_s: float = 1.0,
                 builders: dict[str, PayloadBuilder] | None = None, keys: WebhookKeys | None = None,
                 signers: dict[str, Signer] | None = None):
        self.store = store
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.keys = keys or WebhookKeys(store)
        self.signers = SIGNERS if signers is None else signers
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

    def _claim(self, limit: int) -> list[Delivery | EventDelivery]:
        dialects, lease_s = list(self.builders), self.timeout + 30
        events: list[Delivery | EventDelivery] = list(self.store.claim_webhook_events(dialects, limit, lease_s))
        return events + list(self.store.claim_deliveries(dialects, limit=limit, lease_s=lease_s))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                deliveries = self._claim(self.concurrency)
                futures = [self._pool.submit(self.deliver, d) for d in deliveries]
                for future in futures:
                    future.result()
                if len(deliveries) >= self.concurrency:
                    continue
                wait = self.poll_s
                dialects = list(self.builders)
                for due in (self.store.next_delivery_due(dialects), self.store.next_webhook_event_due(dialects)):
                    if due is not None:
                        wait = max(0.0, min(wait, (due - utcnow()).total_seconds()))
            except Exception:
                log.exception("webhook sender: database error; retrying")
                wait = self.poll_s
            self._wake.wait(wait)

    def deliver_due(self) -> int:
        """One pass in the calling thread (for tools and tests): deliver what is due; returns how many."""
        deliveries = self._claim(100)
        for delivery in deliveries:
            self.deliver(delivery)
        return len(deliveries)

    def deliver(self, delivery: Delivery | EventDelivery) -> bool:
        """One attempt; records the outcome (and the next attempt's time) in the store."""
        if isinstance(delivery, EventDelivery):
            return self._deliver_event(delivery)
        events_due = self.store.pending_webhook_event_due(delivery.job_id)
        if events_due is not None:
            # the job's event webhooks go first: wait for the next of them (not an attempt); finishing them
            # makes this one due at once (release_final_delivery)
            self.store.update_delivery(delivery.id, next_attempt_at=max(events_due, utcnow() + timedelta(
                seconds=0.2)))
            return False
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
        return self._attempt(delivery, url, body, f"msg_{delivery.job_id}_final", self.store.update_delivery)

    def _deliver_event(self, event: EventDelivery) -> bool:
        final = self.store.delivery(event.job_id)
        if final is not None and final["status"] != "pending":
            # the terminal webhook already went out; an event after it would arrive out of order
            self.store.update_webhook_event(event.id, status="skipped")
            return False
        body = event.body
        if body is None:  # built now, from the job as it is, and kept for the retries
            job = self.store.get(event.job_id)
            builder = _event_builders.get(event.dialect)
            body = builder(job, event.event, self.store) if job is not None and builder is not None else None
            if body is None:
                self.store.update_webhook_event(event.id, status="skipped")
                return False
            self.store.update_webhook_event(event.id, body=body)
        delivered = self._attempt(event, event.url, body, f"msg_{event.job_id}_{event.id}",
                                  self.store.update_webhook_event)
        if self.store.release_final_delivery(event.job_id):
            self._wake.set()
        return delivered

    def _attempt(self, delivery: Delivery | EventDelivery, url: str, body: Any, message_id: str,
                 update: Callable[..., None]) -> bool:
        attempts = delivery.attempts + 1
        status_code = None
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"User-Agent": "fluxserve-webhook", "Content-Type": "application/json"}
        signer = self.signers.get(delivery.dialect)
        try:
            if signer is not None:  # signed at each attempt, so the timestamp is fresh; as the job's owner
                owner = self.store.job_owner(delivery.job_id)
                headers.update(signer(self.keys, delivery.job_id, owner, message_id, content))
            response = self._client.post(url, content=content, headers=headers)
            status_code = response.status_code
            error = None if response.is_success else f"HTTP {status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        now = utcnow()
        if error is None:
            update(delivery.id, status="delivered", attempts=attempts, delivered_at=now,
                   last_status_code=status_code, last_error=None)
            return True
        if attempts >= self.max_attempts:
            log.warning("webhook for job %s failed %d times; giving up: %s", delivery.job_id, attempts, error)
            update(delivery.id, status="failed", attempts=attempts, last_error=error, last_status_code=status_code)
            return False
        delay = min(self.max_delay, self.base_delay * 2 ** (attempts - 1))
        update(delivery.id, attempts=attempts, last_error=error, last_status_code=status_code,
               next_attempt_at=now + timedelta(seconds=delay))
        return False
