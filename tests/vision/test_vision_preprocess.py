"""Image preprocessing: the crop rule and placeholder layout against fixed expected values,
pixel values against NumPy, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from step3_jax.vision import preprocess
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.preprocess import (
    MAX_CROPS,
    MEAN,
    STD,
    ImageSpecialTokens,
    expand_prompt,
    load_image,
    normalize_resize,
    plan_crops,
    preprocess_images,
    split_image,
)

CFG = Step3VisionConfig.tiny()
SPECIAL = ImageSpecialTokens(
    image=7, im_start=1, im_end=2, patch_start=3, patch_end=4, patch_newline=5
)

# (width, height) -> (view size, window, crop-resize size, crops, columns, newline count),
# each worked out by hand from vLLM's ImagePatcher (current version: "long < 728").
PLANS = {
    (640, 480): ((640, 480), 0, (640, 480), 0, 1, 0),  # long < 728, ratio 1.33 <= 1.5
    (600, 300): ((600, 300), 300, (600, 300), 2, 2, 0),  # long < 728, ratio 2: window = short
    (728, 728): ((728, 728), 504, (1008, 1008), 4, 2, 1),  # vLLM "<728" (SGLang: no crops)
    (728, 400): ((728, 400), 504, (1008, 400), 2, 2, 0),  # short side < 504 kept
    (1000, 1000): ((1000, 1000), 504, (1008, 1008), 4, 2, 1),
    (1100, 600): ((1100, 600), 504, (1008, 504), 2, 2, 0),  # 2.18: .18 <= .2 rounds down
    (2000, 900): ((2000, 900), 504, (2016, 1008), 8, 4, 1),
    (800, 100): ((800, 100), 100, (800, 100), 8, 8, 0),  # ratio 8 > 4: window = min(short, 504)
    (20, 200): ((200, 200), 0, (200, 200), 0, 1, 0),  # thin and < 32: padded to a square
    (4000, 1000): ((3024, 756), 504, (3024, 1008), 12, 6, 1),  # capped at 3024 first
    (3024, 3024): ((3024, 3024), 504, (3024, 3024), 36, 6, 5),  # MAX_CROPS
    (1800, 50): ((1800, 50), 50, (1800, 50), 36, 36, 0),  # 36:1 below the 3024 cap: fits
}


@pytest.mark.parametrize("size", list(PLANS))
def test_crop_plans(size):
    p = plan_crops(*size)
    view, window, crop, n, cols, newlines = PLANS[size]
    assert (p.size, p.window, p.crop_size, len(p.boxes), p.columns) == (view, window, crop, n, cols)
    assert sum(p.newlines) == newlines
    # vLLM's count: crops * (81 + 2) + 169 + 2 + newlines
    assert len(p.newlines) == n


def test_boxes_row_major_and_newlines():
    p = plan_crops(2000, 900)
    xs, ys = (0, 504, 1008, 1512), (0, 504)
    assert p.boxes == tuple((x, y, 504, 504) for y in ys for x in xs)
    assert p.newlines == (False, False, False, True, False, False, False, False)


def test_token_layout_exact():
    img = Image.fromarray(np.full((400, 728, 3), 128, np.uint8))  # 2 crops, no newline
    pre = preprocess_images([img], CFG)
    lay = pre.layouts[0]
    crop = [3] + [7] * 81 + [4]
    assert lay.token_ids(SPECIAL) == crop + crop + [1] + [7] * 169 + [2]
    assert lay.num_features == 2 * 81 + 169
    grid = preprocess_images([Image.new("RGB", (1000, 1000))], CFG).layouts[0]
    ids = grid.token_ids(SPECIAL)
    assert len(ids) == 4 * (81 + 2) + 169 + 2 + 1
    assert ids[2 * 83] == 5 and ids.count(5) == 1  # the newline after the first row of 2


def test_expand_prompt_and_count_mismatch():
    lay = preprocess_images([Image.new("RGB", (300, 300))], CFG).layouts[0]  # no crops
    out = expand_prompt([10, 7, 11], [lay], SPECIAL)
    assert out.tolist() == [10, 1] + [7] * 169 + [2, 11]
    with pytest.raises(ValueError, match="1 image placeholder token.*2 image"):
        expand_prompt([10, 7, 11], [lay, lay], SPECIAL)


def test_pixel_values_of_a_728_image_are_the_normalized_pixels():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (728, 728, 3), dtype=np.uint8)
    pre = preprocess_images([arr], CFG)
    want = ((arr / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    assert pre.pixel_values.shape == (1, 3, 728, 728) and pre.pixel_values.dtype == np.float32
    np.testing.assert_allclose(pre.pixel_values[0], want, atol=2e-6)
    # 728 px long side: 4 crops of the image resized to 1008 x 1008, row-major.
    assert pre.crop_pixel_values.shape == (4, 3, 504, 504)
    big = Image.fromarray(arr).resize((1008, 1008), Image.Resampling.BILINEAR)
    third = np.asarray(big.crop((0, 504, 504, 1008))) / 255.0
    np.testing.assert_allclose(
        pre.crop_pixel_values[2], ((third - MEAN) / STD).transpose(2, 0, 1), atol=2e-6
    )


def _triangle_aa(n_in, n_out):
    """Pillow's antialiased bilinear weights, written independently in float64."""
    s = n_in / n_out
    support = max(s, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * s
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
        t = np.maximum(0, 1 - np.abs((np.arange(lo, hi) + 0.5 - c) / support))
        w[i, lo:hi] = t / t.sum()
    return w


def test_normalize_resize_is_antialiased_bilinear():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    got = normalize_resize(Image.fromarray(arr), 56)
    norm = (arr / 255.0 - MEAN) / STD
    ref = np.einsum("yY,xX,YXc->cyx", _triangle_aa(90, 56), _triangle_aa(130, 56), norm)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_thin_image_is_padded_black_at_the_bottom_right():
    img = Image.fromarray(np.full((10, 100, 3), 255, np.uint8))
    view, crops = split_image(img, plan_crops(100, 10))
    a = np.asarray(view)
    assert view.size == (100, 100) and not crops
    assert a[:10].min() == 255 and a[10:].max() == 0


def test_modes_and_transparency():
    assert load_image(Image.new("L", (5, 4), 9)).mode == "RGB"
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))  # fully transparent: white
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(np.zeros((4, 5), np.uint8))).shape == (4, 5, 3)
    for mode in ("I;16", "F", "I"):
        with pytest.raises(ValueError, match=f"mode '{mode}'"):
            load_image(Image.new(mode, (4, 4)))


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        load_image(tmp_path / "junk.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    with pytest.raises(ValueError, match="cannot read image <bytes>"):
        load_image(buf.getvalue()[:40])  # truncated
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="path, bytes"):
        load_image(3.5)
    with pytest.raises(ValueError, match="images is empty"):
        preprocess_images([], CFG)
    with pytest.raises(ValueError, match=r"images\[1\]: .*uint8"):
        preprocess_images([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.int16)], CFG)


