"""Files: ``GET /files/{key}`` serves storage; uploads speak fal's storage protocol.

- Python ``fal_client.upload*``: ``POST /storage/auth/token?storage_type=fal-cdn-v3`` -> a short-lived upload
  token, then ``POST /files/upload`` (raw body, ``Authorization: Bearer <token>``, ``X-Fal-File-Name``)
  -> ``{"access_url"}``; fallback ``POST /storage/upload/initiate`` -> ``{"upload_url", "file_url"}`` + ``PUT``.
- JS ``fal.storage.upload``: ``POST /storage/upload/initiate?storage_type=fal-cdn-v3`` then ``PUT`` (no auth:
  the upload URL itself is signed).

Uploads are images or safetensors LoRA weights (``upload_types``, checked on the bytes) and belong to the key
that uploaded them, within its storage quota (``jobs.file_quota``: a 429 beyond it). With API keys in use, ``GET /files/{key}`` needs the owner's key (or an admin key) or the
signed ``?token=`` every returned URL carries (``file_urls``); another key gets 404, as for a missing file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from fluxserve import jsonsafe
from fluxserve.api import file_urls, upload_types
from fluxserve.api.auth import authenticate, caller, check_request, parse_authorization, require_key
from fluxserve.api.common import base_url, image_url
from fluxserve.api.errors import ApiError, FalValidationError, field_error
from fluxserve.api.stored_files import UPLOAD_PREFIX, set_size_blocking, storage_full, store_file
from fluxserve.jobs.file_quota import StorageQuotaExceeded

MAX_UPLOAD_BYTES = int(os.environ.get("FLUXSERVE_MAX_UPLOAD_MB", "100")) * 1024 * 1024
TOKEN_TTL_S = 3600

router = APIRouter(tags=["files"])


class Signer:
    """HMAC-signed, expiring tokens (upload tokens and signed upload URLs). The server's secret is kept in the job
    store, so a token from one API replica works on another and after a restart."""

    def __init__(self, secret: bytes | None = None):
        self.secret = secret or secrets.token_bytes(32)

    def sign(self, payload: dict[str, Any]) -> str:
        raw = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(b"=")
        mac = hmac.new(self.secret, raw, hashlib.sha256).digest()
        return f"{raw.decode()}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    def verify(self, token: str) -> dict[str, Any] | None:
        raw, _, mac = token.partition(".")
        expected = base64.urlsafe_b64encode(hmac.new(self.secret, raw.encode(), hashlib.sha256).digest()).rstrip(b"=")
        if not hmac.compare_digest(expected, mac.encode()):
            return None
        payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if payload.get("exp", 0) < time.time():
            return None
        return payload


def _signer(request: Request) -> Signer:
    return request.app.state.signer


def _content_type(value: str | None) -> str:
    return (value or "application/octet-stream").split(";")[0].strip() or "application/octet-stream"


async def _body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isascii() and length.isdigit() and int(length) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"File too large: the limit is {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"File too large: the limit is {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    return bytes(data)


# Every file is served inert: never sniffed into HTML, never run as a page, whatever it holds.
FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; sandbox",
}
_SERVED_AS_IS = ("image/", upload_types.SAFETENSORS)


def served_type(content_type: str) -> str:
    """The stored content type, unless a browser could render it as a document (then a download)."""
    base = content_type.split(";")[0].strip().lower()
    return base if base.startswith(_SERVED_AS_IS) and "svg" not in base else "application/octet-stream"


async def _may_download(request: Request, key: str) -> bool:
    """A valid ``?token=`` for this file, no key needed, an admin key or the owner's key. Raises 401 without
    any credential."""
    if file_urls.check(request.query_params.get("token"), key):
        return True
    identity = await authenticate(request)
    if identity is None:
        raise ApiError(401, "This file needs its signed URL (?token=...) or the API key that made it",
                       headers={"WWW-Authenticate": "Key"})
    if identity.sees_all:
        return True
    _, owner = await asyncio.to_thread(request.app.state.store.file_owner, key)
    return identity.may_see(owner)


# ---- serving ---------------------------------------------------------------------------------------------------
@router.get("/files/{key:path}", summary="A stored file (outputs, uploads, previews)")
async def get_file(request: Request, key: str) -> Response:
    missing = ApiError(404, f"File {key!r} not found", error_type="not_found")
    if not await _may_download(request, key):
        raise missing
    try:
        data, content_type = await asyncio.to_thread(request.app.state.storage.get, key)
    except KeyError:
        raise missing from None
    return Response(data, media_type=served_type(content_type),
                    headers={"Cache-Control": "private, max-age=31536000, immutable", **FILE_HEADERS})


def checked_type(data: bytes) -> str:
    """The sniffed content type of an upload; 415 when it is neither an image nor safetensors weights."""
    content_type = upload_types.sniff(data)
    if content_type is None:
        raise ApiError(415, f"Unsupported file: uploads must be {upload_types.ACCEPTED}",
                       error_type="unsupported_media_type")
    return content_type


# ---- uploads ---------------------------------------------------------------------------------------------------
@router.post("/storage/auth/token", dependencies=[Depends(require_key("fal"))], summary="fal upload token")
async def upload_token(request: Request) -> JSONResponse:
    expires = datetime.now(UTC) + timedelta(seconds=TOKEN_TTL_S)
    token = _signer(request).sign({"kind": "upload", "exp": expires.timestamp(), "owner": caller(request).key_id})
    return JSONResponse(
        {"token": token, "token_type": "Bearer", "base_url": base_url(request), "expires_at": expires.isoformat()}
    )


@router.post("/files/upload", summary="Upload a file (raw body); answers its access_url")
async def upload_file(request: Request) -> JSONResponse:
    secret = parse_authorization(request.headers.get("authorization"))
    payload = _signer(request).verify(secret) if secret else None
    if payload and payload.get("kind") == "upload":
        owner = payload.get("owner")
    else:
        owner = (await check_request(request, "fal")).key_id  # an API key works too
    data = await _body(request)
    name = request.headers.get("x-fal-file-name") or None
    content_type = checked_type(data)
    try:
        key = await store_file(request, data, content_type, owner, UPLOAD_PREFIX, name)
    except StorageQuotaExceeded as exc:
        raise storage_full(exc, "fal") from None
    return JSONResponse({"access_url": image_url(request, key), "file_name": name or key.rsplit("/", 1)[-1]})


@router.post("/storage/upload/initiate", dependencies=[Depends(require_key("fal"))],
             summary="Start a two-step upload: answers upload_url (PUT the bytes there) and file_url")
async def initiate_upload(request: Request) -> JSONResponse:
    raw = await request.body()
    try:
        body = jsonsafe.decode(raw, request.app.state.settings.max_json_depth) if raw.strip() else {}
    except jsonsafe.BadJson as exc:
        raise FalValidationError([field_error(list(exc.path), exc.message, exc.kind)]) from None
    body = body if isinstance(body, dict) else {}
    for field in ("content_type", "file_name"):
        if body.get(field) is not None and not isinstance(body[field], str):
            raise FalValidationError([field_error([field], "Input should be a valid string", "string_type")])
    content_type = _content_type(body.get("content_type"))
    name = body.get("file_name") or None
    try:  # reserve the slot (its size is counted once the bytes arrive)
        key = await store_file(request, b"", content_type, caller(request).key_id, UPLOAD_PREFIX, name)
    except StorageQuotaExceeded as exc:
        raise storage_full(exc, "fal") from None
    token = _signer(request).sign({"kind": "put", "key": key, "ct": content_type, "exp": time.time() + TOKEN_TTL_S})
    return JSONResponse({"upload_url": f"{base_url(request)}/storage/upload/{token}", "file_url": image_url(request, key)})


@router.put("/storage/upload/{token}", summary="The second step of an initiated upload")
async def put_upload(request: Request, token: str) -> JSONResponse:
    payload = _signer(request).verify(token)
    if not payload or payload.get("kind") != "put":
        raise ApiError(403, "Invalid or expired upload URL: initiate the upload again")
    data = await _body(request)
    content_type = checked_type(data)
    try:
        await asyncio.to_thread(set_size_blocking, request, payload["key"], len(data))
    except StorageQuotaExceeded as exc:
        raise storage_full(exc, "fal") from None
    except KeyError:  # the reservation was deleted meanwhile (retention)
        raise ApiError(403, "Invalid or expired upload URL: initiate the upload again") from None
    await asyncio.to_thread(request.app.state.storage.put_at, payload["key"], data, content_type)
    return JSONResponse({"file_url": image_url(request, payload["key"])})
