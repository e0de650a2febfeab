"""``benchmarks/encoding.py`` run small: every format and encoder gets a positive time and size, in its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def encoding_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import encoding

    yield encoding
    sys.modules.pop("encoding", None)


def test_the_encoding_benchmark_measures_every_format_and_encoder(encoding_bench, tmp_path, capsys):
    out = tmp_path / "encoding.json"
    assert encoding_bench.main(["--size", "64", "--repeat", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["size"] == [64, 64] and report["repeat"] == 1
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert set(report["results"]) == {"png", "jpeg", "webp", "avif", "gif"}
    assert set(report["results"]["png"]) == {"fpng", "pillow-default", "pillow-level1"}
    for fmt in ("jpeg", "webp", "avif", "gif"):
        assert set(report["results"][fmt]) == {"pillow"}
    for by_encoder in report["results"].values():
        for by_image in by_encoder.values():
            assert set(by_image) == {"noise", "smooth"}
            for number in by_image.values():
                assert number["ms"] > 0 and number["min_ms"] > 0 and number["bytes"] > 0
    assert set(report["png_speedup"]) == {"noise", "smooth"} and all(v > 0 for v in report["png_speedup"].values())
    printed = capsys.readouterr().out
    assert report["machine"]["cpu"] in printed and "pillow-level1" in printed and "avif" in printed


def test_the_synthetic_images_are_what_they_say(encoding_bench):
    noise, smooth = (encoding_bench.synthetic_image(kind, 64) for kind in ("noise", "smooth"))
    assert noise.size == smooth.size == (64, 64) and noise.mode == smooth.mode == "RGB"
    # the smooth image compresses far better than noise, as a photo does
    png = encoding_bench.encoders("png")["pillow-default"]
    assert len(png(smooth)) < 0.8 * len(png(noise))
