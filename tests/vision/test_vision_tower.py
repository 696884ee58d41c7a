"""The JAX vision tower, downsamplers and projector against the float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from vision_fixtures import embed, load_tiny, random_pixels, random_vision_tensors
from vision_reference import aa_resize_matrix, vision_forward

from step3_jax.quant_model import Fp8Weight
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.encoder import resize_positions
from step3_jax.vision.layers import Conv2d, Linear

# float32 through 2 tiny layers: per-op relative error ~1e-7 * sqrt(contraction <= 2*32*9);
# the bound 2e-4 (relative to the output's largest magnitude) leaves >100x headroom
# yet fails for any semantic slip (a missed norm, a swapped q/k block, wrong token order).
RTOL = 2e-4
CFG = Step3VisionConfig.tiny()


def _rel_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("size", [728, 504])
def test_tower_matches_float64_reference(size):
    t = random_vision_tensors(CFG, seed=1)
    model = load_tiny(CFG, t)
    pixels = random_pixels(2, size, seed=2)
    got = embed(model, pixels)
    ref = vision_forward(t, pixels, CFG)
    assert got.shape == (2, CFG.tokens_per_view(size), CFG.text_hidden_size)
    assert got.shape[1] == {728: 169, 504: 81}[size]
    assert _rel_err(got, ref) <= RTOL


def test_images_in_a_batch_are_independent():
    t = random_vision_tensors(CFG, seed=3)
    model = load_tiny(CFG, t)
    pixels = random_pixels(3, 504, seed=4)
    both = embed(model, pixels)
    one = embed(model, pixels[1:2])
    np.testing.assert_allclose(both[1:2], one, rtol=1e-5, atol=1e-5 * np.abs(one).max())


def test_projector_stride_and_bias_variants():
    cfg = Step3VisionConfig(
        hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, image_size=56,
        crop_size=42, output_hidden_size=8, projector_stride=1, projector_bias=False,
        text_hidden_size=12,
    )  # fmt: skip
    t = random_vision_tensors(cfg, seed=5)
    assert "vit_large_projector.bias" not in t
    model = load_tiny(cfg, t)
    for size in (56, 84, 42):  # same grid, upsampled positions, downsampled positions
        pixels = random_pixels(1, size, seed=size)
        got = embed(model, pixels)
        assert got.shape[1] == cfg.tokens_per_view(size)
        assert _rel_err(got, vision_forward(t, pixels, cfg)) <= RTOL


def test_resize_positions_matches_pillow_style_weights():
    rng = np.random.default_rng(6)
    pos = rng.standard_normal((52, 52, 5)).astype(np.float32)
    got = np.asarray(resize_positions(jnp.asarray(pos), 36), np.float64)
    m = aa_resize_matrix(52, 36)
    ref = np.einsum("yY,xX,YXd->yxd", m, m, pos.astype(np.float64))
    np.testing.assert_allclose(got, ref, atol=2e-6 * np.abs(ref).max())


def test_resize_positions_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    pos = rng.standard_normal((52, 52, 4)).astype(np.float32)
    t = torch.from_numpy(pos).permute(2, 0, 1)[None]
    ref = (
        torch.nn.functional.interpolate(
            t, size=(36, 36), mode="bicubic", antialias=True, align_corners=False
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = np.asarray(resize_positions(jnp.asarray(pos), 36))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_bad_pixel_values_are_rejected():
    model = load_tiny(CFG, random_vision_tensors(CFG, seed=8))
    for bad, msg in [
        (jnp.zeros((2, 728, 728)), r"\[N, 3, H, W\]"),
        (jnp.zeros((0, 3, 728, 728)), "empty"),
        (jnp.zeros((1, 3, 728, 504)), "square"),
        (jnp.zeros((1, 3, 100, 100)), "multiple of patch_size"),
        (jnp.zeros((1, 3, 504, 504), jnp.int32), "floating"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model(bad)


def test_bf16_tower_tracks_float32():
    t = random_vision_tensors(CFG, seed=9)
    f32 = load_tiny(CFG, t)
    bf16 = load_tiny(CFG, t, dtype=jnp.bfloat16)
    pixels = random_pixels(1, 504, seed=10)
    a, b = embed(f32, pixels), embed(bf16, pixels)
    # bf16 keeps 8 bits: ~2**-8 relative per rounding, a few dozen roundings deep.
    cos = np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.999 and np.isfinite(b).all()


def test_fp8_linears_track_float32():
    from step3_jax.vision.encoder import quantize_linears

    t = random_vision_tensors(CFG, seed=11)
    ref = load_tiny(CFG, t)
    fp8 = load_tiny(CFG, t)
    assert quantize_linears(fp8) == 2 * 4 + 1  # qkv, out, fc1, fc2 per layer + projector
    pixels = random_pixels(1, 504, seed=12)
    a, b = embed(ref, pixels), embed(fp8, pixels)
    # e4m3 keeps 3 mantissa bits (2**-4 relative per operand); over ~10 quantized GEMMs the
    # output stays within a few percent: a global cosine of 0.99, and not equal (FP8 ran).
    cos = np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert 0.99 < cos < 1.0 - 1e-7


@pytest.mark.parametrize("weight", ["float32", "fp8_aligned", "fp8_unaligned"])
def test_split_outputs_are_the_fused_projection_cut(weight):
    """`Linear.split_outputs` (one GEMM per row block of the fused q/k/v weight: what the
    tower's attention runs) equals the one fused GEMM cut afterwards. Same products summed
    over the same K, so float32 agrees to a few ulps; block-FP8 with 128-aligned cuts cuts
    the values and scales exactly (each block's GEMM sees the same FP8 operands); unaligned
    cuts fall back to the fused GEMM and the split (bitwise)."""
    d = 32 if weight == "fp8_unaligned" else 256
    lin = Linear(d, 3 * d, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    lin.bias.set_value(jnp.linspace(-1, 1, 3 * d, dtype=jnp.float32))
    if weight != "float32":
        lin.weight.set_value(Fp8Weight.quantize(lin.weight[...]))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, d)), jnp.float32)
    parts = lin.split_outputs(x, (d, d, d), gemm="xla")
    fused = jnp.split(lin(x, gemm="xla"), 3, axis=-1)
    for got, want in zip(parts, fused, strict=True):
        assert got.shape == (2, 5, d)
        if weight == "fp8_unaligned":
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:
            scale = np.abs(np.asarray(want)).max()
            np.testing.assert_allclose(got, want, rtol=0, atol=d * 2.0**-23 * 4 * scale)
    dots = str(jax.make_jaxpr(lambda x: lin.split_outputs(x, (d, d, d), gemm="xla"))(x))
    assert dots.count("dot_general") == (1 if weight == "fp8_unaligned" else 3)


@pytest.mark.parametrize(
    "kernel,stride,padding,size",
    [
        (2, 2, 0, (8, 8)), (2, 2, 0, (9, 9)), (3, 2, 1, (8, 8)), (3, 2, 1, (7, 7)),
        (3, 1, 1, (5, 5)), (4, 4, 0, (13, 13)), (3, 2, 1, (7, 9)), (2, 2, 0, (6, 11)),
    ],
)  # fmt: skip
def test_conv2d_windows_gemm_matches_xla_convolution(kernel, stride, padding, size):
    """`Conv2d` (one GEMM over im2col windows) equals XLA's own convolution in float32: the
    same products summed over the same I*k*k terms, so the two differ by reassociation only,
    bounded by the contraction length times float32's eps times the sum of |products|. The
    shapes cover kernel = stride (the reshape path), the overlapping 3 x 3 stride-2
    downsampler, stride 1, and sizes the stride does not divide."""
    ch_in, ch_out = 5, 6
    conv = Conv2d(
        ch_in, ch_out, kernel, stride=stride, padding=padding,
        param_dtype=jnp.float32, rngs=nnx.Rngs(0),
    )  # fmt: skip
    conv.bias.set_value(jnp.linspace(-1, 1, ch_out, dtype=jnp.float32))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *size, ch_in)), jnp.float32)
    got = conv(x)
    want = jax.lax.conv_general_dilated(
        x, conv.weight[...], (stride, stride), ((padding, padding),) * 2,
        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    ) + conv.bias[...]  # fmt: skip
    assert got.shape == want.shape and got.dtype == jnp.float32
    mag = np.asarray(
        jax.lax.conv_general_dilated(
            jnp.abs(x),
            jnp.abs(conv.weight[...]),
            (stride, stride),
            ((padding, padding),) * 2,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
    )
    bound = ch_in * kernel * kernel * 2.0**-23 * mag + 2.0**-23
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= bound)


def test_conv2d_output_dtype_and_bad_input():
    conv = Conv2d(4, 3, 2, stride=2, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    y = conv(jnp.ones((1, 4, 4, 4), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 2, 2, 3)
    with pytest.raises(ValueError, match=r"x \[B, Y, X, 4\]"):
        conv(jnp.ones((1, 4, 4, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"x \[B, Y, X, 4\]"):
        conv(jnp.ones((4, 4, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"Y, X >= 3 \(kernel 3, padding 0\)"):
        Conv2d(4, 3, 3, stride=1, param_dtype=jnp.float32, rngs=nnx.Rngs(0))(
            jnp.ones((1, 2, 2, 4), jnp.float32)
        )
