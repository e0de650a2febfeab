"""The endpoint catalogue: public ids -> models and presets, read from a TOML file (catalog.toml by default)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fluxserve.config import UPSTREAM_PROVIDERS
from fluxserve.request import LoraSpec
from fluxserve.usage import Price

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")
DEFAULT_MAX_LORAS = 3  # fal's limit on the LoRAs of one request to its LoRA endpoints


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    pipeline: str  # "Flux2Pipeline" | "Flux2KleinPipeline"
    weights: str  # local directory or Hugging Face hub id
    demo: str  # "dev" | "klein": the demo architecture that stands in with --demo
    distilled: bool = True

    @property
    def trainable(self) -> bool:
        """LoRAs are trained on [dev] and on the [klein] base models, not on the step-distilled [klein]."""
        return self.pipeline == "Flux2Pipeline" or not self.distilled


@dataclass(frozen=True)
class EndpointSpec:
    id: str
    title: str
    model: str
    task: str  # "text-to-image" | "edit" | "train"
    schema: str  # fal input schema family: dev | fast | lora | pro | flex | klein | trainer
    steps: int
    guidance: float
    sigmas: tuple[float, ...] | None = None
    loras: tuple[LoraSpec, ...] = ()
    max_loras: int = 0  # LoRAs a caller may add to one request (schema "lora"); the preset's are not counted
    expand_prompt: bool = False
    output_format: str = "png"
    max_references: int = 0
    max_input_megapixels: float = 14.0
    pairs: bool = False  # a trainer whose datasets hold ROOT_start / ROOT_end pairs (image-to-image LoRAs)
    # Where the gateway sends a request, in order: "PROVIDER:TARGET" (an upstream's endpoint or model) or
    # "local" (this server's GPUs, the preset above). Routes to providers without a configured upstream are
    # skipped; without any, the endpoint runs locally as before.
    routes: tuple[str, ...] = ()

    @property
    def is_edit(self) -> bool:
        return self.task == "edit"

    @property
    def is_training(self) -> bool:
        return self.task == "train"


@dataclass
class Catalog:
    models: dict[str, ModelSpec]
    endpoints: dict[str, EndpointSpec]
    openai_models: dict[str, tuple[str, str]] = field(default_factory=dict)
    openai_default: str = "flux-2-dev"
    replicate_models: dict[str, tuple[str, str]] = field(default_factory=dict)
    prices: dict[str, Price] = field(default_factory=dict)  # endpoint id -> price; none unless the operator sets them
    currency: str = ""
    source: Path = DEFAULT_CATALOG

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Catalog:
        path = Path(path or os.environ.get("FLUXSERVE_CATALOG") or DEFAULT_CATALOG)
        with open(path, "rb") as f:
            data = tomllib.load(f)
        models = {
            key: ModelSpec(
                key=key,
                title=m.get("title", key),
                pipeline=m["pipeline"],
                weights=m["weights"],
                demo=m.get("demo", "dev"),
                distilled=m.get("distilled", True),
            )
            for key, m in data.get("models", {}).items()
        }
        endpoints = {}
        for eid, e in data.get("endpoints", {}).items():
            if e["model"] not in models:
                raise ValueError(f"{path}: endpoint {eid!r} names unknown model {e['model']!r}")
            endpoints[eid] = EndpointSpec(
                id=eid,
                title=e.get("title", eid),
                model=e["model"],
                task=e.get("task", "text-to-image"),
                schema=e.get("schema", "dev"),
                steps=e["steps"],
                guidance=float(e["guidance"]),
                sigmas=tuple(e["sigmas"]) if e.get("sigmas") else None,
                loras=tuple(LoraSpec(**lora) for lora in e.get("loras", [])),
                max_loras=_max_loras(path, eid, e),
                expand_prompt=e.get("expand_prompt", False),
                output_format=e.get("output_format", "png"),
                max_references=e.get("max_references", 0),
                max_input_megapixels=float(e.get("max_input_megapixels", 14.0)),
                pairs=e.get("pairs", False),
                routes=tuple(_routes(path, eid, e.get("routes", []))),
            )
        openai = dict(data.get("openai_models", {}))
        default = openai.pop("default", "flux-2-dev")
        aliases = {
            "openai_models": {k: tuple(v) for k, v in openai.items()},
            "replicate_models": {k: tuple(v) for k, v in data.get("replicate_models", {}).items()},
        }
        for table in aliases.values():
            for name, ids in table.items():
                for eid in ids:
                    if eid not in endpoints:
                        raise ValueError(f"{path}: {name!r} names unknown endpoint {eid!r}")
        prices, currency = _prices(path, data.get("prices", {}), endpoints)
        return cls(models=models, endpoints=endpoints, openai_default=default, source=path, prices=prices,
                   currency=currency, **aliases)

    def endpoint(self, endpoint_id: str) -> EndpointSpec:
        """The endpoint, or KeyError naming it."""
        try:
            return self.endpoints[endpoint_id]
        except KeyError:
            raise KeyError(f"unknown endpoint {endpoint_id!r}") from None

    def model_for(self, endpoint_id: str) -> ModelSpec:
        return self.models[self.endpoint(endpoint_id).model]


ROUTE_PROVIDERS = UPSTREAM_PROVIDERS


def _max_loras(path: Path, endpoint_id: str, entry: dict) -> int:
    """``max_loras``: the caller's LoRAs one request may name; fal's 3 by default where the schema takes LoRAs."""
    value = entry.get("max_loras", DEFAULT_MAX_LORAS if entry.get("schema") == "lora" else 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: endpoint {endpoint_id!r}: max_loras must be a whole number of at least 0")
    return value


def _routes(path: Path, endpoint_id: str, routes: list) -> list[str]:
    for route in routes:
        provider, _, target = str(route).partition(":")
        if route != "local" and (provider not in ROUTE_PROVIDERS or not target):
            raise ValueError(f"{path}: endpoint {endpoint_id!r}: route {route!r} is neither 'local' nor "
                             f"PROVIDER:TARGET with a provider of {', '.join(ROUTE_PROVIDERS)}")
    return [str(route) for route in routes]


def _prices(path: Path, table: dict, endpoints: dict[str, EndpointSpec]) -> tuple[dict[str, Price], str]:
    """``[prices]``: an optional ``currency`` and, per endpoint id, ``first_megapixel`` and ``extra_megapixel``."""
    table = dict(table)
    currency = table.pop("currency", "")
    if not isinstance(currency, str) or len(currency) > 16:
        raise ValueError(f"{path}: prices.currency must be a short name such as \"USD\"")
    prices = {}
    for eid, entry in table.items():
        if eid not in endpoints:
            raise ValueError(f"{path}: prices names unknown endpoint {eid!r}")
        values = []
        for name in ("first_megapixel", "extra_megapixel"):
            value = entry.get(name) if isinstance(entry, dict) else None
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{path}: prices.{eid!r}.{name} must be a number of at least 0")
            values.append(float(value))
        prices[eid] = Price(*values)
    return prices, currency
