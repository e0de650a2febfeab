"""Part ``encoding``: milliseconds to encode one output image on the GPU machine's CPU, for each output format and
encoder (``benchmarks/encoding.py``: fpng against Pillow for PNG; JPEG, WebP, AVIF, GIF), at the run's resolution,
on noise (what random weights make) and on a photo-like image. No GPU work: the numbers are the host's."""

from __future__ import annotations

import sys
from pathlib import Path

from gpu_parts.common import Run, log

ESTIMATES = {
    "gpu": {"encoding": 45},
    "tiny": {"encoding": 10},
}


def part(run: Run, report: dict) -> dict:
    benchmarks = str(Path(__file__).resolve().parents[1])
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import encoding

    size = run.scale.width
    result = encoding.measure(size=size, repeat=1 if run.tiny else 3)
    report.update(result)
    for line in encoding.render(result).splitlines():
        log(f"encoding: {line}")
    png = result["results"]["png"]
    return {"what": f"one {size}x{size} image on {result['machine']['cpu']} ({result['machine']['cores']} cores)",
            "png_ms": {name: {kind: row["ms"] for kind, row in by_image.items()} for name, by_image in png.items()},
            "jpeg_ms": {kind: row["ms"] for kind, row in result["results"]["jpeg"]["pillow"].items()},
            "png_speedup_vs_pillow_default": result.get("png_speedup")}
