"""Milliseconds to encode one image, for each output format and encoder, on this machine's CPU.

    python benchmarks/encoding.py [--size 1024] [--repeat 5] [--json OUT]

Every format (png, jpeg, webp, avif, gif) goes through ``fluxserve.engine.encode.encode_image`` at fluxserve's
defaults with the engine's metadata embedded: what one output file costs a request. PNG is measured three ways:
``fpng`` (fluxserve's PNG), ``pillow-default`` (Pillow's ``Image.save(..., "PNG")``, zlib level 6) and
``pillow-level1`` (zlib level 1, fluxserve's PNG before fpng). Two images: ``noise`` (what random-weight models
make, PNG's worst case) and ``smooth`` (gradients with grain, compressing like a photo). Each number is the
median of ``--repeat`` encodes after one warm-up, on one thread; the CPU model and core count are printed with
them. ``measure()`` returns the same as a dict, for scripts that run it among other parts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "fluxserve").is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import numpy as np
from PIL import Image

from fluxserve.engine.encode import FORMATS, encode_image, png_encoder

IMAGES = ("noise", "smooth")
PNG_ENCODERS = ("fpng", "pillow-default", "pillow-level1")
METADATA = {"prompt": "a lighthouse at dusk, volumetric light, 35mm", "seed": 1234, "model": "klein-4b",
            "model_title": "FLUX.2 [klein] 4B", "steps": 4, "guidance": 1.0, "width": 1024, "height": 1024}


def synthetic_image(kind: str, size: int) -> Image.Image:
    """A seeded ``size`` x ``size`` RGB image: ``noise`` (uniform random) or ``smooth`` (gradients + grain)."""
    rng = np.random.default_rng(0)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    y, x = np.mgrid[0:size, 0:size] / size
    planes = np.stack([np.sin(6 * x + 2 * y), np.cos(4 * x * y + 3 * x), x + y - 1], axis=-1)
    pixels = planes * 100 + 128 + rng.normal(0, 4, planes.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoders(fmt: str) -> dict[str, Callable[[Image.Image], bytes]]:
    """The encoders measured for ``fmt``, by name."""
    if fmt != "png":
        return {"pillow": lambda image: encode_image(image, fmt, None, METADATA)}

    def pillow(level: int | None) -> Callable[[Image.Image], bytes]:
        def save(image: Image.Image) -> bytes:
            out = io.BytesIO()
            image.save(out, "PNG", **({} if level is None else {"compress_level": level}))
            return out.getvalue()
        return save

    return {"fpng": lambda image: encode_image(image, "png", None, METADATA),
            "pillow-default": pillow(None), "pillow-level1": pillow(1)}


def machine() -> dict:
    """The CPU model, its cores, the load average (other work on the machine) and the encoders' versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("pillow", "fpng"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None  # what else ran meanwhile
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load, "python": platform.python_version(),
            **versions}


def measure(size: int = 1024, repeat: int = 5, formats: tuple[str, ...] = FORMATS,
            images: tuple[str, ...] = IMAGES) -> dict:
    """``results[format][encoder][image] = {"ms", "min_ms", "bytes"}`` (median and fastest of ``repeat`` encodes
    after a warm-up), with the machine, and ``png_speedup[image]``: Pillow's default PNG time over fpng's."""
    pictures = {kind: synthetic_image(kind, size) for kind in images}
    if "png" in formats and png_encoder(pictures[images[0]]) != "fpng":
        raise RuntimeError("fpng is not installed: fluxserve writes PNGs with Pillow here (pip install fpng)")
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for fmt in formats:
        for name, encode in encoders(fmt).items():
            for kind, picture in pictures.items():
                data = encode(picture)  # warm-up
                times = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    data = encode(picture)
                    times.append((time.perf_counter() - start) * 1000)
                results.setdefault(fmt, {}).setdefault(name, {})[kind] = {
                    "ms": statistics.median(times), "min_ms": min(times), "bytes": len(data)}
    report = {"machine": machine(), "size": [size, size], "repeat": repeat, "results": results}
    if "png" in results:
        png = results["png"]
        report["png_speedup"] = {kind: png["pillow-default"][kind]["ms"] / png["fpng"][kind]["ms"] for kind in images}
    return report


def render(report: dict) -> str:
    """The report as a table."""
    info = report["machine"]
    width, height = report["size"]
    kinds = list(next(iter(next(iter(report["results"].values())).values())))
    lines = [(f"{info['cpu']} ({info['cores']} cores, load average {info['load_average']}), Python "
              f"{info['python']}, Pillow {info['pillow']}, fpng {info['fpng']}; {width}x{height}, median of "
              f"{report['repeat']}"),
             f"{'format':<7}{'encoder':<16}" + "".join(f"{kind + ' ms (MB)':>22}" for kind in kinds)]
    for fmt, by_encoder in report["results"].items():
        for name, by_image in by_encoder.items():
            cells = "".join(f"{by_image[k]['ms']:>13.1f} ({by_image[k]['bytes'] / 1e6:5.2f})" for k in kinds)
            lines.append(f"{fmt:<7}{name:<16}{cells}")
    if "png_speedup" in report:
        lines.append("PNG, fpng against Pillow's default: " + ", ".join(
            f"{ratio:.1f}x ({kind})" for kind, ratio in report["png_speedup"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="side of the square images (default 1024)")
    parser.add_argument("--repeat", type=int, default=5, help="timed encodes per number (default 5)")
    parser.add_argument("--format", action="append", choices=FORMATS, help="formats (default: all)")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = measure(args.size, args.repeat, tuple(args.format or FORMATS))
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
