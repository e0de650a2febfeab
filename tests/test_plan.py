"""The memory plan (``fluxserve.engine.plan``) with the published component sizes, and ``fluxserve plan``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fluxserve.engine import plan
from fluxserve.engine import random_weights as rw

GIB = 1024**3


@pytest.fixture(scope="module")
def sizes() -> dict[str, dict[str, int]]:
    """Bytes of the published architectures (meta-device builds: nothing allocated)."""
    return {model: rw.meta_sizes(rw.build_meta_pipeline(model)) for model in rw.MODELS}


def chosen(result: plan.MemoryPlan) -> tuple[str, str]:
    return result.transformer, result.text_encoder


def test_published_sizes(sizes):
    dev = sizes["dev"]
    assert 60 * GIB < dev["transformer"] < 62 * GIB  # 64.4 GB
    assert 44 * GIB < dev["text_encoder"] < 46 * GIB  # 48 GB (Mistral Small 3.2 with its vision tower)
    # streamed: what stays outside the repeated layers plus two of them
    assert 2 * GIB < dev["transformer_stream"] < 7 * GIB
    assert 2 * GIB < dev["text_encoder_stream"] < 7 * GIB
    assert sizes["klein-4b"]["transformer"] < 8 * GIB and sizes["klein-4b"]["text_encoder"] < 8 * GIB


def test_dev_on_80_gib_offers_the_two_honest_placements(sizes):
    result = plan.plan_memory(sizes["dev"], free_bytes=80 * GIB)
    assert chosen(result) == ("fp8", "fp8")  # the default: FP8 weights and FP8 matmuls, prompt expansion works
    fitting = [(o.transformer, o.text_encoder) for o in result.options if o.fits]
    assert ("bf16", "stream") in fitting  # lossless denoising, the text encoder streamed
    assert ("bf16", "resident") not in fitting and ("bf16", "fp8") not in fitting
    assert result.needed_bytes <= result.free_bytes and result.reserve_bytes == int(0.08 * 80 * GIB)
    forced = plan.plan_memory(sizes["dev"], free_bytes=80 * GIB, transformer="bf16")
    assert chosen(forced) == ("bf16", "stream")


def test_without_fp8_matmuls_the_lossless_placement_comes_first(sizes):
    result = plan.plan_memory(sizes["dev"], free_bytes=80 * GIB, fp8_matmul=False)
    assert chosen(result) == ("bf16", "stream")  # dequantising FP8 weights every step would be slower


@pytest.mark.parametrize(("model", "gib", "expected"), [
    ("dev", 141, ("bf16", "resident")),
    ("klein-4b", 24, ("bf16", "resident")),
    ("klein-9b", 80, ("bf16", "resident")),
    ("dev", 16, ("stream", "stream")),
])
def test_placements_by_gpu_size(sizes, model, gib, expected):
    assert chosen(plan.plan_memory(sizes[model], free_bytes=gib * GIB)) == expected


def test_nothing_fits_names_the_smallest_need(sizes):
    with pytest.raises(plan.DoesNotFit, match=r"smallest \(transformer streamed, text encoder streamed\) needs"):
        plan.plan_memory(sizes["dev"], free_bytes=8 * GIB)
    with pytest.raises(plan.DoesNotFit, match="--transformer bf16 --text-encoder resident"):
        plan.plan_memory(sizes["dev"], free_bytes=80 * GIB, transformer="bf16", text_encoder="resident")


def test_forced_choices_and_unknown_ones():
    assert plan.candidates("fp8", "auto") == [("fp8", "resident"), ("fp8", "fp8"), ("fp8", "stream")]
    assert plan.candidates("auto", "stream") == [("bf16", "stream"), ("fp8", "stream"), ("stream", "stream")]
    assert plan.candidates("stream", "fp8") == [("stream", "fp8")]
    with pytest.raises(ValueError, match="auto, resident, fp8, stream"):
        plan.candidates("auto", "gpu")
    with pytest.raises(ValueError, match="auto, bf16, fp8, stream"):
        plan.candidates("int4", "auto")


def test_headroom_and_footprints():
    assert plan.headroom_bytes(16 * GIB) == 4 * GIB
    assert plan.headroom_bytes(141 * GIB) == int(0.08 * 141 * GIB)
    # one 4x8 Linear in FP8: 32 bytes less one per weight, 8 bytes of scales per row
    assert plan.fp8_footprint(100, [(4, 8)], 2) == 100 - 32 + 32
    named = [("embed.weight", 10), ("layers.0.w", 5), ("layers.0.b", 1), ("layers.1.w", 7), ("layers.2.w", 3),
             ("norm.weight", 2)]
    assert plan.stream_footprint("text_encoder", named) == 12 + 2 * 7
    assert plan.stream_footprint("text_encoder", named[:4]) == 23  # two layers: all of it, never more
    vision = [("model.vision_tower.transformer.layers.0.w", 4)] + [
        (f"model.language_model.layers.{i}.w", 3) for i in range(3)]
    assert plan.stream_footprint("text_encoder", vision) == 4 + 2 * 3  # the vision tower is not streamed


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxserve", "plan", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_plan_command_80_gib_marks_the_default():
    done = run_plan("--gpu-memory", "80GiB", "--model", "dev")
    assert done.returncode == 0, done.stderr
    default = [line for line in done.stdout.splitlines() if line.startswith("  * ")]
    assert len(default) == 1 and "transformer FP8, text encoder FP8" in default[0]
    alternative = [line for line in done.stdout.splitlines() if "transformer bf16, text encoder streamed" in line]
    assert alternative and " fits " in alternative[0] and "no prompt expansion" in alternative[0]
    assert "regular  FP8 matmuls" in done.stdout


def test_plan_command_json_for_each_gpu_size():
    done = run_plan("--gpu-memory", "141GiB", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    by_model = {m["model"]: m for m in report["models"]}
    assert set(by_model) == {"dev", "klein-4b", "klein-9b"}
    dev = by_model["dev"]["plan"]
    assert (dev["transformer"], dev["text_encoder"]) == ("bf16", "resident")
    assert "does not fit beside the bf16 weights" in by_model["dev"]["acceleration"]["high"]

    small = json.loads(run_plan("--gpu-memory", "24GiB", "--model", "klein-4b", "--json").stdout)["models"][0]
    assert (small["plan"]["transformer"], small["plan"]["text_encoder"]) == ("bf16", "resident")

    tiny = run_plan("--gpu-memory", "16GiB", "--model", "dev")
    assert tiny.returncode == 0 and "dev cannot be resident" in tiny.stdout
    assert "stream the transformer from host memory" in tiny.stdout


def test_plan_command_needs_a_size_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the plan uses its free memory")
    done = run_plan("--model", "klein-4b")
    assert done.returncode == 2 and "--gpu-memory" in done.stderr


# ---- LoRA training ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steps() -> dict[str, int]:
    """One training step's working memory at 1024x1024, rank 16: text-to-image and with one start image."""
    from fluxserve.training.trainer import step_bytes

    out = {}
    for model in ("dev", "klein-4b", "klein-9b"):
        transformer = rw.build_transformer(model, "meta")
        out[model] = step_bytes(transformer, resolution=1024, rank=16)
        out[f"{model}/edit"] = step_bytes(transformer, resolution=1024, rank=16, references=1)
    return out


