"""``fluxserve models``: every endpoint -> its model -> its preset, and where each model's weights resolve."""

from __future__ import annotations

import argparse
import json

from fluxserve.commands.common import add_model_flags, settings_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list endpoints, their models and presets, and where weights "
                                   "resolve", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_model_flags(parser)
    parser.set_defaults(func=run)


def weights_status(spec, settings) -> str:
    """Where ``spec``'s weights come from, without downloading anything."""
    from fluxserve.engine.demo import demo_path, is_built
    from fluxserve.engine.weights import is_local_reference

    if settings.demo:
        path = demo_path(settings.demo_dir, spec.demo)
        return f"demo '{spec.demo}' at {path}" + ("" if is_built(settings.demo_dir, spec.demo) else
                                                   " (built on first use)")
    if is_local_reference(spec.weights):
        from pathlib import Path

        path = Path(spec.weights).expanduser()
        found = (path / "model_index.json").is_file()
        return f"local {path}" + ("" if found else " (MISSING: no model_index.json)")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.weights, "model_index.json")
    except Exception:  # noqa: BLE001 - a status line must not fail the listing
        cached = None
    return f"hub {spec.weights}" + (" (cached)" if isinstance(cached, str) else " (not cached: downloads on "
                                                                                 "first use)")


def preset(endpoint) -> str:
    parts = [f"{endpoint.steps} steps", f"guidance {endpoint.guidance:g}"]
    if endpoint.sigmas:
        parts.append("fixed sigmas")
    parts.extend(f"LoRA {lora.path}" for lora in endpoint.loras)
    if endpoint.expand_prompt:
        parts.append("prompt expansion")
    if endpoint.is_edit:
        parts.append(f"up to {endpoint.max_references} refs, {endpoint.max_input_megapixels:g} MP")
    parts.append(endpoint.output_format)
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from fluxserve.catalog import Catalog

    settings = settings_from_args(args)
    catalog = Catalog.load(settings.catalog or None)
    models = {key: {"title": spec.title, "pipeline": spec.pipeline, "weights": spec.weights,
                    "resolves_to": weights_status(spec, settings)} for key, spec in catalog.models.items()}
    endpoints = {eid: {"model": e.model, "task": e.task, "preset": preset(e)} for eid, e in catalog.endpoints.items()}
    if args.json:
        print(json.dumps({"catalog": str(catalog.source), "models": models, "endpoints": endpoints}, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=escape(f"Endpoints ({catalog.source})"))
    table.add_column("endpoint", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("task")
    table.add_column("preset")
    for eid, info in endpoints.items():  # escaped: "FLUX.2 [dev]" is text, not rich markup
        table.add_row(*(escape(str(v)) for v in (eid, info["model"], info["task"], info["preset"])))
    console.print(table)
    table = Table(title="Models" + (" (--demo: served by the demo models)" if settings.demo else ""))
    for column in ("model", "title", "pipeline", "weights resolve to"):
        table.add_column(column)
    for key, info in models.items():
        table.add_row(*(escape(str(v)) for v in (key, info["title"], info["pipeline"], info["resolves_to"])))
    console.print(table)
    return 0
