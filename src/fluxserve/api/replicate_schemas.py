"""Replicate's FLUX.2 input schemas (black-forest-labs/flux-2-*), one pydantic model per model.

The fields, enums, ranges and defaults are those of Replicate's FLUX.2 models (research notes) and of
seed 003 (``input_image``, ``num_inference_steps`` 1-50 default 30, ``guidance`` 0-10 default 2 for
[pro]). The same models give each version's OpenAPI ``Input`` schema, so the schema the client reads is the
one the server validates with.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from fluxserve.api.openapi30 import to_openapi30
from fluxserve.catalog import Catalog, EndpointSpec
from fluxserve.request import MAX_SEED

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "match_input_image", "custom"]
Resolution = Literal["match_input_image", "0.5 MP", "1 MP", "2 MP", "4 MP"]
ReplicateFormat = Literal["webp", "jpg", "png"]

# Documented defaults that differ from the catalogue preset (seed 003: [pro] 30 steps, guidance 2).
DOCUMENTED_DEFAULTS: dict[str, dict[str, Any]] = {
    "black-forest-labs/flux-2-pro": {"steps": 30, "guidance": 2.0},
}
# Research notes: [dev] takes at most 4 input images on Replicate.
MAX_INPUT_IMAGES: dict[str, int] = {"black-forest-labs/flux-2-dev": 4}
COG_VERSION = "0.16.9"


class Flux2Input(BaseModel):
    """The fields every FLUX.2 model on Replicate takes."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, description="Text description of the image to generate")
    input_images: list[str] = Field(
        default_factory=list,
        description="Input images to edit or use as references: URLs or data URIs. "
        "With any, the model edits; without, it generates from text.",
    )
    aspect_ratio: AspectRatio = Field(
        "1:1", description="Aspect ratio of the output. 'custom' uses width and height."
    )
    resolution: Resolution = Field("1 MP", description="Output resolution in megapixels (1 MP = 1024x1024)")
    width: int | None = Field(
        None, ge=64, le=2048,
        description="Width when aspect_ratio is 'custom'; rounded to the nearest multiple of 16",
    )
    height: int | None = Field(
        None, ge=64, le=2048,
        description="Height when aspect_ratio is 'custom'; rounded to the nearest multiple of 16",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed. Set for reproducible generation")
    output_format: ReplicateFormat = Field("webp", description="Format of the output image")
    output_quality: int = Field(
        80, ge=0, le=100,
        description="Quality when saving lossy outputs, 0-100 (100 is best). Not relevant for png",
    )
    disable_safety_checker: bool = Field(False, description="Disable the safety checker for generated images")
    safety_tolerance: int = Field(2, ge=1, le=5, description="Safety tolerance, 1 is most strict, 5 most permissive")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """Seed 003's names: ``input_image`` (a list or one URL) and ``num_inference_steps``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "input_image" in data:
            extra = data.pop("input_image")
            if extra is not None:
                extra = [extra] if isinstance(extra, str) else extra
                current = data.get("input_images") or []
                if isinstance(extra, list) and isinstance(current, list):
                    data["input_images"] = current + extra
                else:
                    data["input_images"] = extra  # not a list: let validation name the field
        if "num_inference_steps" in data and "steps" not in data:
            data["steps"] = data.pop("num_inference_steps")
        return data


def _family(model_name: str) -> str:
    name = model_name.split("/", 1)[1]
    for family in ("dev", "flex", "pro"):
        if name == f"flux-2-{family}":
            return family
    return "other"


@cache
def input_model(model_name: str, steps: int, guidance: float, max_references: int) -> type[Flux2Input]:
    """The input schema of one Replicate model, with that model's defaults and limits (the catalogue
    preset's steps and guidance unless the model documents others)."""
    defaults = {"steps": steps, "guidance": guidance}
    defaults.update(DOCUMENTED_DEFAULTS.get(model_name, {}))
    max_images = MAX_INPUT_IMAGES.get(model_name, max_references or 10)
    family = _family(model_name)
    fields: dict[str, Any] = {
        "input_images": (
            list[str],
            Field(
                default_factory=list, max_length=max_images,
                description=f"Input images to edit or use as references (up to {max_images}): URLs or data "
                "URIs. With any, the model edits; without, it generates from text.",
            ),
        ),
        "steps": (int, Field(defaults["steps"], ge=1, le=50,
                             description="Number of denoising steps (also accepted as num_inference_steps)")),
        "guidance": (float, Field(defaults["guidance"], ge=0, le=10,
                                  description="Guidance scale. Lower values give more realistic images")),
    }
    if family == "dev":
        fields["go_fast"] = (bool, Field(True, description="Run faster with additional optimizations"))
    if family == "flex":
        fields["prompt_upsampling"] = (
            bool, Field(True, description="Automatically modify the prompt for more creative generation")
        )
    title = model_name.split("/", 1)[1].replace("-", "_").replace(".", "_")
    return create_model(f"Input_{title}", __base__=Flux2Input, **fields)


def openapi_schema(model_cls: type[Flux2Input]) -> dict[str, Any]:
    """The version's ``openapi_schema``: Cog's shape, with ``Input`` and ``Output`` components."""
    schema = to_openapi30(model_cls.model_json_schema())
    schema["title"] = "Input"
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {
            "schemas": {
                "Input": schema,
                "Output": {"type": "string", "format": "uri", "title": "Output"},
            }
        },
    }


