"""``fluxserve train`` end to end on the demo models: a LoRA file that ``fluxserve generate --lora`` applies
(it changes the image), the ComfyUI format, and errors that name the flag before any model loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

KLEIN_BASE = "fal-ai/flux-2/klein/4b/base"


def run_cli(*args: str, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxserve", *args, "--data-dir", str(data_dir)],
                          check=False, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-data")
    for i in range(3):
        pixels = (np.random.default_rng(i).random((256, 320, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a photo of sks noise")
    return folder


def keys(path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def test_train_writes_a_lora_that_generate_applies(demo_data_dir, tmp_path, images):
    lora = tmp_path / "lora.safetensors"
    done = run_cli("train", str(images), "--demo", "--model", "klein-4b-base", "--caption", "sks noise",
                   "--steps", "6", "--resolution", "64", "--rank", "4", "--lr", "1e-2", "-o", str(lora),
                   data_dir=demo_data_dir)
    assert done.returncode == 0, done.stderr
    assert f"wrote {lora}" in done.stdout and "rank 4" in done.stdout
    assert "6/6" in done.stderr and "loss" in done.stderr  # the progress bar: steps and loss
    assert keys(lora) and all(key.startswith("transformer.") for key in keys(lora))

    outputs = {}
    for name, extra in (("base", ()), ("lora", ("--lora", str(lora)))):
        out = tmp_path / f"{name}.png"
        made = run_cli("generate", "sks noise", "--demo", "--endpoint", KLEIN_BASE, "--size", "512x512",
                       "--steps", "2", "--seed", "5", "--no-safety-checker", *extra, "-o", str(out),
                       data_dir=demo_data_dir)
        assert made.returncode == 0, made.stderr
        outputs[name] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(outputs["lora"] - outputs["base"]).max() > 0  # the trained LoRA changes the image

    comfy = tmp_path / "comfy.safetensors"
    done = run_cli("train", str(images), "--demo", "--model", "klein-4b-base", "--caption", "sks noise",
                   "--steps", "2", "--resolution", "64", "--rank", "4", "--format", "comfy", "-o", str(comfy),
                   data_dir=demo_data_dir)
    assert done.returncode == 0, done.stderr
    assert all(key.startswith("diffusion_model.") for key in keys(comfy))


def test_train_errors_name_the_flag(demo_data_dir, tmp_path, images):
    no_caption = run_cli("train", str(images), "--demo", "-o", str(tmp_path / "x.safetensors"),
                         data_dir=demo_data_dir)
    assert no_caption.returncode == 2 and "--caption" in no_caption.stderr and "2 of 3" in no_caption.stderr
    distilled = run_cli("train", str(images), "--demo", "--model", "klein-4b", "--caption", "c", "--steps", "1",
                        data_dir=demo_data_dir)
    assert distilled.returncode == 2 and "--model" in distilled.stderr and "klein-4b-base" in distilled.stderr
    for args, flag in ((("--steps", "0"), "--steps"), (("--lr", "2"), "--lr"), (("--rank", "0"), "--rank")):
        bad = run_cli("train", str(images), "--demo", "--caption", "c", *args, data_dir=demo_data_dir)
        assert bad.returncode == 2 and flag in bad.stderr, bad.stderr
    missing = run_cli("train", str(tmp_path / "nowhere.zip"), "--demo", data_dir=demo_data_dir)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "x.safetensors").exists()
