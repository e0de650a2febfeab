"""Every size table and enum of seeds 001, 003 and 004, and Replicate's tiers, through fluxserve.sizes."""

from __future__ import annotations

import pytest

from fluxserve.sizes import (
    FAL_IMAGE_SIZES,
    REPLICATE_ASPECT_RATIOS,
    REPLICATE_MEGAPIXELS,
    TABLE_1K,
    SizeError,
    auto_size,
    fal_image_size,
    gateway_size,
    nearest_ratio,
    replicate_size,
    round16,
)

# ---- seed 001: fal image_size ----------------------------------------------------------------------


def test_fal_enum_is_exactly_seed_001():
    assert FAL_IMAGE_SIZES == {
        "square_hd": (1024, 1024),
        "square": (512, 512),
        "portrait_4_3": (768, 1024),
        "portrait_16_9": (576, 1024),
        "landscape_4_3": (1024, 768),
        "landscape_16_9": (1024, 576),
    }


def test_fal_default_is_landscape_4_3():
    assert fal_image_size(None) == (1024, 768)


@pytest.mark.parametrize("name", list(FAL_IMAGE_SIZES))
def test_fal_enum_names(name):
    assert fal_image_size(name) == FAL_IMAGE_SIZES[name]


def test_fal_custom_size_bounds():
    assert fal_image_size({"width": 512, "height": 2048}) == (512, 2048)
    for bad, field in (({"width": 511, "height": 1024}, "image_size.width"),
                       ({"width": 1024, "height": 2049}, "image_size.height")):
        with pytest.raises(SizeError) as err:
            fal_image_size(bad)
        assert err.value.field == field


def test_fal_unknown_enum_names_field():
    with pytest.raises(SizeError) as err:
        fal_image_size("huge")
    assert err.value.field == "image_size" and "square_hd" in err.value.message


# ---- seed 004: OpenAI-style gateway sizes ------------------------------------------------------------

SEED_004_1K = {
    "4:3": (1183, 887), "4:5": (916, 1145), "5:4": (1145, 916), "1:1": (1024, 1024), "3:4": (887, 1182),
    "2:3": (836, 1254), "3:2": (1254, 836), "9:16": (768, 1365), "16:9": (1365, 768),
}


def test_1k_table_is_exactly_seed_004():
    assert TABLE_1K == SEED_004_1K


@pytest.mark.parametrize("ratio", list(SEED_004_1K))
def test_aspect_ratio_plus_1k(ratio):
    assert gateway_size(None, ratio, "1K") == SEED_004_1K[ratio]
    assert gateway_size(None, ratio) == SEED_004_1K[ratio]  # 1K is the default scale
    assert gateway_size(ratio) == SEED_004_1K[ratio]  # "W:H" size == aspect_ratio


@pytest.mark.parametrize("ratio", list(SEED_004_1K))
def test_size_wxh_of_the_table(ratio):
    w, h = SEED_004_1K[ratio]
    assert gateway_size(f"{w}x{h}") == (w, h)


def test_size_wins_over_aspect_ratio_and_resolution():
    assert gateway_size("1024x1024", "16:9", "2K") == (1024, 1024)
    assert gateway_size("640X480", "9:16", "0.5K") == (640, 480)


def test_w_colon_h_size_with_resolution_tier():
    assert gateway_size("16:9", None, "0.5K") == (682, 384)


def test_auto_means_input_or_model_default():
    assert gateway_size("auto") is None
    assert gateway_size(None) is None
    assert gateway_size("auto", "16:9") == (1365, 768)
    assert gateway_size(None, None, "auto") is None


def test_auto_size_holds_to_the_minimum_side_and_multiples_of_16():
    assert auto_size(300, 200, 512) == (768, 512)  # scaled up to fal's 512 minimum, shape kept
    assert auto_size(200, 136) == (192, 128)  # the model's own minimum is 64: only rounded to multiples of 16
    assert auto_size(1000, 750, 512) == (992, 752)
    assert auto_size(4000, 3000, 512) == (2048, 1536)  # scaled down to fit 2048 per side and 4 MP
    assert auto_size(3000, 3000, 512) == (2048, 2048)
    for size in (auto_size(517, 913, 512), auto_size(71, 65), auto_size(2047, 1999, 512)):
        assert all(side % 16 == 0 and 64 <= side <= 2048 for side in size), size


def test_nearest_ratio_on_a_log_scale():
    assert nearest_ratio(7.0, ["4:1", "8:1"]) == "8:1"  # seed 004's example
    assert gateway_size(None, "21:9") == SEED_004_1K["16:9"]
    assert gateway_size(None, "1:3") == SEED_004_1K["9:16"]
    assert gateway_size(None, "1.9:1") == SEED_004_1K["16:9"]