def request_schema(model_name: str, model_cls: type[Flux2Input]) -> dict[str, Any]:
    """The model's ``json_request_schema`` (seed 003): a JSON Schema (draft 2020-12) of the body that creates a
    prediction, ``{"input": {...}, "webhook": ..., "webhook_events_filter": [...], "stream": ...}``. ``input``
    is the schema the server validates with, plus seed 003's names ``input_image`` and
    ``num_inference_steps``."""
    schema = model_cls.model_json_schema()
    defs = schema.pop("$defs", {})
    properties = schema["properties"]
    properties["input_image"] = {
        "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
        "description": "Seed 003's name for input_images: one URL or a list, added to input_images",
    }
    properties["num_inference_steps"] = {**properties["steps"], "description": "Seed 003's name for steps"}
    properties["num_inference_steps"].pop("default", None)
    body: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Prediction request for {model_name}",
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": schema,
            "webhook": {"type": "string", "format": "uri",
                        "description": "An http(s) URL that receives the prediction as it changes"},
            "webhook_events_filter": {
                "type": "array", "items": {"enum": ["start", "output", "logs", "completed"]},
                "description": "The events that call the webhook (default: all)",
            },
            "stream": {"type": "boolean", "description": "Ignored: every prediction can be streamed"},
        },
    }
    if defs:
        body["$defs"] = defs
    return body


def version_id(model_name: str, schema: dict[str, Any]) -> str:
    """A stable 64-hex version id: the same catalogue gives the same id on every replica."""
    digest = hashlib.sha256(f"{model_name}\n{json.dumps(schema, sort_keys=True)}".encode())
    return digest.hexdigest()


class ReplicateModels:
    """The Replicate names of the catalogue, their schemas and version ids."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.versions = {name: version_id(name, self.schema(name)) for name in catalog.replicate_models}
        self.by_version = {version: name for name, version in self.versions.items()}

    def specs(self, model_name: str) -> tuple[EndpointSpec, EndpointSpec]:
        text_id, edit_id = self.catalog.replicate_models[model_name]
        return self.catalog.endpoint(text_id), self.catalog.endpoint(edit_id)

    def input_model(self, model_name: str) -> type[Flux2Input]:
        text, edit = self.specs(model_name)
        return input_model(model_name, text.steps, text.guidance, edit.max_references)

    def schema(self, model_name: str) -> dict[str, Any]:
        return openapi_schema(self.input_model(model_name))

    def request_schema(self, model_name: str) -> dict[str, Any]:
        return request_schema(model_name, self.input_model(model_name))

    def version(self, model_name: str) -> str:
        return self.versions[model_name]

    def family(self, model_name: str) -> str:
        return _family(model_name)
