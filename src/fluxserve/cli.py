"""``fluxserve``: one command, a subcommand per task. Each lives in ``fluxserve.commands.<name>`` and
exposes ``add_parser(subparsers)`` (which sets ``func``); modules are imported lazily so ``--help`` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("serve", "worker", "generate", "train", "bench", "plan", "models", "keys", "usage", "demo_weights")


def build_parser() -> argparse.ArgumentParser:
    from fluxserve import __version__

    parser = argparse.ArgumentParser(prog="fluxserve", description="Self-hosted FLUX.2 image generation.")
    parser.add_argument("--version", action="version", version=f"fluxserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fluxserve.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
