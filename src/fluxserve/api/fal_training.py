"""fal's FLUX.2 trainer endpoints: their input as a ``TrainingRequest`` (the dataset fetched, read and checked
before the job is queued, so a bad archive is a 422 naming the field before any GPU time) and a finished
training job as fal's ``{diffusers_lora_file, config_file}``."""

from __future__ import annotations

from typing import Any

from fluxserve import fetch
from fluxserve.api.errors import FalValidationError, from_field_error
from fluxserve.api.fal_schemas import TrainerInput
from fluxserve.api.file_urls import file_url
from fluxserve.catalog import EndpointSpec
from fluxserve.request import InputError, TrainingRequest
from fluxserve.training.dataset import check_api_source, load_dataset


async def training_request(spec: EndpointSpec, inp: TrainerInput) -> TrainingRequest:
    request = TrainingRequest(model=spec.model, image_data_url=inp.image_data_url, edit=spec.pairs, steps=inp.steps,
                              learning_rate=inp.learning_rate, default_caption=inp.default_caption,
                              output_lora_format=inp.output_lora_format, seed=inp.seed or 0,
                              resolution=inp.resolution)
    try:
        check_api_source(request.image_data_url)
        await fetch.run_blocking(load_dataset, request.image_data_url, edit=request.edit,
                                 default_caption=request.default_caption)
    except InputError as exc:
        raise FalValidationError(from_field_error(exc)) from None
    return request


def training_output(base: str, job: Any) -> dict[str, Any]:
    """The trainer's output: each file as fal's File object, with a signed URL under ``base``."""
    return {file["name"]: {"url": file_url(base, file["key"]), "content_type": file["content_type"],
                           "file_name": file["file_name"], "file_size": file["file_size"]}
            for file in (job.result or {}).get("files", [])}
