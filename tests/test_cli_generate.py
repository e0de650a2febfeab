"""``fluxserve generate`` and ``fluxserve models`` as a user runs them (subprocesses on the demo models)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from PIL import Image

from fluxserve.commands.common import add_model_flags
from fluxserve.commands.generate import ArgumentError, build_request, parse_lora


def run_cli(*args: str, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxserve", *args, "--data-dir", str(data_dir)],
                          check=False, capture_output=True, text=True, timeout=300)


def test_generate_writes_the_file_and_prints_seed_and_timings(demo_data_dir, tmp_path):
    out = tmp_path / "fox.png"
    done = run_cli("generate", "a fox", "--demo", "--size", "640x512", "--steps", "2", "--seed", "3",
                   "--num-images", "2", "-o", str(out), data_dir=demo_data_dir)
    assert done.returncode == 0, done.stderr
    files = [tmp_path / "fox-0.png", tmp_path / "fox-1.png"]
    for path in files:
        assert Image.open(path).size == (640, 512)
        assert f"wrote {path}" in done.stdout
    assert "seed: 3" in done.stdout
    assert "timings: text_encoding" in done.stdout and "inference" in done.stdout
    assert "2/2" in done.stderr  # the progress bar reached the last step


def test_generate_edit_with_reference(demo_data_dir, tmp_path, reference_image):
    out = tmp_path / "edit.jpg"
    done = run_cli("generate", "make it blue", "--demo", "--endpoint", "fal-ai/flux-2/flash/edit",
                   "--image", reference_image(200, 136), "--format", "jpeg", "-o", str(out),
                   data_dir=demo_data_dir)
    assert done.returncode == 0, done.stderr
    image = Image.open(out)
    assert image.format == "JPEG" and image.size == (752, 512)  # auto: the reference's shape, 512 px at least


def test_bad_size_exits_nonzero_naming_the_argument(demo_data_dir):
    done = run_cli("generate", "a fox", "--demo", "--size", "huge", data_dir=demo_data_dir)
    assert done.returncode != 0
    assert "--size" in done.stderr and "landscape_4_3" in done.stderr and "WIDTHxHEIGHT" in done.stderr


def test_unknown_endpoint_lists_the_ids(demo_data_dir):
    done = run_cli("generate", "a fox", "--demo", "--endpoint", "fal-ai/nope", data_dir=demo_data_dir)
    assert done.returncode != 0
    assert "--endpoint" in done.stderr and "fal-ai/flux-2/turbo" in done.stderr


def test_models_lists_endpoints_and_weights(demo_data_dir):
    import json

    done = run_cli("models", "--json", data_dir=demo_data_dir)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert listing["endpoints"]["fal-ai/flux-2/flash"]["model"] == "klein-4b"
    assert "hub black-forest-labs/FLUX.2-dev" in listing["models"]["dev"]["resolves_to"]
    demo = run_cli("models", "--json", "--demo", data_dir=demo_data_dir)
    assert "demo 'klein'" in json.loads(demo.stdout)["models"]["klein-9b"]["resolves_to"]
    # the tables print titles as written: "[dev]" is text, not rich markup
    table = subprocess.run([sys.executable, "-m", "fluxserve", "models", "--data-dir", str(demo_data_dir)],
                           check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert table.returncode == 0 and "FLUX.2 [dev]" in table.stdout and "FLUX.2 [klein] 4B" in table.stdout


def test_version():
    from fluxserve import __version__

    done = subprocess.run([sys.executable, "-m", "fluxserve", "--version"], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"fluxserve {__version__}"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from fluxserve.commands import generate

    generate.add_parser(sub)
    return parser.parse_args(["generate", *argv])


def test_request_takes_the_endpoint_preset(catalog):
    turbo = build_request(parse("a fox", "--endpoint", "fal-ai/flux-2/turbo", "--seed", "1"), catalog)
    assert turbo.model == "dev" and turbo.steps == 8 and turbo.sigmas and len(turbo.sigmas) == 8
    assert turbo.loras[0].path.endswith("flux.2-turbo-lora.safetensors")
    more = build_request(parse("a fox", "--endpoint", "fal-ai/flux-2/turbo", "--steps", "12"), catalog)
    assert more.steps == 12 and more.sigmas is None
    pro = build_request(parse("a fox", "--endpoint", "fal-ai/flux-2-pro", "--size", "square_hd"), catalog)
    assert pro.expand_prompt and pro.output_format == "jpeg" and (pro.width, pro.height) == (1024, 1024)
    assert build_request(parse("a fox", "--no-expand-prompt", "--endpoint", "fal-ai/flux-2-pro"),
                         catalog).expand_prompt is False
    with pytest.raises(ArgumentError, match="--num-images"):
        build_request(parse("a fox", "--num-images", "5"), catalog)
    with pytest.raises(ArgumentError, match="--image"):
        build_request(parse("a fox", "--endpoint", "fal-ai/flux-2/edit"), catalog)
    with pytest.raises(ArgumentError, match="--size"):
        build_request(parse("a fox", "--size", "10x10"), catalog)
    with pytest.raises(ArgumentError, match="between 512 and 2048"):  # the endpoint's own image_size rules
        build_request(parse("a fox", "--endpoint", "fal-ai/flux-2", "--size", "100x100"), catalog)
    with pytest.raises(ArgumentError, match="--image.*no such file"):  # before any model is loaded
        build_request(parse("a fox", "--endpoint", "fal-ai/flux-2/edit", "--image", "/nonexistent/x.png"), catalog)


def test_parse_lora():
    assert parse_lora("hf://owner/repo/x.safetensors:0.8").path == "hf://owner/repo/x.safetensors"
    assert parse_lora("hf://owner/repo/x.safetensors:0.8").scale == 0.8
    assert parse_lora("https://example.com/l.safetensors").path == "https://example.com/l.safetensors"
    assert parse_lora("/tmp/l.safetensors").scale == 1.0


def test_model_flags_are_shared():
    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    assert parser.parse_args(["--demo", "--text-encoder", "fp8"]).text_encoder_placement == "fp8"
    assert parser.parse_args(["--demo", "--transformer", "stream"]).transformer_placement == "stream"
