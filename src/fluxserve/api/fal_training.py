"""fal's FLUX.2 trainer endpoints: their input as a ``TrainingRequest`` (the dataset fetched and checked by its
headers before the job is queued, so a bad archive is a 422 naming the field before any GPU time; no image is
decoded here: the worker decodes them one at a time) and a finished training job as fal's
``{diffusers_lora_file, config_file}``.

Where the archive lives: an http(s) URL elsewhere is fetched again by the worker; one of this server's files (an
upload, e.g. ``fal_client.upload_file``) is read from storage, the caller's own or by its signed URL; a data URI
is stored as the caller's file when the job is queued, and the job (its request and its recorded input) holds
that file's signed URL, not the archive."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from fluxserve import fetch
from fluxserve.api.auth import caller
from fluxserve.api.common import OwnFileMissing, base_url, own_file_key, resolve_own_file, tenant
from fluxserve.api.errors import FalValidationError, from_field_error
from fluxserve.api.fal_schemas import TrainerInput
from fluxserve.api.file_urls import file_url
from fluxserve.api.stored_files import storage_full, store_file_blocking
from fluxserve.api.upload_types import ZIP
from fluxserve.catalog import EndpointSpec
from fluxserve.inputs import data_uri_bytes
from fluxserve.jobs.file_quota import StorageQuotaExceeded
from fluxserve.request import InputError, TrainingRequest
from fluxserve.training.dataset import FIELD, DatasetLimits, check_api_source, check_dataset


async def training_request(request: Request, spec: EndpointSpec, inp: TrainerInput, body: dict) -> TrainingRequest:
    """The job's request; ``body`` (the input as recorded) gets the stored file's URL in place of a data URI."""
    training = TrainingRequest(model=spec.model, image_data_url=inp.image_data_url, edit=spec.pairs, steps=inp.steps,
                               learning_rate=inp.learning_rate, default_caption=inp.default_caption,
                               output_lora_format=inp.output_lora_format, seed=inp.seed or 0,
                               resolution=inp.resolution)
    try:
        check_api_source(training.image_data_url)
        key, stored = await fetch.run_blocking(_read_dataset, request, training, tenant=tenant(request),
                                               network=_downloads(request, training.image_data_url))
    except InputError as exc:
        raise FalValidationError(from_field_error(exc)) from None
    except StorageQuotaExceeded as exc:
        raise storage_full(exc, "fal") from None
    training.dataset_key = key
    if stored:
        training.image_data_url = body["image_data_url"] = file_url(base_url(request), key)
    return training


def _downloads(request: Request, url: str) -> bool:
    """Whether reading the dataset downloads it (a URL elsewhere), or reads a data URI or this server's file."""
    url = url.strip()
    return not url.lower().startswith("data:") and own_file_key(request, url) is None


def _read_dataset(request: Request, training: TrainingRequest) -> tuple[str | None, bool]:
    """Check the dataset by its headers (blocking): (its storage key or None for a URL elsewhere, whether it was
    stored now)."""
    url = training.image_data_url.strip()
    options = {"edit": training.edit, "default_caption": training.default_caption,
               "limits": DatasetLimits.from_settings(request.app.state.settings)}
    if url.lower().startswith("data:"):
        data = data_uri_bytes(url, FIELD)
        check_dataset(data, **options)
        key = store_file_blocking(request, data, ZIP, caller(request).key_id, "datasets", "dataset.zip")
        return key, True
    key = own_file_key(request, url)
    if key is None:
        check_dataset(url, **options)  # through the guarded fetcher
        return None, False
    try:
        check_dataset(resolve_own_file(request, url), **options)  # from storage, the caller's or signed
    except OwnFileMissing as exc:
        raise InputError(FIELD, str(exc)) from None
    return key, False


def training_output(base: str, job: Any) -> dict[str, Any]:
    """The trainer's output: each file as fal's File object, with a signed URL under ``base``."""
    return {file["name"]: {"url": file_url(base, file["key"]), "content_type": file["content_type"],
                           "file_name": file["file_name"], "file_size": file["file_size"]}
            for file in (job.result or {}).get("files", [])}
