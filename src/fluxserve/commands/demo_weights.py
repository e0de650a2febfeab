"""``fluxserve demo-weights``: build the tiny random-weight demo pipelines into the cache directory."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo-weights",
        help="build the tiny random-weight demo models (dev: Mistral3 encoder, klein: Qwen3 encoder)",
        description="Build tiny random-weight FLUX.2 [dev] and [klein] pipelines with locally built tokenizers "
        "and save them under <data-dir>/cache/demo-weights. --demo uses them for every endpoint (and builds "
        "them on first use).",
    )
    parser.add_argument("--data-dir", help="where the database, files and model cache live")
    parser.add_argument("--force", action="store_true", help="rebuild even when the demo weights exist")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fluxserve.commands.common import settings_from_args
    from fluxserve.engine.demo import build_demo_weights

    settings = settings_from_args(args)
    start = time.perf_counter()
    paths = build_demo_weights(settings.demo_dir, force=args.force)
    for path in paths:
        print(f"{path.name}: {path}")
    safety = settings.demo_dir / "safety"
    if safety.exists():
        print(f"safety: {safety}")
    print(f"demo weights ready in {time.perf_counter() - start:.1f}s")
    return 0
