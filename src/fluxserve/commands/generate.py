"""``fluxserve generate "PROMPT"``: one generation in this process, with the endpoint's preset, a progress bar
per denoising step, then the files written, the seed and the timings."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fluxserve.commands.common import add_model_flags, settings_from_args

FORMATS = ("png", "jpeg", "webp", "avif", "gif")
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "avif": ".avif", "gif": ".gif"}
_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ArgumentError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate images from a prompt (and reference images) in this process",
        description=__doc__,
    )
    parser.add_argument("prompt", help="the prompt")
    parser.add_argument("--endpoint", default="fal-ai/flux-2",
                        help="catalogue endpoint whose model and preset to use (default: fal-ai/flux-2); "
                        "see `fluxserve models`")
    parser.add_argument("--image", action="append", default=[], metavar="REF",
                        help="reference image (path, URL or data URI) for an edit endpoint; repeatable")
    parser.add_argument("--size", help="fal size enum (landscape_4_3, square_hd, ...) or WIDTHxHEIGHT "
                        "(default: 1024x768, or the first reference's size when editing)")
    parser.add_argument("--seed", type=int, help="random seed (default: drawn and printed)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the endpoint's preset)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the endpoint's preset)")
    parser.add_argument("--num-images", type=int, default=1, help="images in one batch, 1-4 (default 1)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA (path, URL or hf://owner/repo/file) with an optional scale; repeatable")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: the endpoint's)")
    parser.add_argument("--quality", type=int, help="JPEG/WebP/AVIF quality 0-100")
    expand = parser.add_mutually_exclusive_group()
    expand.add_argument("--expand-prompt", dest="expand_prompt", action="store_true", default=None,
                        help="expand the prompt with the text encoder (default: the endpoint's preset)")
    expand.add_argument("--no-expand-prompt", dest="expand_prompt", action="store_false")
    parser.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                        help="skip the NSFW check of the outputs")
    parser.add_argument("--acceleration", choices=("none", "regular", "high"), default="regular",
                        help="acceleration level (default: regular)")
    parser.add_argument("-o", "--output", help="output file, or a directory (default: ./fluxserve-<seed>.<ext>); "
                        "with several images -0, -1, ... are appended")
    add_model_flags(parser)
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace, catalog):
    """The canonical request for these arguments, from the endpoint's preset. Raises ArgumentError."""
    from fluxserve.request import GenerationRequest, LoraSpec
    from fluxserve.sizes import FAL_MIN_SIDE

    try:
        endpoint = catalog.endpoint(args.endpoint)
    except KeyError:
        raise ArgumentError("--endpoint", f"unknown endpoint {args.endpoint!r}; known endpoints: "
                            + ", ".join(sorted(catalog.endpoints))) from None
    if endpoint.is_training:
        raise ArgumentError("--endpoint", f"{endpoint.id} trains LoRAs: use fluxserve train --model {endpoint.model}")
    if args.image and not endpoint.is_edit:
        raise ArgumentError("--image", f"endpoint {endpoint.id} is text-to-image; use an edit endpoint such as "
                            f"{endpoint.id.rstrip('/')}/edit for reference images")
    if endpoint.is_edit and not args.image:
        raise ArgumentError("--image", f"endpoint {endpoint.id} edits images: give at least one --image")
    if endpoint.max_references and len(args.image) > endpoint.max_references:
        raise ArgumentError("--image", f"{len(args.image)} given; {endpoint.id} takes at most "
                            f"{endpoint.max_references} reference images")
    width, height = parse_size(args.size)
    if not 1 <= args.num_images <= 4:
        raise ArgumentError("--num-images", f"{args.num_images} is out of range; allowed: 1-4")
    if args.steps is not None and not 1 <= args.steps <= 100:
        raise ArgumentError("--steps", f"{args.steps} is out of range; allowed: 1-100")
    if args.quality is not None and not 0 <= args.quality <= 100:
        raise ArgumentError("--quality", f"{args.quality} is out of range; allowed: 0-100")
    steps = args.steps or endpoint.steps
    sigmas = list(endpoint.sigmas) if endpoint.sigmas and steps == len(endpoint.sigmas) else None
    loras = list(endpoint.loras) + [parse_lora(value) for value in args.lora]
    return GenerationRequest(
        model=endpoint.model,
        prompt=args.prompt,
        image_urls=[_reference(ref) for ref in args.image],
        width=width,
        height=height,
        min_side=FAL_MIN_SIDE,  # as the API: an auto size holds to the endpoint's 512-pixel minimum
        num_images=args.num_images,
        seed=args.seed,
        steps=steps,
        guidance=endpoint.guidance if args.guidance is None else args.guidance,
        sigmas=sigmas,
        loras=[LoraSpec(path=lora.path, scale=lora.scale) for lora in loras],
        expand_prompt=endpoint.expand_prompt if args.expand_prompt is None else args.expand_prompt,
        safety_checker=args.safety_checker,
        acceleration=args.acceleration,
        output_format=args.format or endpoint.output_format,
        output_quality=args.quality,
    )