@pytest.mark.parametrize(
    "resolution, expected",
    [("0.5K", (512, 512)), ("1K", (1024, 1024)), ("2K", (2048, 2048)), ("4K", (2048, 2048)),
     ("1k", (1024, 1024)), ("0.25", (512, 512)), ("1", (1024, 1024)), ("4 MP", (2048, 2048)),
     ("3K", (2048, 2048)), ("0.7K", (512, 512))],
)
def test_resolution_tiers_nearest(resolution, expected):
    assert gateway_size(None, "1:1", resolution) == expected


def test_wide_ratio_at_top_tier_fits_the_model():
    assert gateway_size(None, "16:9", "2K") == (2048, 1152)
    assert gateway_size(None, "2:3", "4K") == (1365, 2048)
    w, h = gateway_size(None, "4:3", "2K")
    assert max(w, h) == 2048 and abs(w / h - 4 / 3) < 0.01


@pytest.mark.parametrize("bad", ["big", "1024", "1024x", "x1024", "0:1", "-1:2"])
def test_bad_size_names_size(bad):
    with pytest.raises(SizeError) as err:
        gateway_size(bad)
    assert err.value.field in ("size", "aspect_ratio")


def test_size_outside_model_limits_names_size():
    for bad in ("4096x4096", "32x32", "2049x1024"):
        with pytest.raises(SizeError) as err:
            gateway_size(bad)
        assert err.value.field == "size"
        assert "2048" in err.value.message


def test_bad_aspect_ratio_and_resolution_name_their_fields():
    with pytest.raises(SizeError) as err:
        gateway_size(None, "wide")
    assert err.value.field == "aspect_ratio"
    with pytest.raises(SizeError) as err:
        gateway_size(None, "1:1", "huge")
    assert err.value.field == "resolution"


# ---- seed 003 / Replicate: aspect ratios x megapixel tiers ---------------------------------------------


def test_replicate_enums():
    assert REPLICATE_ASPECT_RATIOS == ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
    assert set(REPLICATE_MEGAPIXELS) == {"0.5 MP", "1 MP", "2 MP", "4 MP"}


@pytest.mark.parametrize("ratio", REPLICATE_ASPECT_RATIOS)
@pytest.mark.parametrize("tier", list(REPLICATE_MEGAPIXELS))
def test_replicate_tiers(ratio, tier):
    w, h = replicate_size(ratio, tier)
    assert w % 16 == 0 and h % 16 == 0
    assert w <= 2048 and h <= 2048 and w * h <= 2048 * 2048
    rw, rh = (int(x) for x in ratio.split(":"))
    assert abs((w / h) / (rw / rh) - 1) < 0.03
    target = REPLICATE_MEGAPIXELS[tier] * 1024 * 1024
    if max(w, h) < 2048:  # tiers that fit keep their pixel count
        assert abs(w * h / target - 1) < 0.05


def test_replicate_known_values():
    assert replicate_size("1:1", "1 MP") == (1024, 1024)
    assert replicate_size("1:1", "4 MP") == (2048, 2048)
    assert replicate_size("16:9", "1 MP") == (1360, 768)
    assert replicate_size("16:9", "4 MP") == (2048, 1152)


def test_replicate_custom_rounds_to_multiples_of_16():
    assert replicate_size("custom", "1 MP", width=1010, height=750) == (1008, 752)
    assert round16(1010) == 1008 and round16(8) == 16 and round16(1024) == 1024
    with pytest.raises(SizeError) as err:
        replicate_size("custom", "1 MP", width=1000)
    assert err.value.field == "height"
    with pytest.raises(SizeError):
        replicate_size("custom", "1 MP", width=4096, height=512)


def test_replicate_match_input_image():
    assert replicate_size("match_input_image", "1 MP", input_size=(2000, 1000)) == (1456, 720)
    assert replicate_size("1:1", "match_input_image", input_size=(800, 800)) == (800, 800)
    assert replicate_size("match_input_image", "match_input_image", input_size=(640, 480)) == (640, 480)
    cases = (("match_input_image", "1 MP", "aspect_ratio"), ("1:1", "match_input_image", "resolution"))
    for ratio, res, field in cases:
        with pytest.raises(SizeError) as err:
            replicate_size(ratio, res)
        assert err.value.field == field


def test_replicate_unknown_values_name_their_fields():
    with pytest.raises(SizeError) as err:
        replicate_size("5:4", "1 MP")
    assert err.value.field == "aspect_ratio" and "match_input_image" in err.value.message
    with pytest.raises(SizeError) as err:
        replicate_size("1:1", "3 MP")
    assert err.value.field == "resolution"
