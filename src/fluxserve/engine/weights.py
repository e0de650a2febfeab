"""Where a model's weights come from: a local directory or a Hugging Face hub id (or the demo builds).

``resolve_weights`` returns a local directory holding a diffusers pipeline (``model_index.json``) or raises
``WeightsNotFound`` with a message that names the model, where it looked and how to fix it.
``load_pipeline`` loads it with ``from_pretrained``: the same path for real and demo weights.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fluxserve.catalog import ModelSpec
from fluxserve.config import Settings

PIPELINE_CLASSES = ("Flux2Pipeline", "Flux2KleinPipeline")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsNotFound(RuntimeError):
    """A model's weights are not available; the message says what to do."""


def is_local_reference(weights: str) -> bool:
    """A path (absolute, relative, ``~``, or an existing directory) rather than a hub id ``owner/name``."""
    if weights.startswith(("/", ".", "~")) or Path(weights).expanduser().exists():
        return True
    return not _HUB_ID.match(weights)


def resolve_weights(spec: ModelSpec, settings: Settings) -> Path:
    """The local directory of ``spec``'s pipeline, downloading from the hub when needed and allowed."""
    if settings.demo:
        from fluxserve.engine.demo import demo_path, ensure_demo_weights

        ensure_demo_weights(settings.demo_dir, (spec.demo,))
        return demo_path(settings.demo_dir, spec.demo)
    weights = spec.weights
    if is_local_reference(weights):
        path = Path(weights).expanduser().resolve()
        if not (path / "model_index.json").is_file():
            raise WeightsNotFound(
                f"weights for model {spec.key!r} ({spec.title}) not found: looked in the local directory {path}, "
                f"which {'has no model_index.json' if path.exists() else 'does not exist'}. Fix: point "
                f"[models.{spec.key}].weights in the catalogue ({settings.catalog or 'the packaged catalog.toml'}, "
                "override with --catalog or FLUXSERVE_CATALOG) at a diffusers pipeline directory, or at a Hugging "
                "Face hub id; or run with --demo to use the tiny demo models."
            )
        return path
    return _snapshot(spec, settings)


def _snapshot(spec: ModelSpec, settings: Settings) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = bool(constants.HF_HUB_OFFLINE)
    token = settings.hf_token or None
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})" + ("" if offline else " and the hub")
    fixes = (
        f"Fix: download it once (`hf download {spec.weights}`) or point [models.{spec.key}].weights in the "
        "catalogue (--catalog / FLUXSERVE_CATALOG) at a local diffusers directory; for gated repos accept the "
        "licence on huggingface.co and set HF_TOKEN (or FLUXSERVE_HF_TOKEN); "
        + ("unset HF_HUB_OFFLINE to allow downloads; " if offline else "set HF_HUB_OFFLINE=1 to use only the cache; ")
        + "or run with --demo to use the tiny demo models."
    )
    try:
        path = snapshot_download(
            repo_id=spec.weights,
            token=token,
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
        )
    except GatedRepoError:
        reason = "the repository is gated and " + ("the token has no access" if token else "no HF_TOKEN is set")
    except RepositoryNotFoundError:
        reason = "the repository does not exist or is private" + ("" if token else " (no HF_TOKEN is set)")
    except LocalEntryNotFoundError:
        reason = "it is not in the local cache" + (" and HF_HUB_OFFLINE is set" if offline else
                                                   " and the hub could not be reached")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return Path(path)
    raise WeightsNotFound(
        f"weights for model {spec.key!r} ({spec.title}) not found: looked for hub id {spec.weights!r} in {where}; "
        f"{reason}. {fixes}"
    )


def load_pipeline(spec: ModelSpec, path: Path, dtype, demo: bool = False):
    """``Flux2Pipeline`` / ``Flux2KleinPipeline`` ``from_pretrained(path)`` in ``dtype`` (on the CPU)."""
    import diffusers

    if spec.pipeline not in PIPELINE_CLASSES:
        raise WeightsNotFound(
            f"model {spec.key!r}: unknown pipeline {spec.pipeline!r} in the catalogue; use one of "
            + ", ".join(PIPELINE_CLASSES)
        )
    _check_processor_backend(spec, path)
    cls = getattr(diffusers, spec.pipeline)
    kwargs = {"dtype": dtype}
    if demo and spec.pipeline == "Flux2KleinPipeline":
        kwargs["is_distilled"] = spec.distilled  # one demo build stands in for distilled and base models
    pipe = cls.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_processor_backend(spec: ModelSpec, path: Path) -> None:
    """The real [dev] checkpoint's tokenizer is a PixtralProcessor, which transformers only loads with
    torchvision: say so instead of failing deep inside from_pretrained."""
    index = Path(path) / "model_index.json"
    try:
        text = index.read_text()
    except OSError:
        return
    if "PixtralProcessor" in text and importlib.util.find_spec("torchvision") is None:
        raise WeightsNotFound(
            f"model {spec.key!r}: the checkpoint at {path} uses a PixtralProcessor, which needs torchvision; "
            "install the torchvision build that matches your torch (pip install torchvision)."
        )
