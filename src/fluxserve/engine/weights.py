"""Where a model's weights come from: a local directory or a Hugging Face hub id (or the demo builds).

``resolve_weights`` returns a local directory holding a diffusers pipeline (``model_index.json``) or raises
``WeightsNotFound`` with a message that names the model, where it looked and how to fix it.
``load_pipeline`` loads it with ``from_pretrained``: the same path for real and demo weights.

``load_placed_pipeline`` is what the engine calls. On the CPU it is ``load_pipeline`` + ``place_pipeline``
(float32, everything resident). On a GPU it never holds the whole pipeline in host memory: the memory plan is
made first from the checkpoint's byte counts on disk (``checkpoint_bytes``: safetensors headers only), then
the components are loaded and placed one at a time with ``from_pretrained(subfolder=...)``: straight onto the
GPU (``device_map``) when the plan keeps them in bf16 there; to the CPU and then moved tensor by tensor, each
block Linear quantised to FP8 as it arrives (``placement.place_module``), when the plan holds them in FP8; to
the CPU with streaming hooks when the plan streams them. Each component is placed before the next is loaded, so
the host holds at most one component; the GPU never holds the bf16 copy of a component held in FP8.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import struct
from pathlib import Path

from fluxserve.catalog import ModelSpec
from fluxserve.config import Settings

PIPELINE_CLASSES = ("Flux2Pipeline", "Flux2KleinPipeline")
COMPONENTS = ("transformer", "text_encoder", "vae")
# safetensors dtype names -> bytes per element
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
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
    cls = _pipeline_class(spec, path)
    kwargs = {"dtype": dtype, **_pipeline_kwargs(spec, demo)}
    pipe = cls.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_class(spec: ModelSpec, path: Path):
    import diffusers

    if spec.pipeline not in PIPELINE_CLASSES:
        raise WeightsNotFound(
            f"model {spec.key!r}: unknown pipeline {spec.pipeline!r} in the catalogue; use one of "
            + ", ".join(PIPELINE_CLASSES)
        )
    _check_processor_backend(spec, path)
    return getattr(diffusers, spec.pipeline)


def _pipeline_kwargs(spec: ModelSpec, demo: bool) -> dict:
    if demo and spec.pipeline == "Flux2KleinPipeline":
        return {"is_distilled": spec.distilled}  # one demo build stands in for distilled and base models
    return {}


# ---- sizes from disk ----------------------------------------------------------------------------------------
def safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors file's JSON header (reads only the header)."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items() if name != "__metadata__"}


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder: those its (non-variant) index names, else its
    non-variant ``*.safetensors`` files (``model.safetensors``, not ``model.fp16.safetensors``), else all."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if "." not in index.name.removesuffix(".safetensors.index.json"):
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
    return plain or files


def checkpoint_tensors(path: Path, component: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in component_files(Path(path) / component):
        tensors.update(safetensors_header(file))
    return tensors


def checkpoint_bytes(path: Path, dtype=None) -> dict[str, int]:
    """Bytes of each component's tensors on disk, without loading anything.

    ``dtype`` None: in the file's dtypes. With a torch dtype: floating tensors counted at that dtype (what
    ``from_pretrained(torch_dtype=dtype)`` will hold), plus the footprints ``plan.plan_memory`` needs:
    ``transformer_fp8`` / ``text_encoder_fp8`` (the Linear weights the plan would quantise: 2-D weights of the
    transformer blocks; of the text encoder all but the embeddings and ``lm_head``) and ``transformer_stream`` /
    ``text_encoder_stream`` (what stays on the GPU while a component is streamed layer by layer)."""
    import torch

    from fluxserve.engine import plan

    target = None if dtype is None else torch.empty((), dtype=dtype).element_size()
    sizes: dict[str, int] = {}
    shapes: dict[str, list[tuple[int, int]]] = {"transformer": [], "text_encoder": []}
    named: dict[str, list[tuple[str, int]]] = {"transformer": [], "text_encoder": []}
    for component in COMPONENTS:
        total = 0
        for name, (kind, shape) in checkpoint_tensors(path, component).items():
            count = 1
            for dim in shape:
                count *= dim
            size = count * (target if (target is not None and kind in FLOAT_DTYPES) else SAFETENSORS_DTYPES[kind])
            total += size
            if component in named:
                named[component].append((name, size))
            if len(shape) == 2 and name.endswith(".weight") and _fp8_candidate(component, name):
                shapes[component].append((shape[0], shape[1]))
        sizes[component] = total
    if target is not None:
        for component in ("transformer", "text_encoder"):
            sizes[f"{component}_fp8"] = plan.fp8_footprint(sizes[component], shapes[component], target)
            sizes[f"{component}_stream"] = plan.stream_footprint(component, named[component])
    return sizes


def _fp8_candidate(component: str, name: str) -> bool:
    if component == "transformer":
        return name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    if component == "text_encoder":
        return "lm_head" not in name and "embed" not in name
    return False


# ---- component-wise loading ---------------------------------------------------------------------------------
def component_class(path: Path, component: str):
    """The class ``model_index.json`` names for ``component`` (e.g. diffusers.Flux2Transformer2DModel)."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    library, class_name = index[component]
    return getattr(importlib.import_module(library), class_name)


