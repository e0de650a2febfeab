"""Training jobs on a worker: the dataset opened again (a training job holds its source, checked by its headers
when it was queued) and its images decoded one at a time as the trainer encodes them, ``Engine.train`` with
``step n/N loss x`` progress, and the LoRA and its config put in storage as the job's files."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from fluxserve.request import CancelCheck, Progress, ProgressCallback, TrainingRequest
from fluxserve.storage import Storage

LORA_CONTENT_TYPE = "application/vnd.safetensors"  # as uploaded LoRAs are stored


@dataclass
class TrainedLora:
    weights: bytes  # the safetensors file
    config: dict[str, Any]


def run_training(engine: Any, storage: Storage, request: TrainingRequest, on_progress: ProgressCallback,
                 should_cancel: CancelCheck) -> TrainedLora:
    from fluxserve.training.dataset import DatasetLimits, load_dataset
    from fluxserve.training.trainer import save_lora

    def progress(p) -> None:
        on_progress(Progress(step=p.step, total=p.total, message=f"step {p.step}/{p.total} loss {p.loss:.4f}"))

    with load_dataset(_source(storage, request), edit=request.edit, default_caption=request.default_caption,
                      limits=DatasetLimits.from_settings(engine.settings)) as dataset:
        for note in dataset.notes:
            on_progress(Progress(step=0, total=request.steps, message=note))
        state = engine.train(request.model, dataset.examples, steps=request.steps,
                             learning_rate=request.learning_rate, rank=request.rank, seed=request.seed,
                             resolution=request.resolution, on_progress=progress, should_cancel=should_cancel,
                             on_note=lambda note: on_progress(Progress(step=0, total=request.steps, message=note)))
    config = {**request.model_dump(exclude={"kind", "image_data_url", "dataset_key"}), "images": len(dataset.examples)}
    with tempfile.TemporaryDirectory(prefix="fluxserve-lora-") as folder:
        path = os.path.join(folder, "lora.safetensors")
        save_lora(state, path, format=request.output_lora_format, metadata={"fluxserve": json.dumps(config)})
        with open(path, "rb") as f:
            return TrainedLora(f.read(), config)


def _source(storage: Storage, request: TrainingRequest) -> str | os.PathLike | bytes:
    """Where the worker reads the dataset: a stored archive as its file where the storage has files (read as
    needed), else its bytes; a URL elsewhere is fetched again."""
    if not request.dataset_key:
        return request.image_data_url
    path = getattr(storage, "path", None)
    if path is not None and (local := path(request.dataset_key)).is_file():
        return local
    return storage.get(request.dataset_key)[0]


def save_trained(storage: Storage, trained: TrainedLora) -> dict:
    """The job's result: its two files in storage (under ``loras/``), by the name fal's output gives them."""
    config = json.dumps(trained.config, indent=2).encode()
    files = []
    for name, file_name, data, content_type in (
            ("diffusers_lora_file", "pytorch_lora_weights.safetensors", trained.weights, LORA_CONTENT_TYPE),
            ("config_file", "config.json", config, "application/json")):
        key = storage.put(data, content_type, prefix="loras", filename=file_name)
        files.append({"name": name, "key": key, "content_type": content_type, "file_name": file_name,
                      "file_size": len(data)})
    return {"files": files, "seed": trained.config["seed"]}
