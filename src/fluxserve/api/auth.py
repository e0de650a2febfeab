"""API keys, shared by every dialect.

Clients send ``Authorization: Key <secret>`` (fal), ``Bearer <secret>`` (OpenAI, Replicate) or
``Token <secret>`` (older Replicate clients); fal's ``FAL_KEY_ID:FAL_KEY_SECRET`` form is accepted too.
Policy: required when the server listens beyond loopback (``fluxserve serve`` refuses to start there
without a key) or when ``FLUXSERVE_REQUIRE_AUTH=1``; on loopback it is required as soon as one key has been
created, and stays required when every key is revoked, until the operator runs ``fluxserve keys keyless``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from fluxserve.api.errors import ApiError

if TYPE_CHECKING:
    from fluxserve.jobs.store import KeyCounts

SCHEMES = ("key", "bearer", "token")
_VERIFIED_TTL_S = 10.0  # how long a verified secret is trusted without asking the store again
_KEY_COUNTS_TTL_S = 0.1  # how often the store's key counts are read: a key revoked elsewhere fails within this


@dataclass(frozen=True)
class Identity:
    """Who is calling: the API key's id and whether it is an admin key. ``key_id`` None means the API runs
    without keys (loopback, single-user): the caller then sees every job, as an admin does."""

    key_id: str | None
    admin: bool = False

    @property
    def sees_all(self) -> bool:
        return self.admin or self.key_id is None

    def may_see(self, owner: str | None) -> bool:
        """May this caller read, cancel or download what ``owner`` made?"""
        return self.sees_all or owner == self.key_id

    @property
    def list_owner(self) -> str | None:
        """The ``owner`` filter for listings: None (everything) for admins and keyless use."""
        return None if self.sees_all else self.key_id


OPEN = Identity(None, admin=False)  # no key needed: keyless local use


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_authorization(value: str | None) -> str | None:
    """The secret of an ``Authorization`` header in any accepted scheme, or None."""
    if not value:
        return None
    scheme, _, secret = value.strip().partition(" ")
    if scheme.lower() not in SCHEMES or not secret.strip():
        return None
    return secret.strip()


def env_requires_auth() -> bool:
    return os.environ.get("FLUXSERVE_REQUIRE_AUTH", "").lower() in ("1", "true", "yes", "on")


class KeyChecker:
    """Answers "may this request pass?" cheaply, from what it last read of the store's keys.

    Invariants: once a key has been created, keys are needed (on loopback too) until the operator releases every
    revoked key (``fluxserve keys keyless``): revoking keys never opens the server. The store's ``KeyCounts`` are
    read again at once after this process changed a key, and otherwise at most every ``_KEY_COUNTS_TTL_S``; when
    they changed, every verified secret is forgotten. So a revoked key fails at once in the process that revoked
    it and within ``_KEY_COUNTS_TTL_S`` in every other process sharing the store."""

    def __init__(self, store: Any, required: bool | None = None):
        self.store = store
        self.required = required  # True beyond loopback; None: decided by the keys (and FLUXSERVE_REQUIRE_AUTH)
        self._verified: dict[str, tuple[float, int, Identity]] = {}  # sha256 -> (when, generation, identity)
        self._counts: KeyCounts | None = None
        self._counts_at = 0.0
        self._changes = -1  # the store's ``key_changes`` when its counts were read
        self._generation = 0  # bumped whenever the counts changed; verifications of older ones are void

    def current_counts(self) -> KeyCounts | None:
        """The key counts last read, while they need no new read; None when the store must be read (no I/O)."""
        fresh = self.store.key_changes == self._changes and time.monotonic() - self._counts_at < _KEY_COUNTS_TTL_S
        return self._counts if fresh else None

    def key_counts(self) -> KeyCounts:
        """The store's key counts, read again when ``current_counts`` says so (a blocking read: off the loop)."""
        if (counts := self.current_counts()) is not None:
            return counts
        changes, now = self.store.key_changes, time.monotonic()
        counts = self.store.key_counts()
        if counts != self._counts:
            self._generation += 1
            self._verified.clear()
        self._counts, self._counts_at, self._changes = counts, now, changes
        return counts

    def auth_needed(self) -> bool:
        if self.required is not None:
            return self.required
        return env_requires_auth() or self.key_counts().keyed

    def cached(self, secret: str) -> Identity | None:
        """The identity verified for this secret since the keys last changed, within ``_VERIFIED_TTL_S``."""
        generation = self._generation
        cached = self._verified.get(hashlib.sha256(secret.encode()).hexdigest())
        if cached is not None and cached[1] == generation and time.monotonic() - cached[0] < _VERIFIED_TTL_S:
            return cached[2]
        return None

    def verify(self, secret: str) -> Identity | None:
        """The identity of the active key with this secret, or None (asks the store unless ``cached``)."""
        self.key_counts()
        generation = self._generation  # taken before the store is asked: a change meanwhile voids the answer
        if (identity := self.cached(secret)) is not None:
            return identity
        candidates = [secret]
        if ":" in secret:  # FAL_KEY_ID:FAL_KEY_SECRET
            candidates.append(secret.split(":", 1)[1])
        for candidate in candidates:
            key = self.store.authenticate(candidate)
            if key is not None:
                identity = Identity(key.id, bool(key.admin))
                if len(self._verified) > 10_000:
                    self._verified.clear()
                self._verified[hashlib.sha256(secret.encode()).hexdigest()] = (time.monotonic(), generation,
                                                                                identity)
                return identity
        return None

    def forget(self) -> None:
        """Drop what was read and verified: the next request reads the store again."""
        self._counts = None
        self._generation += 1
        self._verified.clear()


