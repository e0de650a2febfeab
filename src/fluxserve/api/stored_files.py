"""Files a caller stores on this server: uploads, and the images a request carries inline (multipart parts, data
URIs), stored once and referenced by every job of the request instead of copied into each job's row.

``store_file`` records the file for the caller's key within its storage quota (``jobs.file_quota``) before the
bytes are written; ``storage_full`` answers a refused one as a 429 in the calling dialect's shape. A request's
jobs reference a stored image as ``resolve_own_file`` does (the local file, read by the worker in place).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request

from fluxserve.api.common import data_uri, image_url
from fluxserve.api.errors import ApiError
from fluxserve.inputs import data_uri_bytes, image_type
from fluxserve.jobs.file_quota import StorageQuotaExceeded
from fluxserve.request import InputError
from fluxserve.storage import new_key

UPLOAD_PREFIX = "uploads"
INPUT_PREFIX = "inputs"  # images a request carried inline


def store_file_blocking(request: Request, data: bytes, content_type: str, owner: str | None,
                        prefix: str = UPLOAD_PREFIX, filename: str | None = None, job_id: str | None = None) -> str:
    """Store ``data`` as a file of ``owner`` (an API key id; None without keys); its storage key. Raises
    ``StorageQuotaExceeded`` (nothing is stored then). Blocking: storage and store writes."""
    state = request.app.state
    key = new_key(content_type, prefix, filename)
    state.store.add_file(key, owner, job_id, size=len(data), limit=state.settings.max_storage_bytes_per_key)
    try:
        state.storage.put_at(key, data, content_type)
    except BaseException:
        state.store.forget_files([key])
        raise
    return key


async def store_file(request: Request, data: bytes, content_type: str, owner: str | None,
                     prefix: str = UPLOAD_PREFIX, filename: str | None = None, job_id: str | None = None) -> str:
    """``store_file_blocking`` in a thread."""
    return await asyncio.to_thread(store_file_blocking, request, data, content_type, owner, prefix, filename,
                                   job_id)


class InlineFull(StorageQuotaExceeded):
    """An inline image of a request that the storage quota refused: ``index`` in the request's list."""

    def __init__(self, exc: StorageQuotaExceeded, index: int):
        super().__init__(exc.used, exc.needed, exc.limit)
        self.index = index


def store_images_blocking(request: Request, images: list[bytes | str], owner: str | None,
                          job_id: str | None = None) -> tuple[list[str], list[str]]:
    """A request's images as stored files of ``owner``: each image's bytes (a multipart part) or data URI is
    stored once and becomes the file's signed URL; URLs, and data URIs or bytes that are no image, stay as
    they are (as a data URI), for the dialect's checks to refuse with the field. Returns (the references, the
    keys stored). Raises ``InlineFull`` naming the image the quota refused (what was stored for the request
    before it is deleted again). Blocking."""
    references, keys = [], []
    try:
        for index, image in enumerate(images):
            data = image
            if isinstance(image, str):
                if not image.strip().lower().startswith("data:"):
                    references.append(image)
                    continue
                try:
                    data = data_uri_bytes(image.strip(), "image")
                except InputError:
                    references.append(image)
                    continue
            content_type = image_type(data)
            if content_type is None:
                references.append(image if isinstance(image, str) else data_uri(data, "application/octet-stream"))
                continue
            try:
                key = store_file_blocking(request, data, content_type, owner, INPUT_PREFIX, job_id=job_id)
            except StorageQuotaExceeded as exc:
                raise InlineFull(exc, index) from None
            keys.append(key)
            references.append(image_url(request, key))
    except BaseException:
        delete_files_blocking(request, keys)
        raise
    return references, keys


async def store_images(request: Request, images: list[bytes | str], owner: str | None,
                       job_id: str | None = None) -> tuple[list[str], list[str]]:
    """``store_images_blocking`` in a thread."""
    return await asyncio.to_thread(store_images_blocking, request, images, owner, job_id)


def set_size_blocking(request: Request, key: str, size: int) -> None:
    """A reserved upload's real size, within its owner's quota (``StorageQuotaExceeded`` otherwise)."""
    state = request.app.state
    state.store.set_file_size(key, size, state.settings.max_storage_bytes_per_key)


def delete_files_blocking(request: Request, keys: list[str]) -> None:
    """Delete files this request stored (its jobs no longer need them) and their records."""
    storage = request.app.state.storage
    for key in keys:
        with contextlib.suppress(KeyError, FileNotFoundError):
            storage.delete(key)
    request.app.state.store.forget_files(keys)


def storage_full(exc: StorageQuotaExceeded, dialect: str, param: str | None = None) -> ApiError:
    """A refused file as a 429 in ``dialect``'s shape; ``param`` is the OpenAI parameter that carried it."""
    if dialect == "openai":
        return ApiError(429, exc.message, dialect=dialect, error_type="insufficient_quota",
                        code="insufficient_quota", param=param)
    return ApiError(429, exc.message, dialect=dialect, error_type="storage_quota_exceeded")