def parse_size(value: str | None) -> tuple[int | None, int | None]:
    """``--size`` by the endpoint's own schema (fal's ``image_size``: an enum, or each side 512-2048)."""
    from fluxserve.sizes import FAL_IMAGE_SIZES, FAL_MAX_SIDE, FAL_MIN_SIDE

    if value is None or value == "auto":
        return None, None
    if value in FAL_IMAGE_SIZES:
        return FAL_IMAGE_SIZES[value]
    match = _WXH.match(value)
    if not match:
        raise ArgumentError("--size", f"{value!r} is not a size; allowed: {', '.join(FAL_IMAGE_SIZES)}, auto, "
                            "or WIDTHxHEIGHT such as 1024x768")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not FAL_MIN_SIDE <= side <= FAL_MAX_SIDE:
            raise ArgumentError("--size", f"{value!r}: each side must be between {FAL_MIN_SIDE} and "
                                f"{FAL_MAX_SIDE} pixels, as the endpoint's image_size allows")
    return width, height


def parse_lora(value: str):
    from fluxserve.request import LoraSpec

    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head and not tail.startswith("//"):
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = value
    if not path:
        raise ArgumentError("--lora", f"{value!r} has no path; use PATH[:SCALE]")
    return LoraSpec(path=path, scale=scale)


def _reference(ref: str) -> str:
    """A URL or data URI as given; a local path resolved, and checked before any model loads."""
    if ref.startswith(("http://", "https://", "data:")):
        return ref
    path = Path(ref.removeprefix("file://")).expanduser().resolve()
    if not path.is_file():
        raise ArgumentError("--image", f"{ref!r}: no such file")
    return str(path)


def output_paths(output: str | None, seed: int, count: int, fmt: str) -> list[Path]:
    ext = EXTENSIONS[fmt]
    if output is None:
        base = Path(f"fluxserve-{seed}{ext}")
    else:
        base = Path(output).expanduser()
        if base.is_dir() or output.endswith(("/", "\\")):
            base = base / f"fluxserve-{seed}{ext}"
        elif not base.suffix:
            base = base.with_suffix(ext)
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fluxserve.catalog import Catalog
    from fluxserve.engine import Engine, WeightsNotFound
    from fluxserve.request import InputError

    err = Console(stderr=True)
    settings = settings_from_args(args)
    try:
        catalog = Catalog.load(settings.catalog or None)
        request = build_request(args, catalog)
    except ArgumentError as exc:
        print(f"fluxserve generate: error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(settings, catalog)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task(f"loading {request.model}" + (" (demo)" if settings.demo else ""), total=None)
            engine.load(request.model)

            def on_progress(progress) -> None:
                bar.update(task, description="denoising", completed=progress.step, total=progress.total)

            bar.update(task, description="encoding prompt")
            result = engine.generate(request, on_progress=on_progress)
    except InputError as exc:
        print(f"fluxserve generate: error: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except WeightsNotFound as exc:
        print(f"fluxserve generate: error: {exc}", file=sys.stderr)
        return 1
    paths = output_paths(args.output, result.seed, len(result.images), request.output_format)
    for path, image in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
        flag = "  (flagged NSFW: blacked out)" if image.nsfw else ""
        print(f"wrote {path} ({image.width}x{image.height}, {image.content_type}){flag}")
    print(f"seed: {result.seed}")
    if result.prompt != request.prompt:
        print(f"prompt: {result.prompt}")
    print("timings: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.timings.items()))
    return 0