def test_thin_images_are_refused_before_any_resize(monkeypatch):
    """Thin images get windows of their short side: past ~35:1 they would be cut into more
    than MAX_CROPS crops (a 40 x 60000 PNG of 2.4 KB: 1512 crops, 4.3 GiB of float32); at
    36:1 above the 3024 cap, the cap's truncation of the short side adds the 37th."""
    assert MAX_CROPS == len(plan_crops(3024, 3024).boxes) == 36
    assert len(plan_crops(3500, 100).boxes) == 35  # 35:1 above the cap fits
    with pytest.raises(ValueError, match="5688 x 158 px .* would be cut into 37 crops"):
        plan_crops(5688, 158)

    def no_resize(*args):
        raise AssertionError("resized an image that is refused")

    monkeypatch.setattr(preprocess, "split_image", no_resize)
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (100001, 33, 3), dtype=np.uint8)  # the 3024 cap: 0 x 3024
    with pytest.raises(
        ValueError,
        match=r"images\[0\]: 33 x 100001 px \(aspect ratio 3030.3:1\) would be cut into 3024 "
        r"crops of 1 px; at most MAX_CROPS=36 are supported",
    ):
        preprocess_images([tall, np.zeros((8, 8), np.uint8)], CFG)
    with pytest.raises(ValueError, match=r"60000 x 40 px .* 1512 crops of 2 px; at most MAX_CROPS"):
        plan_crops(60000, 40)
    with pytest.raises(ValueError, match=r"1850 x 50 px \(aspect ratio 37.0:1\) .* 37 crops"):
        plan_crops(1850, 50)


def test_scaled_side_is_kept_at_one_pixel():
    cfg = dataclasses.replace(CFG, enable_patch=False)
    assert plan_crops(33, 100001, enable_patch=False).size == (1, 3024)  # not 0 x 3024
    tall = np.random.default_rng(1).integers(0, 256, (100001, 33, 3), dtype=np.uint8)
    pre = preprocess_images(tall, cfg)
    assert pre.pixel_values.shape == (1, 3, cfg.image_size, cfg.image_size)
    assert np.isfinite(pre.pixel_values).all() and pre.pixel_values.std() > 0.1


def test_padded_square_larger_than_pillow_opens_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # Pillow opens 2M px
    assert plan_crops(1400, 20).padded  # 1.96M px once padded: fits
    with pytest.raises(
        ValueError,
        match=r"images\[0\]: 20 x 1500 px \(aspect ratio 75.0:1\) would be zero-padded to a "
        r"1500 x 1500 square, over the 2 \* Image.MAX_IMAGE_PIXELS = 2000000 px",
    ):
        preprocess_images([np.zeros((1500, 20, 3), np.uint8) + 9], CFG)


def test_enable_patch_false_gives_no_crops():
    cfg = dataclasses.replace(CFG, enable_patch=False)
    pre = preprocess_images([Image.new("RGB", (2000, 900))], cfg)
    assert pre.crop_pixel_values.shape[0] == 0 and pre.layouts[0].num_crops == 0
