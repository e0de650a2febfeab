"""``fluxserve bench`` end to end on CPU with the demo models, through the CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluxserve import bench


def test_bench_cli_demo_klein_with_diffusers_baseline(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "fluxserve", "bench", "--demo", "--data-dir", str(tmp_path / "data"),
           "--model", "klein-4b", "--size", "256x256", "--steps", "2", "--baseline", "diffusers",
           "--repeat", "2", "--warmup", "1", "--json", str(out)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage medians" in done.stdout and "speed-up vs diffusers" in done.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "klein-4b" and report["demo"] is True
    assert report["device"]["type"] == "cpu"
    for key in ("torch", "diffusers", "transformers", "name"):
        assert report["device"][key]
    ours = report["fluxserve"]
    for stage in bench.STAGES:
        assert ours["stages_s"][stage] is not None and ours["stages_s"][stage] >= 0
    for stage in ("denoising", "decoding", "inference"):
        assert ours["stages_s"][stage] > 0
    assert ours["step_ms"] > 0 and len(ours["step_ms_all"]) == 2  # 2 runs x (2 steps -> 1 gap)
    assert ours["end_to_end_s"] >= ours["stages_s"]["denoising"]  # text encoding + denoising + decoding
    assert ours["serving_s"] >= ours["end_to_end_s"]  # plus safety and file encoding
    assert report["safety_checker"] is True and "safety checker on" in done.stdout
    # a new prompt every run, so the measured runs encode; the repeated prompt is a cache hit, reported apart
    assert all(t > 0 for t in ours["stages_all_s"]["text_encoding"])
    assert ours["repeated_prompt"]["prompt_cache_hit"] is True
    assert report["precision_summary"] == "transformer held float32, fp32 matmuls"
    assert ours["cold_start_s"] > 0 and "cold start: first request" in done.stdout
    assert ours["resolution_change"]["size"] == "384x128" and ours["resolution_change"]["first_request_s"] > 0
    assert report["request"] == {"width": 256, "height": 256, "steps": 2, "refs": 0, "num_images": 1,
                                 "guidance": 1.0, "acceleration": "regular", "warmup": 1, "repeat": 2, "seed": 0}
    assert report["acceleration"]["level"] == "regular" and report["acceleration"]["fused_qkv"] is True
    assert report["placement"]["models"]["klein-4b"]["text_encoder"] == "resident"
    assert report["flops"]["tokens"] == 16 * 16 + 512 and report["flops"]["per_step"] > 0
    assert report["mfu"]["value"] is None and "CPU" in report["mfu"]["peak"]
    base = report["baseline"]
    assert base["name"] == "diffusers" and base["end_to_end_s"] > 0 and base["step_ms"] > 0
    assert report["speedup"]["end_to_end"] > 0 and report["speedup"]["per_step"] > 0


def test_bench_load_failure_is_one_line(tmp_path):
    catalog = tmp_path / "catalog.toml"
    packaged = (Path(bench.__file__).parent / "catalog.toml").read_text()
    catalog.write_text(packaged.replace('weights = "black-forest-labs/FLUX.2-klein-4B"',
                                        f'weights = "{tmp_path / "nowhere"}"'))
    cmd = [sys.executable, "-m", "fluxserve", "bench", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
           "--catalog", str(catalog), "--model", "klein-4b", "--steps", "1", "--repeat", "1", "--warmup", "0"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("fluxserve bench: could not load klein-4b: WeightsNotFound")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_bench_refuses_random_weights_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "fluxserve", "bench", "--device", "cpu", "--data-dir", str(tmp_path),
           "--model", "klein-4b", "--random-weights", "--steps", "1"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--random-weights" in done.stderr and "--demo" in done.stderr


@pytest.mark.parametrize(
    ("kwargs", "tflop"),
    [
        # docs/performance.md: dev 1024^2 282.5 TFLOP, with one 1024^2 reference 583, dev 2048^2 1321,
        # klein 4B 1024^2 34.8.
        ({"hidden": 6144, "layers": 56, "image_tokens": 4096}, 282.5),
        ({"hidden": 6144, "layers": 56, "image_tokens": 4096, "ref_tokens": 4096}, 583),
        ({"hidden": 6144, "layers": 56, "image_tokens": 16384}, 1321),
        ({"hidden": 3072, "layers": 25, "image_tokens": 4096}, 34.8),
    ],
)
def test_flops_match_the_floor_table(kwargs, tflop):
    flops = bench.transformer_flops(mlp_ratio=3.0, text_tokens=512, **kwargs)
    assert flops["forward"] / 1e12 == pytest.approx(tflop, rel=0.01)


def test_flops_from_the_real_configs_and_peaks():
    from fluxserve.engine.random_weights import build_transformer

    config = build_transformer("dev", "meta").config
    assert bench.config_flops(config, 1024, 1024, [])["forward"] / 1e12 == pytest.approx(282.5, rel=0.01)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989e12
    assert bench.peak_flops("NVIDIA H200", "fp8-w8a8")[0] == 1979e12
    # FP8 weights multiplied in bf16 run at bf16 rates
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "fp8-weight-only")[0] == 989e12
    assert bench.peak_flops("NVIDIA A10G", "bf16")[0] is None
