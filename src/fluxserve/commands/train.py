"""``fluxserve train --model dev DATA.zip -o lora.safetensors``: train a LoRA in this process, with a progress
bar showing the step, the loss and the time left; the file loads in the ``/lora`` endpoints
(``{"loras": [{"path": ..., "scale": 1}]}``) and ``fluxserve generate --lora``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fluxserve.commands.common import add_model_flags, settings_from_args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a LoRA on a zip or a directory of images in this process",
                                   description=__doc__)
    parser.add_argument("data", help="a zip or a directory of images, each with an optional same-named .txt caption "
                        "(--edit: ROOT_start / ROOT_end pairs, ROOT_start2-4 for more inputs); see docs/training.md")
    parser.add_argument("--model", default="klein-4b-base",
                        help="the model to train for: dev, klein-4b-base or klein-9b-base (default klein-4b-base)")
    parser.add_argument("--edit", action="store_true", help="an image-to-image LoRA from start/end pairs")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--resolution", type=int, default=1024,
                        help="the side images are trained at, keeping their shape (default 1024)")
    parser.add_argument("--caption", help="the caption of every image without its own .txt")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): same data and seed, same LoRA")
    parser.add_argument("--format", choices=("fal", "comfy"), default="fal",
                        help="fal: diffusers keys (default); comfy: ComfyUI's keys")
    parser.add_argument("-o", "--output", default="lora.safetensors", help="the LoRA file (default lora.safetensors)")
    add_model_flags(parser)
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> str | None:
    for flag, value, low, high in (("--steps", args.steps, 1, 100_000), ("--rank", args.rank, 1, 256),
                                   ("--resolution", args.resolution, 64, 2048)):
        if not low <= value <= high:
            return f"{flag}: {value} is out of range; allowed: {low}-{high}"
    if not 0 < args.lr < 1:
        return f"--lr: {args.lr} is out of range; allowed: above 0 and below 1"
    if not Path(args.data).exists():
        return f"data: {args.data} does not exist"
    return None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fluxserve.catalog import Catalog
    from fluxserve.engine import Engine, WeightsNotFound
    from fluxserve.engine.plan import DoesNotFit
    from fluxserve.request import InputError
    from fluxserve.training.dataset import DatasetLimits, load_dataset
    from fluxserve.training.trainer import save_lora

    if problem := _check(args):
        print(f"fluxserve train: error: {problem}", file=sys.stderr)
        return 2
    err = Console(stderr=True)
    settings = settings_from_args(args)
    catalog = Catalog.load(settings.catalog or None)
    if args.model not in catalog.models:
        print(f"fluxserve train: error: --model: unknown model {args.model!r}; known: "
              f"{', '.join(key for key, spec in catalog.models.items() if spec.trainable)}", file=sys.stderr)
        return 2
    try:
        dataset = load_dataset(Path(args.data), edit=args.edit, default_caption=args.caption,
                               limits=DatasetLimits.from_settings(settings))
    except InputError as exc:
        field = "--caption" if exc.field == "default_caption" else "data"
        print(f"fluxserve train: error: {field}: {exc.message}", file=sys.stderr)
        return 2
    for note in dataset.notes:
        err.print(note, markup=False)
    engine = Engine(settings, catalog)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    try:
        with dataset, Progress(*columns, console=err) as bar:  # images are decoded as they are encoded
            task = bar.add_task(f"loading {args.model}" + (" (demo)" if settings.demo else ""), total=None, loss="-")
            engine.load(args.model)
            bar.update(task, description=f"encoding {len(dataset.examples)} images")

            def on_progress(progress) -> None:
                bar.update(task, description="training", completed=progress.step, total=progress.total,
                           loss=f"{progress.loss:.4f}")

            state = engine.train(args.model, dataset.examples, steps=args.steps, learning_rate=args.lr,
                                 rank=args.rank, seed=args.seed, resolution=args.resolution, on_progress=on_progress,
                                 on_note=bar.console.print)
    except InputError as exc:  # an image whose data does not decode is the data's
        field = "data" if exc.field == "image_data_url" else f"--{exc.field}"
        print(f"fluxserve train: error: {field}: {exc.message}", file=sys.stderr)
        return 2
    except (WeightsNotFound, DoesNotFit) as exc:
        print(f"fluxserve train: error: {exc}", file=sys.stderr)
        return 1
    output = Path(args.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    config = {"model": args.model, "steps": args.steps, "learning_rate": args.lr, "rank": args.rank,
              "resolution": args.resolution, "seed": args.seed, "edit": args.edit, "images": len(dataset.examples)}
    save_lora(state, output, format=args.format, metadata={"fluxserve": json.dumps(config)})
    print(f"wrote {output} ({output.stat().st_size} bytes, {args.format} format, rank {args.rank})")
    return 0
