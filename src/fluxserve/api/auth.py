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
from typing import Any

from fastapi import Request

from fluxserve.api.errors import ApiError

SCHEMES = ("key", "bearer", "token")
_KEYS_TTL_S = 2.0  # how long "are there any keys?" is cached
_VERIFIED_TTL_S = 10.0  # how long a verified secret is trusted without asking the store again


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
        self._verified: dict[str, float] = {}

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

    def verify(self, secret: str) -> bool:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        verified_at = self._verified.get(digest)
        if verified_at is not None and time.monotonic() - verified_at < _VERIFIED_TTL_S:
            return True
        candidates = [secret]
        if ":" in secret:  # FAL_KEY_ID:FAL_KEY_SECRET
            candidates.append(secret.split(":", 1)[1])
        if any(self.store.verify_key(candidate) for candidate in candidates):
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[digest] = time.monotonic()
            return True
        return False

    def forget(self) -> None:
        """Drop the caches (after a key was created or revoked in this process)."""
        self._keys_exist = (0.0, False)
        self._verified.clear()


def is_cached(checker: KeyChecker, secret: str | None) -> bool | None:
    """True when the caches already say this request may pass (no store read); None when the store must be
    asked. Caches: "no key exists" for ``_KEYS_TTL_S``, a verified secret (by SHA-256) for ``_VERIFIED_TTL_S``;
    a key revoked in another process is refused at most ``_VERIFIED_TTL_S`` later (at once in this one:
    ``forget``)."""
    if checker.required is False:
        return True
    if checker.required is None and not env_requires_auth():
        checked_at, exist = checker._keys_exist
        if not exist and time.monotonic() - checked_at <= _KEYS_TTL_S:
            return True  # no key exists (checked moments ago): loopback without auth
    if secret is not None:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        verified_at = checker._verified.get(digest)
        if verified_at is not None and time.monotonic() - verified_at < _VERIFIED_TTL_S:
            return True
    return None


async def check_request(request: Request, dialect: str) -> None:
    """Raise a 401 in the dialect's shape unless the request may pass."""
    checker: KeyChecker = request.app.state.auth
    secret = parse_authorization(request.headers.get("authorization"))
    if is_cached(checker, secret):
        return
    needed = await asyncio.to_thread(checker.auth_needed)
    if not needed:
        return
    if secret is None:
        message = (
            "Missing API key: send 'Authorization: Key <key>' (fal), or 'Bearer <key>'. "
            "Create one on the server with `fluxserve keys create`."
        )
    elif await asyncio.to_thread(checker.verify, secret):
        return
    else:
        message = "Invalid API key."
    raise ApiError(401, message, dialect=dialect, error_type="authentication_error" if dialect != "fal" else None,
                   headers={"WWW-Authenticate": "Key"})


def require_key(dialect: str):
    """A FastAPI dependency: ``dependencies=[Depends(require_key("openai"))]``."""

    async def dependency(request: Request) -> None:
        await check_request(request, dialect)

    return dependency
