"""Webhook delivery: in the background, with retries and exponential backoff, surviving restarts.

When a job with a ``webhook`` becomes terminal, the store queues a delivery row in the same transaction, so
nothing is lost if the process dies. A ``WebhookSender`` (one per API process) takes due deliveries, builds the
payload on the first attempt with the builder its dialect registered, POSTs it as JSON and retries failures
(any error: a non-2xx answer, a transport error, a URL that cannot be parsed, a payload that cannot be built)
with backoff ``base_delay * 2**(attempt-1)`` capped at ``max_delay``, until ``max_attempts``: a delivery ends
as delivered, failed or skipped, never retried silently.

Each attempt runs in a slot of its own (``concurrency`` per process, each bounded by the webhook timeout), and
the jobs of one API key hold at most ``per_key`` slots (``fluxserve.jobs.outbox``): a slow receiver holds one
slot, and one key's receivers cannot hold them all. Dialects check a caller's webhook URL at submit with
``check_webhook_url`` (the sender's own parsing and the outbound address policy), so a URL the sender could
not deliver to is refused there.

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
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections import Counter
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


# ---- webhook URLs ----------------------------------------------------------------------------------------
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")


class WebhookURLError(ValueError):
    """A webhook URL the sender could not deliver to; ``message`` is safe to show the caller and leaves the
    field to the dialect, which names it in its own error shape (fal ``fal_webhook``, Replicate ``webhook``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def check_webhook_url(url: object, policy: fetch.FetchPolicy | None = None) -> str:
    """``url`` when the sender can POST to it: parsed as the sender's httpx client parses it, http(s), a host
    that is an IP address or a host name, a port from 1 to 65535, and no address the outbound policy refuses
    (``fetch.resolve_allowed``; a host name is resolved, so call this off the event loop). A name that does
    not resolve now is accepted: every attempt resolves it again, and a delivery that keeps failing ends as
    failed. Raises ``WebhookURLError``."""
    if not isinstance(url, str) or not url.strip():
        raise WebhookURLError("must be an http(s) URL")
    try:
        parsed = httpx.URL(url)
        host, port, raw_host = parsed.host, parsed.port, parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise WebhookURLError("is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookURLError("must be an http(s) URL")
    if not host:
        raise WebhookURLError("is not a valid URL: it names no host")
    if port is not None and not 0 < port < 65536:
        raise WebhookURLError(f"is not a valid URL: port {port} is not from 1 to 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(raw_host) or len(raw_host) > 253:
            raise WebhookURLError("is not a valid URL: the host is no host name") from None
    try:
        fetch.resolve_allowed(host, port or (443 if parsed.scheme == "https" else 80), policy)
    except fetch.AddressRefused:
        raise WebhookURLError(fetch.REFUSED_MESSAGE) from None
    except httpx.ConnectError:
        pass  # the name does not resolve now
    return url


# ---- the sender ------------------------------------------------------------------------------------------
class WebhookSender:
    """Delivers pending webhooks, each in a slot of its own: at most ``concurrency`` attempts run at once (each
    bounded by ``timeout``), and the jobs of one API key hold at most ``per_key`` of them (0: no limit), so a
    slow receiver, or one key's many, delays no other key's webhooks. A slot that frees up is filled at once
    from the outbox; ``notify`` (usable as a worker's ``on_finished``) wakes the sender, which otherwise looks
    for due deliveries every ``poll_s`` seconds. Every failed attempt, whatever the error, is recorded with its
    error and retried with backoff until ``max_attempts``."""

    def __init__(self, store: JobStore, *, max_attempts: int = 10, base_delay: float = 1.0,
                 max_delay: float = 600.0, timeout: float = 15.0, concurrency: int = 16, per_key: int = 4,
                 poll_s: float = 1.0, builders: dict[str, PayloadBuilder] | None = None,
                 keys: WebhookKeys | None = None, signers: dict[str, Signer] | None = None):
        self.store = store
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.per_key = per_key if per_key > 0 else None
        self.poll_s = poll_s
        self.keys = keys or WebhookKeys(store)
        self.signers = SIGNERS if signers is None else signers
        self._builders = builders
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = fetch.webhook_client(timeout)  # internal addresses refused
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        # the attempts running in this process, by (kind, row id)
        self._in_flight: dict[tuple[str, int], Delivery | EventDelivery] = {}
        self._slots = threading.Lock()
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

    def _claim(self, limit: int, in_flight: list[Delivery | EventDelivery] | None = None
               ) -> list[Delivery | EventDelivery]:
        """Up to ``limit`` due rows, events first, fairly between keys given the slots ``in_flight``, and none
        of a job that has one in flight (a job's webhooks go one at a time, in order)."""
        dialects, lease_s = list(self.builders), self.timeout + 30
        busy = Counter(item.owner for item in in_flight or ())
        busy_jobs = {item.job_id for item in in_flight or ()}
        claimed: list[Delivery | EventDelivery] = list(self.store.claim_webhook_events(
            dialects, limit, lease_s, per_owner=self.per_key, busy=busy, busy_jobs=busy_jobs))
        busy.update(item.owner for item in claimed)  # (a terminal webhook claimed with its job's event waits)
        return claimed + list(self.store.claim_deliveries(dialects, limit - len(claimed), lease_s,
                                                          per_owner=self.per_key, busy=busy,
                                                          busy_jobs=busy_jobs))

    def _fill_slots(self) -> bool:
        """Start an attempt in every free slot that a due row can take; whether every free slot was filled
        (more may be due)."""
        with self._slots:
            free = self.concurrency - len(self._in_flight)
            in_flight = list(self._in_flight.values())
        if free <= 0:
            return False
        claimed = self._claim(free, in_flight)
        for item in claimed:
            slot = (type(item).__name__, item.id)
            with self._slots:
                if slot in self._in_flight:  # its lease ran out while this process still tries it
                    continue
                self._in_flight[slot] = item
            self._pool.submit(self._deliver_in_slot, slot, item)
        return len(claimed) >= free

    def _deliver_in_slot(self, slot: tuple[str, int], item: Delivery | EventDelivery) -> None:
        try:
            self.deliver(item)
        except Exception:  # the store failed: the row's lease runs out and it is tried again
            log.exception("webhook sender: could not record the delivery for job %s", item.job_id)
        finally:
            with self._slots:
                self._in_flight.pop(slot, None)
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            wait = self.poll_s
            try:
                if self._fill_slots():
                    continue
                dialects = list(self.builders)
                now = utcnow()
                for due in (self.store.next_delivery_due(dialects), self.store.next_webhook_event_due(dialects)):
                    # a row due already waits for a slot (or its key's share): a freed slot wakes the sender
                    if due is not None and due > now:
                        wait = min(wait, (due - now).total_seconds())
            except Exception:
                log.exception("webhook sender: database error; retrying")
            self._wake.wait(wait)

    def deliver_due(self) -> int:
        """One pass in the calling thread (for tools and tests): deliver what is due (each key's share); returns
        how many."""
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
            try:
                built = builder(job) if job is not None and builder is not None else None
            except Exception as e:
                log.exception("webhook for job %s: the payload could not be built", delivery.job_id)
                return self._failed(delivery, f"the payload could not be built: {type(e).__name__}: {e}", None,
                                    self.store.update_delivery)
            if built is None:
                self.store.update_delivery(delivery.id, status="skipped")
                return False
            url, body = built
            self.store.update_delivery(delivery.id, url=url, body=body)
        return self._attempt(delivery, url, body, f"msg_{delivery.job_id}_final", self.store.update_delivery)

    def _deliver_event(self, event: EventDelivery) -> bool:
        final = self.store.delivery(event.job_id)
        if final is not None and (final["status"] != "pending" or final["url"] is not None):
            # the terminal webhook went out, or is going out (it was built at its first attempt): an event
            # after it would arrive out of order, and it carries everything the event would
            self.store.update_webhook_event(event.id, status="skipped")
            return False
        body = event.body
        if body is None:  # built now, from the job as it is, and kept for the retries
            job = self.store.get(event.job_id)
            builder = _event_builders.get(event.dialect)
            try:
                body = builder(job, event.event, self.store) if job is not None and builder is not None else None
            except Exception as e:
                log.exception("webhook for job %s: the %s event could not be built", event.job_id, event.event)
                return self._failed(event, f"the payload could not be built: {type(e).__name__}: {e}", None,
                                    self.store.update_webhook_event)
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
        status_code = None
        headers = {"User-Agent": "fluxserve-webhook", "Content-Type": "application/json"}
        signer = self.signers.get(delivery.dialect)
        try:
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            if signer is not None:  # signed at each attempt, so the timestamp is fresh; as the job's owner
                owner = self.store.job_owner(delivery.job_id)
                headers.update(signer(self.keys, delivery.job_id, owner, message_id, content))
            response = self._client.post(url, content=content, headers=headers)
            status_code = response.status_code
            error = None if response.is_success else f"HTTP {status_code}"
        except Exception as e:  # noqa: BLE001 - any error is the attempt's (httpx.InvalidURL is no HTTPError)
            error = f"{type(e).__name__}: {e}"
        if error is None:
            update(delivery.id, status="delivered", attempts=delivery.attempts + 1, delivered_at=utcnow(),
                   last_status_code=status_code, last_error=None)
            return True
        return self._failed(delivery, error, status_code, update)

    def _failed(self, delivery: Delivery | EventDelivery, error: str, status_code: int | None,
                update: Callable[..., None]) -> bool:
        """Record a failed attempt: retried after ``base_delay * 2**(attempts-1)`` (at most ``max_delay``), or
        failed for good after ``max_attempts``."""
        attempts = delivery.attempts + 1
        if attempts >= self.max_attempts:
            log.warning("webhook for job %s failed %d times; giving up: %s", delivery.job_id, attempts, error)
            update(delivery.id, status="failed", attempts=attempts, last_error=error, last_status_code=status_code)
            return False
        delay = min(self.max_delay, self.base_delay * 2 ** (attempts - 1))
        update(delivery.id, attempts=attempts, last_error=error, last_status_code=status_code,
               next_attempt_at=utcnow() + timedelta(seconds=delay))
        return False