def test_training_step_memory_grows_with_the_tokens(steps):
    assert 5 * GIB < steps["dev"] < 9 * GIB  # checkpointed block inputs + one recomputed block + LoRA and AdamW
    assert steps["dev/edit"] > steps["dev"] + 4 * GIB  # a 1024x1024 start image adds 4096 tokens
    assert steps["klein-4b"] < steps["klein-9b"] < steps["dev"]


def test_dev_on_80_gib_trains_on_its_fp8_base_beside_the_text_encoder(sizes, steps):
    serving = plan.plan_memory(sizes["dev"], free_bytes=80 * GIB)
    trained = plan.plan_training(sizes["dev"], transformer=serving.transformer, text_encoder=serving.text_encoder,
                                 step_bytes=steps["dev"], free_bytes=80 * GIB)
    assert (trained.transformer, trained.offload_text_encoder) == ("fp8", False)
    assert trained.needed_bytes <= 80 * GIB
    # the bf16 alternative (text encoder streamed) trains too: bf16 where it fits
    bf16 = plan.plan_training(sizes["dev"], transformer="bf16", text_encoder="stream", step_bytes=steps["dev"],
                              free_bytes=80 * GIB)
    assert bf16.transformer == "bf16" and "streamed" in bf16.describe()


def test_the_text_encoder_leaves_the_gpu_only_when_the_step_needs_the_room(sizes, steps):
    dev = sizes["dev"]
    need = dev["transformer"] + dev["vae"] + steps["dev"] + plan.headroom_bytes(120 * GIB)
    assert need + dev["text_encoder"] > 120 * GIB >= need
    moved = plan.plan_training(dev, transformer="bf16", text_encoder="resident", step_bytes=steps["dev"],
                               free_bytes=120 * GIB)
    assert moved.offload_text_encoder and moved.needed_bytes == need
    assert "moved to host memory during the steps" in moved.describe()
    kept = plan.plan_training(dev, transformer="bf16", text_encoder="resident", step_bytes=steps["dev"],
                              free_bytes=141 * GIB)
    assert not kept.offload_text_encoder
    assert kept.needed_bytes == (dev["transformer"] + dev["text_encoder"] + dev["vae"] + steps["dev"]
                                 + plan.headroom_bytes(141 * GIB))


def test_training_refuses_a_streamed_transformer_and_too_little_memory(sizes, steps):
    with pytest.raises(plan.DoesNotFit, match="--transformer fp8"):
        plan.plan_training(sizes["dev"], transformer="stream", text_encoder="stream", step_bytes=steps["dev"],
                           free_bytes=24 * GIB)
    with pytest.raises(plan.DoesNotFit, match=r"needs 7\d\.\d GiB .*hold the transformer in FP8"):
        plan.plan_training(sizes["dev"], transformer="bf16", text_encoder="stream", step_bytes=steps["dev"],
                           free_bytes=64 * GIB)


def test_plan_command_shows_training_placements():
    report = json.loads(run_plan("--gpu-memory", "24GiB", "--json").stdout)
    by_model = {m["model"]: m for m in report["models"]}
    klein = by_model["klein-4b"]["training"]
    assert klein["model"] == "klein-4b-base" and klein["resolution"] == 1024 and klein["rank"] == 16
    assert all(row["fits"] for row in klein["plans"].values())  # klein base trains on a 24 GB GPU
    nine = by_model["klein-9b"]["training"]["plans"]["text-to-image"]
    assert nine["fits"] and nine["transformer"] == "fp8" and nine["offload_text_encoder"]
    dev = by_model["dev"]["training"]["plans"]["text-to-image"]
    assert not dev["fits"] and "streamed" in dev["message"]

    text = run_plan("--gpu-memory", "80GiB", "--model", "dev", "--train-resolution", "512").stdout
    assert "training dev (LoRA rank 16, 512x512" in text
    assert "frozen transformer FP8" in text and "edit, 1 start image" in text
