"""``benchmarks/gpu_run.py --tiny``: the GPU run script's very code paths on the CPU with tiny models,
as a user runs it (a subprocess), and its budget: parts and sub-steps that do not fit are skipped and say why."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"
PARTS = ("checks", "dev", "klein", "serving", "whole_request", "kernels", "attention", "lossless", "vae", "encoding",
         "train")


def run_script(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLUXSERVE_GPU_RUN_WORK": str(tmp_path / "work")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args, str(out)], check=False,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return done, out


def load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    done, out = run_script(tmp_path_factory.mktemp("gpu-run"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, out


def test_tiny_run_writes_every_part(tiny_run):
    done, out = tiny_run
    # one file a part, the summary, and the dev part's profiles
    expected = ["summary.json", "profile.json", *(f"{p}.json" for p in PARTS)]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    summary = load(out, "summary")
    assert summary["finished"] is True and summary["run"]["mode"] == "tiny (CPU)"
    assert summary["elapsed_s"] < summary["run"]["budget_s"]
    for part in PARTS:
        entry = summary["parts"][part]
        assert entry["status"] == "ok", entry
        assert entry["seconds"] >= 0 and entry["file"] == f"{part}.json"
        assert load(out, part)["status"] == "ok"
    # progress lines carry timestamps and name what each number came from
    assert "] == klein: ok" in done.stdout
    assert "klein-4b 64x64, 2 steps, regular (fp32) on cpu (tiny models)" in done.stdout


def test_tiny_checks(tiny_run):
    _, out = tiny_run
    checks = load(out, "checks")
    env = checks["environment"]
    for key in ("torch", "diffusers", "transformers", "python"):
        assert env[key]
    matmul = checks["matmul"]
    assert matmul["tokens"] == 16 + 512
    shapes = {(row["out"], row["in"]) for row in matmul["shapes"]}
    assert (3 * matmul["hidden"], matmul["hidden"]) in shapes  # the fused Q/K/V
    for row in matmul["shapes"]:
        assert positive(row["bf16"]["tflops"]) and positive(row["bf16"]["ms"])
        assert "not supported on cpu" in row["fp8_scaled_mm"]["skipped"]
        assert "not supported on cpu" in row["fp8_linear_w8a8"]["skipped"]
    assert "attention" not in checks  # a part of its own


def test_tiny_attention(tiny_run):
    _, out = tiny_run
    attention = load(out, "attention")
    assert set(attention["models"]) == {"dev", "klein-4b"}
    for result in attention["models"].values():
        assert result["chosen"] == "native" and result["decision_high"]["fp8"] is False
        native = result["backends"]["native"]
        assert positive(native["tflops"]) and 0 <= native["rel_error_vs_fp32"] < 0.05  # bf16 against float64
        assert set(native["layouts"]) == {"single", "double"} and native["graph_breaks"] == "none"
        for name in ("_native_cudnn", "fa3", "fa3_fp8"):
            assert "skipped" in result["backends"][name]
    assert all(result["model"] == model for model, result in attention["models"].items())


def test_tiny_kernels(tiny_run):
    _, out = tiny_run
    kernels = load(out, "kernels")
    assert kernels["fused"]["triton"].startswith("not CUDA")  # the torch references run on the CPU
    cases = kernels["fused"]["cases"]
    assert {"layernorm_modulation_quant (b)", "single_block_out_quant (a)"} <= set(cases)
    for row in cases.values():
        assert positive(row["fused_ms"]) and positive(row["compiled_ms"]) and row["bytes"] > 0
        # the torch references are eager PyTorch's math, where the fused op computes the same function
        assert row["fused_vs_eager"]["exact"] is row["same_math"]
    assert kernels["fast_accum"]["gemms"]


def test_tiny_klein_levels(tiny_run):
    _, out = tiny_run
    klein = load(out, "klein")
    assert klein["request"]["width"] == 64 and klein["request"]["steps"] == 2
    assert positive(klein["baseline"]["end_to_end_s"]) and positive(klein["baseline"]["step_ms"])
    assert set(klein["levels"]) == {"none", "regular", "high"}
    for level, row in klein["levels"].items():
        assert row["requested"] == level
        assert row["precision"] == "fp32"  # the CPU's dtype; high runs regular there and says so
        assert positive(row["step_ms"]) and positive(row["end_to_end_s"]) and positive(row["cold_start_s"])
        assert positive(row["vs_diffusers"]["end_to_end"]) and positive(row["vs_diffusers"]["per_step"])
        assert row["mfu"]["value"] is None and "CPU" in row["mfu"]["peak"]
        assert math.isfinite(row["image_rel_error_vs_none"]) and row["image_std"] > 0
        assert row["what"].startswith(f"klein-4b 64x64, 2 steps, {level} (fp32) on cpu")
    assert klein["levels"]["none"]["image_rel_error_vs_none"] == 0
    assert klein["levels"]["regular"]["fused_qkv"] is True and klein["levels"]["none"]["fused_qkv"] is False
    assert klein["levels"]["high"]["level"] == "regular" and klein["levels"]["high"]["notes"]


def test_tiny_dev_levels_and_profile(tiny_run):
    _, out = tiny_run
    dev = load(out, "dev")
    assert dev["tokens"] == 16 + 512 and dev["flops"]["per_step"] > 0
    variants = ("high-unfused", "high-fp8-attention", "high-bf16-attention", "high-fast-accum")
    assert set(dev["levels"]) == {"none", "regular", "high", *variants}
    precisions = {level: row["precision"] for level, row in dev["levels"].items()}
    assert precisions == {"none": "fp32", "regular": "fp32", **dict.fromkeys(("high", *variants), "fp8-weight-only")}
    for name in variants:  # measured on the CPU although every switch resolves as high's there
        assert dev["levels"][name]["rel_error_vs_high"] == 0 and dev["levels"][name]["variant"]
    assert dev["levels"]["high-unfused"]["fused_kernels"] is False
    assert dev["lossless"]["rope-cache"]["bit_identical"] is True
    assert "cuda_graph_replays_per_forward" in dev["lossless"]["graph-partitions"]
    for row in dev["levels"].values():
        assert positive(row["step_ms"]) and positive(row["cold_first_forward_s"])
        assert math.isfinite(row["rel_error_vs_none"])
    assert dev["levels"]["none"]["rel_error_vs_none"] == 0
    assert dev["levels"]["regular"]["rel_error_vs_none"] < 1e-4  # fp32: the same function up to rounding
    assert 0 < dev["levels"]["high"]["rel_error_vs_none"] < 0.2  # FP8 weights, dequantised on the CPU
    assert dev["levels"]["high"]["held"] == "fp8"
    choice = dev["placement_80gb"]
    assert positive(choice["bf16_transformer_streamed_text_encoder"]["step_ms"])
    assert positive(choice["fp8_transformer_fp8_text_encoder"]["step_ms"])
    profiles = load(out, "profile")["levels"]
    assert set(profiles) == {"regular", "high"}
    for level, profile in profiles.items():
        assert profile["level"] == level and profile["activity"] == "CPU operators"
        assert 0 < len(profile["top"]) <= 30 and all(positive(row["ms"]) for row in profile["top"])


def test_tiny_vae_eager_and_compiled(tiny_run):
    _, out = tiny_run
    vae = load(out, "vae")
    assert vae["layout"] == "channels_last" and vae["compile_backend"] == "eager"
    assert positive(vae["eager_ms"]) and positive(vae["compiled_ms"]) and positive(vae["first_compiled_call_s"])
    assert vae["rel_error_vs_eager"] < 1e-5  # the same function


def test_tiny_lossless_savings(tiny_run):
    _, out = tiny_run
    lossless = load(out, "lossless")
    klein = lossless["klein"]
    assert klein["postprocess"]["bit_identical"] is True and klein["postprocess"]["bit_identical_at_boundaries"]
    assert positive(klein["vae_cudnn_benchmark"]["off"]["median_ms"])
    assert klein["text_encoder_compile"]["status"] == "skipped"  # inductor on the CPU: minutes
    assert set(load(out, "summary")["parts"]["lossless"]["headline"]) >= {"postprocess", "vae_cudnn_benchmark"}


def test_tiny_encoding(tiny_run):
    _, out = tiny_run
    encoding = load(out, "encoding")
    assert encoding["size"] == [64, 64] and set(encoding["results"]) == {"png", "jpeg", "webp", "avif", "gif"}
    assert set(encoding["results"]["png"]) == {"fpng", "pillow-default", "pillow-level1"}
    for by_encoder in encoding["results"].values():
        for by_image in by_encoder.values():
            assert all(positive(row["ms"]) and row["bytes"] > 0 for row in by_image.values())
    assert positive(encoding["png_speedup"]["noise"])


def test_tiny_train_steps(tiny_run):
    _, out = tiny_run
    train = load(out, "train")
    assert train["rank"] == 16 and set(train["rows"]) == {"klein-4b", "dev"}
    for row in train["rows"].values():
        assert positive(row["step_s"]) and positive(row["estimated_step_bytes"])
        assert len(row["losses"]) == train["warmup_steps"] + train["measured_steps"]
        assert all(positive(loss) for loss in row["losses"])
    assert train["rows"]["klein-4b"]["precision"] == "float32"
    assert train["rows"]["dev"]["precision"].startswith("fp8 weights")  # [dev] as an 80 GB GPU holds it


def test_tiny_whole_request(tiny_run):
    done, out = tiny_run
    report = load(out, "whole_request")
    assert report["model"] == "dev" and report["request"]["steps"] == 2 and report["request"]["width"] == 64
    cap = report["memory_cap"]
    assert cap["requested_gib"] == 80
    assert set(cap["per_placement"]) == {"default", "bf16_stream"}
    for name, row in report["placements"].items():
        assert row["memory_cap"]["applied"] is False and "not a GPU" in row["memory_cap"]["note"]
        placed = report["placement"][name]
        assert placed["summary"] and placed["as_expected"] is None  # no GPU plan on the CPU
        assert row["requested"]["transformer"] == {"default": "auto", "bf16_stream": "bf16"}[name]
        assert positive(row["build"]["load_s"]) and row["warmup"]["steps"] == 1
        stages = report["stages"][name]
        assert stages["requests"] == 1 and stages["steps"] == 2 and stages["prompt_cache_hits"] == 0
        for stage in ("text_encoding", "denoising", "decoding", "encoding"):
            assert positive(stages["stages_s"][stage]), stage
        assert positive(stages["end_to_end_s"]) and positive(stages["step_ms"])
        assert stages["end_to_end_s"] >= stages["pipeline_s"] > stages["stages_s"]["text_encoding"]
        assert stages["steps_28_s"] > stages["pipeline_s"] and "measured at 2 steps" in stages["steps_28_note"]
        assert stages["peak_allocated_gib"] is None and stages["acceleration"]["level"] == "regular"
        assert row["lifted_cap"]["applied"] is False
    assert "whole_request.bf16_stream: memory cap 80.0 GiB: not applied" in done.stdout


def test_tiny_serving_through_the_server(tiny_run):
    """The demo [klein] through ``fluxserve serve`` by official fal clients at 1 and 2 clients, and the same
    requests through the engine alone: every number there and positive (none judged: no timing assertions)."""
    _, out = tiny_run
    serving = load(out, "serving")
    assert serving["client"]["library"].startswith("fal-client ") and serving["client"]["call"] == "run"
    row = serving["models"]["klein-4b"]
    assert row["endpoint"] == "fal-ai/flux-2/klein/4b" and row["size"] == "512x512" and row["weights"] == "demo models"
    assert set(row["levels"]) == {"1", "2"}
    for level in row["levels"].values():
        assert level["completed"] == level["requests"] == 2 and level["errors"] == 0 and level["images"] == 2
        for key in ("images_per_s", "p50_s", "p95_s", "engine_images_per_s", "engine_images_per_s_in_server",
                    "vs_engine", "wait_p50_s"):
            assert positive(level[key]), (key, level[key])
        assert level["p95_s"] >= level["p50_s"]
        busy = level["gpu_busy"]
        assert busy["nvml"] is None and busy["nvml_note"] == "no NVML on cpu"  # the GPU's NVML counters only
        assert 0 < busy["engine_seconds_over_wall"] <= 1.0
        assert positive(level["stages_p50_s"]["inference"])
    alone = row["engine_alone"]
    assert alone["requests"] == 2 and positive(alone["images_per_s"]) and len(alone["warmup_s"]) == 1
    assert positive(row["added_latency_p50_s"]) and row["added_latency_p50_s"] == row["levels"]["1"]["wait_p50_s"]
    split = row["added_latency_split_p50_s"]
    assert set(split) == {"submit_s", "start_s", "finish_s", "notify_s"}
    assert all(math.isfinite(value) and abs(value) < 5 for value in split.values())  # the jobs of this run
    assert row["saturation"]["engine_images_per_s"] == alone["images_per_s"]
    assert set(row["targets"]) == {"saturation_vs_engine", "added_latency_p50_s"}
    assert all(isinstance(target["met"], bool) for target in row["targets"].values())
    assert row["device"]["type"] == "cpu" and row["placement_matches"] is True
    health = row["server"]["health"]
    assert health["demo"] is True and health["placement"][0]["models"]["klein-4b"]["pipeline"] == "Flux2KleinPipeline"
    assert row["server"]["exit_status"] in (0, -15)  # stopped by SIGTERM (uvicorn re-raises it once shut down)
    headline = load(out, "summary")["parts"]["serving"]["headline"]["klein-4b"]
    assert positive(headline["levels"]["2"]["images_per_s"]) and "through fluxserve serve" in headline["what"]


def test_parts_and_dev_levels_choose_what_runs(tmp_path):
    done, out = run_script(tmp_path, "--parts", "dev,vae", "--dev-levels", "none,regular,high-unfused")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = load(out, "summary")
    assert list(summary["parts"]) == ["dev", "vae"]
    assert summary["run"]["dev_levels"] == ["none", "regular", "high-unfused"]
    dev = load(out, "dev")
    assert set(dev["levels"]) == {"none", "regular"} and set(load(out, "profile")["levels"]) == {"regular"}
    assert dev["skipped"]["high-unfused"] == "high did not run before it"
    assert not (out / "klein.json").exists()
    wrong, _ = run_script(tmp_path / "wrong", "--parts", "dev,warp")
    assert wrong.returncode == 2 and "--parts 'dev,warp': choose from checks, dev, klein" in wrong.stderr


def test_bundle_keeps_every_file_in_one_and_unbundles(tmp_path):
    bundle = tmp_path / "run.json"
    done, out = run_script(tmp_path, "--parts", "checks,vae", "--bundle", str(bundle))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = json.loads(bundle.read_text())["files"]
    assert sorted(files) == ["checks.json", "summary.json", "vae.json"]
    assert files["summary.json"] == load(out, "summary") and files["vae.json"] == load(out, "vae")
    again = subprocess.run([sys.executable, str(SCRIPT), "--unbundle", str(bundle), str(tmp_path / "again")],
                           check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(files)
    assert load(tmp_path / "again", "checks") == load(out, "checks")


def test_sigterm_ends_the_run_and_the_summary_says_so(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLUXSERVE_GPU_RUN_WORK": str(tmp_path / "work")}
    with subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--parts", "checks,dev,vae", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) as run:
        try:
            for line in run.stdout:  # bounded by the run itself: it ends after its three parts
                if "== dev: start" in line:
                    run.send_signal(signal.SIGTERM)
                    break
            rest = run.stdout.read()
            status = run.wait(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
    assert status == 128 + signal.SIGTERM, rest[-3000:]
    summary = load(out, "summary")
    assert summary["finished"] is False and summary["terminated"].startswith(f"signal {int(signal.SIGTERM)}")
    assert "vae" not in summary["parts"]  # nothing ran after it


def test_tiny_budget_skips_parts_and_says_why(tmp_path):
    done, out = run_script(tmp_path, "--budget", "5", timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = load(out, "summary")
    assert summary["finished"] is True
    parts = summary["parts"]
    assert list(parts) == list(PARTS)
    for part in ("klein", "dev"):  # estimated at more than the whole budget
        assert parts[part]["status"] == "skipped"
        assert "needs ~" in parts[part]["skipped"] and "of the 5 s budget" in parts[part]["skipped"]
        assert not (out / f"{part}.json").exists()
    assert all(entry["status"] in ("ok", "skipped") for entry in parts.values())
    assert "klein: skipped (needs ~" in done.stdout


def test_sub_steps_skip_when_their_estimate_does_not_fit(tmp_path):
    done, out = run_script(tmp_path, "--budget", "200", "--estimate", "klein=1000", "--estimate", "dev.high=1000",
                           "--estimate", "checks.matmul=1000", "--estimate", "serving.klein-4b=1000")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    parts = load(out, "summary")["parts"]
    assert parts["klein"]["status"] == "skipped" and "needs ~1000 s" in parts["klein"]["skipped"]
    assert parts["checks"]["status"] == "ok" and "needs ~1000 s" in parts["checks"]["skipped_steps"]["matmul"]
    assert "matmul" not in load(out, "checks") and load(out, "checks")["environment"]["torch"]
    dev = load(out, "dev")
    assert set(dev["levels"]) == {"none", "regular"} and "needs ~1000 s" in dev["skipped"]["high"]
    assert parts["dev"]["status"] == "ok" and "high" in parts["dev"]["skipped_steps"]
    assert set(load(out, "profile")["levels"]) == {"regular"}  # high did not run
    assert "needs ~1000 s" in parts["serving"]["skipped_steps"]["klein-4b"] and load(out, "serving")["models"] == {}
