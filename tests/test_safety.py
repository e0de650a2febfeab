"""The safety checker: the Falconsai ViT architecture loaded through from_pretrained, tolerance thresholds,
blackout of flagged images, and load errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.safety import (
    DEFAULT_SAFETY_MODEL,
    SafetyChecker,
    SafetyModelError,
    blackout,
    build_demo_checker,
    threshold,
)


def photo(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def checkers(tmp_path_factory) -> dict[str, SafetyChecker]:
    root = tmp_path_factory.mktemp("safety")
    return {
        "demo": SafetyChecker.load(build_demo_checker(root / "demo")),
        "flag": SafetyChecker.load(build_demo_checker(root / "flag", always_flag=True)),
        "p90": SafetyChecker.load(build_demo_checker(root / "p90", nsfw_probability=0.90)),
        "p60": SafetyChecker.load(build_demo_checker(root / "p60", nsfw_probability=0.60)),
    }


def test_threshold_table():
    assert threshold(2) == 0.85  # the official FLUX.2 CLI's threshold is fal's default tolerance
    values = [threshold(t) for t in range(1, 6)]
    assert values == sorted(values) and len(set(values)) == 5  # 1 strictest ... 5 most permissive
    for bad in (0, 6):
        with pytest.raises(ValueError, match="safety_tolerance"):
            threshold(bad)


def test_demo_checker_has_the_real_architecture(tmp_path: Path):
    directory = build_demo_checker(tmp_path / "checker")
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in directory.iterdir()}
    checker = SafetyChecker.load(directory)
    assert type(checker.model).__name__ == "ViTForImageClassification"
    assert checker.model.config.id2label == {0: "normal", 1: "nsfw"}
    assert checker.model.config.image_size == 224
    processed = checker.processor(images=[photo(0)], return_tensors="pt")["pixel_values"]
    assert tuple(processed.shape) == (1, 3, 224, 224)


def test_demo_checker_is_deterministic_and_sees_the_image(tmp_path: Path):
    a = SafetyChecker.load(build_demo_checker(tmp_path / "a", seed=3))
    b = SafetyChecker.load(build_demo_checker(tmp_path / "b", seed=3))
    images = [photo(1), photo(2, (300, 200)), Image.new("RGB", (50, 50), "white")]
    scores = a.scores(images)
    assert scores == b.scores(images)
    assert len(set(scores)) == 3  # random weights: the score depends on the pixels


def test_default_demo_checker_passes_ordinary_images(checkers):
    assert checkers["demo"].check([photo(1), photo(2)], tolerance=1) == [False, False]
    assert all(score < 0.1 for score in checkers["demo"].scores([photo(1), photo(2)]))


def test_flagged_image_is_blacked_out(checkers):
    images = [photo(5), photo(6, (120, 80))]
    flags = checkers["flag"].check(images, tolerance=5)  # flagged even at the most permissive tolerance
    assert flags == [True, True]
    outputs = [blackout(image) if flagged else image for image, flagged in zip(images, flags)]
    for original, output in zip(images, outputs):
        assert output.size == original.size and output.mode == original.mode
        assert output.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_tolerance_changes_the_decision_for_a_mid_probability(checkers):
    image = [photo(7)]
    assert checkers["p90"].scores(image)[0] == pytest.approx(0.90, abs=1e-5)
    assert checkers["p90"].check(image, tolerance=2) == [True]  # 0.90 > 0.85
    assert checkers["p90"].check(image, tolerance=3) == [False]  # 0.90 <= 0.93
    assert checkers["p60"].check(image, tolerance=1) == [True]  # 0.60 > 0.50
    assert checkers["p60"].check(image, tolerance=2) == [False]


def test_blackout_keeps_mode_and_alpha_is_opaque():
    rgba = blackout(Image.new("RGBA", (4, 3), (255, 0, 0, 10)))
    assert rgba.mode == "RGBA" and rgba.size == (4, 3) and rgba.getpixel((0, 0)) == (0, 0, 0, 255)
    assert blackout(Image.new("L", (2, 2), 200)).getpixel((1, 1)) == 0


def test_empty_batch(checkers):
    assert checkers["demo"].check([], tolerance=2) == []


def test_missing_local_directory_says_where_and_how(tmp_path: Path):
    missing = tmp_path / "no-such-checker"
    with pytest.raises(SafetyModelError) as info:
        SafetyChecker.load(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "local directory" in message
    assert DEFAULT_SAFETY_MODEL in message  # how to get the real one
    assert "HF_TOKEN" in message and "HF_HUB_OFFLINE" in message


def test_missing_hub_model_offline_says_where_and_how(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SafetyModelError) as info:
        SafetyChecker.load(DEFAULT_SAFETY_MODEL)
    message = str(info.value)
    assert repr(DEFAULT_SAFETY_MODEL) in message
    assert str(tmp_path / "empty-cache") in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "HF_TOKEN" in message


# ---- through the engine: a checker that always flags ---------------------------------------------------------
def test_engine_blacks_out_and_flags(demo_data_dir: Path, catalog, tmp_path: Path):
    import io

    from fluxserve.config import Settings
    from fluxserve.engine import Engine
    from fluxserve.request import GenerationRequest

    settings = Settings(data_dir=tmp_path / "data", demo=True, device="cpu")
    settings.demo_dir.mkdir(parents=True)
    shared = demo_data_dir / "cache" / "demo-weights"
    for arch in ("dev", "klein"):  # reuse the session's demo pipelines; only the checker differs
        (settings.demo_dir / arch).symlink_to(shared / arch, target_is_directory=True)
    build_demo_checker(settings.demo_dir / "safety", always_flag=True)
    engine = Engine(settings, catalog)

    request = GenerationRequest(model="dev", prompt="a lighthouse", width=80, height=64, steps=2, seed=3,
                                num_images=2, output_format="png")
    result = engine.generate(request)
    assert result.has_nsfw_concepts == [True, True]
    for image in result.images:
        assert image.nsfw is True
        decoded = Image.open(io.BytesIO(image.data))
        assert decoded.size == (80, 64)
        assert decoded.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))

    unchecked = engine.generate(request.model_copy(update={"safety_checker": False}))
    assert unchecked.has_nsfw_concepts == [False, False]
    assert Image.open(io.BytesIO(unchecked.images[0].data)).convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))
