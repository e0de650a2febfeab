"""API keys, shared by every dialect.

Clients send ``Authorization: Key <secret>`` (fal), ``Bearer <secret>`` (OpenAI, Replicate) or
``Token <secret>`` (older Replicate clients); fal's ``FAL_KEY_ID:FAL_KEY_SECRET`` form is accepted too.
Policy: required when the server listens beyond loopback (``fluxserve serve`` refuses to start there
without a key) or when ``FLUXSERVE_REQUIRE_AUTH=1``; on loopback it is required as soon as one key exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from fluxserve.api.errors import ApiError

SCHEMES = ("key", "bearer", "token")
_KEYS_TTL_S = 2.0  # how long "are there any keys?" is cached
_VERIFIED_TTL_S = 10.0  # how long a verified secret is trusted without asking the store again
_REVOCATIONS_TTL_S = 0.1  # how often the store's revocation count is read: a revoked key fails within this


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
    """Answers "may this request pass?" cheaply: results are cached briefly in memory."""

    def __init__(self, store: Any, required: bool | None = None):
        self.store = store
        self.required = required
        self._keys_exist: tuple[float, bool] = (0.0, False)
        self._verified: dict[str, tuple[float, Identity]] = {}
        self._revocations: tuple[float, int | None] = (0.0, None)

    def check_revocations(self) -> None:
        """Forget verified secrets when a key was revoked since (in any process sharing the store): the
        store's revocation count is read at most every ``_REVOCATIONS_TTL_S``, a single indexed read."""
        checked_at, count = self._revocations
        now = time.monotonic()
        if now - checked_at < _REVOCATIONS_TTL_S:
            return
        current = self.store.revocations()
        if count is not None and current != count:
            self._verified.clear()
            self._keys_exist = (0.0, False)
        self._revocations = (now, current)

    def auth_needed(self) -> bool:
        if self.required is not None:
            return self.required
        if env_requires_auth():
            return True
        checked_at, exist = self._keys_exist
        if time.monotonic() - checked_at > _KEYS_TTL_S:
            exist = self._any_key()
            self._keys_exist = (time.monotonic(), exist)
        return exist

    def _any_key(self) -> bool:
        for key in self.store.list_keys():
            revoked = key.get("revoked") if isinstance(key, dict) else getattr(key, "revoked", None)
            revoked_at = key.get("revoked_at") if isinstance(key, dict) else getattr(key, "revoked_at", None)
            if not revoked and not revoked_at:
                return True
        return False

    def verify(self, secret: str) -> Identity | None:
        """The identity of the key with this secret (cached for ``_VERIFIED_TTL_S`` unless a key is revoked
        meanwhile), or None."""
        self.check_revocations()
        digest = hashlib.sha256(secret.encode()).hexdigest()
        cached = self._verified.get(digest)
        if cached is not None and time.monotonic() - cached[0] < _VERIFIED_TTL_S:
            return cached[1]
        candidates = [secret]
        if ":" in secret:  # FAL_KEY_ID:FAL_KEY_SECRET
            candidates.append(secret.split(":", 1)[1])
        for candidate in candidates:
            key = self.store.authenticate(candidate)
            if key is not None:
                identity = Identity(key.id, bool(key.admin))
                if len(self._verified) > 10_000:
                    self._verified.clear()
                self._verified[digest] = (time.monotonic(), identity)
                return identity
        return None

    def forget(self) -> None:
        """Drop the caches (after a key was created or revoked in this process)."""
        self._keys_exist = (0.0, False)
        self._verified.clear()


def is_cached(checker: KeyChecker, secret: str | None) -> Identity | None:
    """The caller's identity when the caches already say this request may pass (no store read): ``OPEN`` when
    no key is needed; None when the store must be asked. Caches: "no key exists" for ``_KEYS_TTL_S``, a
    verified secret (by SHA-256) for ``_VERIFIED_TTL_S``, dropped as soon as the store counts a new revocation
    (read at most every ``_REVOCATIONS_TTL_S``, so a key revoked in any process fails within that)."""
    if checker.required is False:
        return OPEN
    if checker.required is None and not env_requires_auth():
        checked_at, exist = checker._keys_exist
        if not exist and time.monotonic() - checked_at <= _KEYS_TTL_S:
            return OPEN  # no key exists (checked moments ago): loopback without auth
    if secret is not None:
        checker.check_revocations()
        digest = hashlib.sha256(secret.encode()).hexdigest()
        cached = checker._verified.get(digest)
        if cached is not None and time.monotonic() - cached[0] < _VERIFIED_TTL_S:
            return cached[1]
    return None


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