def is_cached(checker: KeyChecker, secret: str | None) -> Identity | None:
    """The caller's identity when what the checker holds already says this request may pass, without any read
    (safe on the event loop): ``OPEN`` when no key is needed; None when the store must be asked."""
    if checker.required is False:
        return OPEN
    counts = checker.current_counts()
    if counts is None:
        return None  # due for a read of the key counts: the caller reads them off the loop
    if checker.required is None and not env_requires_auth() and not counts.keyed:
        return OPEN  # keyless local use: no key was ever created, or the operator released them all
    return checker.cached(secret) if secret is not None else None


async def authenticate(request: Request) -> Identity | None:
    """The caller's identity (``OPEN`` when no key is needed), or None when a key is needed and the request
    has no valid one. Remembered on ``request.state.identity``."""
    checker: KeyChecker = request.app.state.auth
    secret = parse_authorization(request.headers.get("authorization"))
    identity = is_cached(checker, secret)
    if identity is None:
        if not await asyncio.to_thread(checker.auth_needed):
            identity = OPEN
        elif secret is not None:
            identity = await asyncio.to_thread(checker.verify, secret)
    request.state.identity = identity
    return identity


def caller(request: Request) -> Identity:
    """The identity ``check_request`` established for this request (routes call it after the check)."""
    identity = getattr(request.state, "identity", None)
    if identity is None:
        raise RuntimeError("caller() before check_request()")
    return identity


# OpenAI's 429 names what ran out in ``type`` ("requests", "tokens"), with ``code`` "rate_limit_exceeded"
_OPENAI_LIMIT_TYPES = {"max_concurrent": "requests", "rpm": "requests", "mp_per_day": "megapixels"}


def queue_full(exc: Any, dialect: str) -> ApiError:
    """A ``QueueFull`` from the job store (a full queue, or a key's quota: ``QuotaExceeded``) as a 429 with
    ``Retry-After`` in the dialect's shape."""
    limit = getattr(exc, "limit", None)
    headers = {"Retry-After": str(exc.retry_after_s)}
    if dialect == "openai":
        return ApiError(429, exc.message, dialect=dialect, error_type=_OPENAI_LIMIT_TYPES.get(limit, "requests"),
                        code="rate_limit_exceeded", param=limit, headers=headers)
    if dialect == "fal":
        return ApiError(429, exc.message, dialect=dialect, headers=headers,
                        error_type="rate_limit_exceeded" if limit is not None else "queue_full")
    return ApiError(429, exc.message, dialect=dialect, error_type="rate_limit_exceeded", headers=headers)


async def check_request(request: Request, dialect: str) -> Identity:
    """The caller's identity; raise a 401 in the dialect's shape unless the request may pass."""
    if await authenticate(request) is not None:
        return request.state.identity
    secret = parse_authorization(request.headers.get("authorization"))
    if secret is None:
        message = (
            "Missing API key: send 'Authorization: Key <key>' (fal), or 'Bearer <key>'. "
            "Create one on the server with `fluxserve keys create`."
        )
    else:
        message = "Invalid API key."
    raise ApiError(401, message, dialect=dialect, error_type="authentication_error" if dialect != "fal" else None,
                   headers={"WWW-Authenticate": "Key"})


def require_key(dialect: str):
    """A FastAPI dependency: ``dependencies=[Depends(require_key("openai"))]``."""

    async def dependency(request: Request) -> None:
        await check_request(request, dialect)

    return dependency


def require_admin(dialect: str):
    """A FastAPI dependency for operator views (metrics): an admin key, or no key needed at all (keyless local
    use); another key gets a 403."""

    async def dependency(request: Request) -> None:
        identity = await check_request(request, dialect)
        if not identity.sees_all:
            raise ApiError(403, "This needs an admin key (`fluxserve keys create --admin`).", dialect=dialect,
                           error_type="permission_error" if dialect != "fal" else None)

    return dependency
