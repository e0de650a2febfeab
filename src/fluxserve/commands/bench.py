"""``fluxserve bench``: time one model through the engine (per stage, per step, MFU, memory), optionally
against stock diffusers on the same weights. See docs/performance.md and benchmarks/README.md."""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    if width % 16 or height % 16 or min(width, height) < 64:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be multiples of 16 and >= 64")
    return width, height


def add_parser(subparsers) -> None:
    from fluxserve.commands.common import add_model_flags

    parser = subparsers.add_parser(
        "bench",
        help="benchmark a model: per-stage and per-step times, MFU, peak memory, ratio to stock diffusers",
        description="Runs generation requests through the engine (what the server runs) and reports medians. "
        "--random-weights builds the full-size architecture directly on the GPU (no download, no network: the "
        "safety checker is off for it); --demo uses the tiny demo models (CPU-friendly). --transformer and "
        "--text-encoder force a placement (see fluxserve plan).",
    )
    parser.add_argument("--model", required=True, help="catalogue model key: dev, klein-4b, klein-9b, ...")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="full-size random weights built on the GPU (timing and memory only; CUDA only)",
    )
    parser.add_argument("--size", type=_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    parser.add_argument("--refs", type=int, default=0, help="reference images at the output size (default 0)")
    parser.add_argument("--num-images", type=int, default=1, choices=range(1, 5), metavar="1-4")
    parser.add_argument("--guidance", type=float, help="default: 2.5 for dev, 1.0 for klein")
    parser.add_argument("--acceleration", choices=["none", "regular", "high"], default="regular")
    parser.add_argument(
        "--baseline", choices=["diffusers"], help="also run stock diffusers on the same inputs"
    )
    parser.add_argument("--repeat", type=int, default=3, help="measured runs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1; compile)")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the full report as JSON")
    add_model_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fluxserve import bench
    from fluxserve.commands.common import settings_from_args
    from fluxserve.engine.plan import DoesNotFit
    from fluxserve.engine.random_weights import RandomWeightsUnavailable
    from fluxserve.engine.weights import WeightsNotFound

    if args.steps < 1 or args.repeat < 1 or args.warmup < 0 or args.refs < 0:
        print("fluxserve bench: --steps and --repeat must be >= 1, --warmup and --refs >= 0", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    width, height = args.size
    config = bench.BenchConfig(
        model=args.model,
        width=width,
        height=height,
        steps=args.steps,
        refs=args.refs,
        num_images=args.num_images,
        acceleration=args.acceleration,
        baseline=args.baseline,
        repeat=args.repeat,
        warmup=args.warmup,
        demo=bool(settings.demo),
        random_weights=args.random_weights,
        guidance=args.guidance,
    )
    try:
        report = bench.run(config, settings)
    except (bench.BenchError, RandomWeightsUnavailable, WeightsNotFound, DoesNotFit, ValueError) as exc:
        print(f"fluxserve bench: {exc}", file=sys.stderr)
        return 2
    print(bench.format_report(report))
    if args.json_out:
        bench.write_json(report, args.json_out)
        print(f"wrote {args.json_out}")
    return 0