def load_component(path: Path, component: str, dtype, device):
    """One component with ``from_pretrained(subfolder=component)`` in ``dtype``, loaded straight onto
    ``device`` (``device_map``), never materialised twice."""
    cls = component_class(path, component)
    kwargs: dict = {"subfolder": component, "device_map": {"": str(device)}}
    if cls.__module__.split(".")[0] == "transformers":
        kwargs["dtype"] = dtype
    else:
        kwargs.update(torch_dtype=dtype, low_cpu_mem_usage=True)
    return cls.from_pretrained(str(path), **kwargs).eval()


def load_placed_pipeline(spec: ModelSpec, path: Path, device, dtype, requested: dict[str, str] | None = None,
                         demo: bool = False, plan=None):
    """``(pipe, placement)``: the pipeline loaded where the memory plan puts each component.

    CPU with no ``plan``: ``load_pipeline`` + ``placement.place_pipeline`` (everything resident at ``dtype``).
    Otherwise (a GPU, or a forced ``plan``, which is how the CPU tests exercise it): plan from
    ``checkpoint_bytes`` and ``requested`` ({"transformer": ..., "text_encoder": ...}, "auto" by default), then
    load each component and place it before the next is loaded (see the module docstring)."""
    import torch

    from fluxserve.engine import placement

    device = torch.device(device)
    requested = requested or {"transformer": "auto", "text_encoder": "auto"}
    if device.type != "cuda" and plan is None:
        pipe = load_pipeline(spec, path, dtype, demo=demo)
        return pipe, placement.place_pipeline(pipe, device, dtype, requested)
    cls = _pipeline_class(spec, path)
    sizes = checkpoint_bytes(path, dtype)
    if plan is None:
        plan = placement.plan_for(device, sizes, requested["transformer"], requested["text_encoder"])
    cpu = torch.device("cpu")
    held = {"vae": "bf16", "transformer": plan.transformer, "text_encoder": plan.text_encoder}
    parts = {}
    for component in ("vae", "transformer", "text_encoder"):
        # bf16 on the GPU: loaded straight there; FP8 or streamed: loaded to the CPU, then placed
        target = device if held[component] in ("bf16", "resident") else cpu
        parts[component] = placement.place_component(load_component(path, component, dtype, target), component,
                                                     device, plan)
    pipe = cls.from_pretrained(str(path), **parts, **_pipeline_kwargs(spec, demo))
    pipe.set_progress_bar_config(disable=True)
    return pipe, placement.placement_of(device, dtype, plan, pipe, requested=requested, sizes=sizes)


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
