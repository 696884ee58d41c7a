"""step3_jax.quant: FP8 e4m3 formats, round-trip bounds derived from the format, NaN/inf policy.

Round-trip bound (per value, per block), derived from float8_e4m3fn: a value is stored as
``y = clip(x / s, +-448)`` rounded to nearest-even. For |y| >= 2**-6 (normal range) the format
has 3 mantissa bits, so the spacing is 2**(e-3) for |y| in [2**e, 2**(e+1)) and the rounding
error is at most half of it, 2**(e-4) <= 2**-4 |y|. For |y| < 2**-6 (subnormals, spacing 2**-9)
the error is at most 2**-10. Scaling back by s and allowing the float32 division/multiply
roundings (relative 2**-24 each, a 2**-20 slack covers them):

    |x - dequant(x)| <= (2**-4 |x| + 2**-10 s) * (1 + 2**-20)

A format with one fewer mantissa bit (or a scale off by 2x) breaks this bound, and the tests
also check that the observed error comes within 2x of it, so the bound is not vacuous.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from step3_jax import quant

REL = 2.0**-4
ABS_SUB = 2.0**-10
SLACK = 1 + 2.0**-20


def _rand(seed, shape, scale=1.0):
    # Log-uniform magnitudes over ~12 binades with random signs: exercises normals and, after
    # per-block scaling, subnormals of e4m3.
    rng = np.random.default_rng(seed)
    mag = np.exp(rng.uniform(np.log(1e-4), np.log(1.0), shape))
    return (scale * mag * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def _check_bound(x, deq, scale_full):
    x, deq, s = (np.asarray(a, np.float64) for a in (x, deq, scale_full))
    err = np.abs(x - deq)
    bound = (REL * np.abs(x) + ABS_SUB * s) * SLACK
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound)}"
    # Not vacuous: some value rounds by more than half the bound (a finer format would not).
    assert np.max(err / bound) > 0.5


def _np_quantize_groups(x, group=128):
    """NumPy emulation of quantize_activations (same float32 ops, ml_dtypes RNE cast)."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    g = -(-k // group)
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, g * group - k)]).reshape(*x.shape[:-1], g, group)
    scale = np.maximum(np.max(np.abs(xp), -1) * np.float32(1 / 448), np.float32(1e-12))
    y = np.clip(xp / scale[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return y.reshape(*x.shape[:-1], g * group)[..., :k], scale.astype(np.float32)


@pytest.mark.parametrize("k", [128, 300, 7168])
def test_activations_round_trip_bound(k):
    x = _rand(0, (5, 3, k), scale=37.0)
    q, s = quant.quantize_activations(jnp.asarray(x))
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == jnp.float32 and s.shape == (5, 3, -(-k // 128))
    deq = quant.dequantize_activations(q, s)
    s_full = np.repeat(np.asarray(s), 128, -1)[..., :k]
    _check_bound(x, deq, s_full)


def test_activations_match_numpy_emulation_bit_exactly():
    # The NumPy references of the model rely on this: same scales, same e4m3 bytes.
    x = _rand(1, (4, 7, 520), scale=3.0)
    q, s = quant.quantize_activations(jnp.asarray(x))
    q_np, s_np = _np_quantize_groups(x)
    np.testing.assert_array_equal(np.asarray(s), s_np)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_np.view(np.uint8))


@pytest.mark.parametrize("shape", [(256, 384), (3, 200, 130), (129, 1)])
def test_weight_blocks_layout_and_bound(shape):
    w = _rand(2, shape, scale=0.05)
    q, s = quant.quantize_weight_blocks(jnp.asarray(w))
    n, k = shape[-2:]
    nb, kb = -(-n // 128), -(-k // 128)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == shape
    assert s.shape == (*shape[:-2], nb, kb) and s.dtype == jnp.float32
    # scales[..., i, j] is the amax of rows 128i.., cols 128j.. over 448 (layout check).
    wn = np.asarray(w)
    for i in range(nb):
        for j in range(kb):
            blk = wn[..., 128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            want = np.max(np.abs(blk), axis=(-2, -1)) * np.float32(1 / 448)
            np.testing.assert_array_equal(np.asarray(s)[..., i, j], want)
    deq = quant.dequantize_weight_blocks(q, s)
    s_full = np.repeat(np.repeat(np.asarray(s), 128, -2), 128, -1)[..., :n, :k]
    _check_bound(w, deq, s_full)


def test_weight_channels_layout_and_bound():
    w = _rand(3, (2, 300, 200), scale=4.0)
    q, s = quant.quantize_weight_channels(jnp.asarray(w))
    assert s.shape == (2, 300, 1)
    np.testing.assert_allclose(
        np.asarray(s)[..., 0], np.max(np.abs(w), -1) * np.float32(1 / 448), rtol=0
    )
    _check_bound(w, quant.dequantize_weight_channels(q, s), np.broadcast_to(s, w.shape))


def test_kv_per_token_layout_and_bound():
    x = _rand(4, (2, 3, 50, 256), scale=9.0)  # [L, B, S, H]
    q, s = quant.quantize_kv(jnp.asarray(x))
    assert q.shape == x.shape and q.dtype == jnp.float8_e4m3fn
    assert s.shape == (2, 3, 50) and s.dtype == jnp.float32
    assert q.dtype.itemsize == 1  # byte layout: 256 + 256 value bytes + 2 x 4 scale bytes
    _check_bound(x, quant.dequantize_kv(q, s), np.broadcast_to(np.asarray(s)[..., None], x.shape))


def test_block_max_maps_to_448_and_large_values_do_not_overflow():
    # Values near the float32 limit: the scale keeps x / s finite and the clip keeps the
    # cast in range (an out-of-range cast to e4m3fn would give NaN).
    x = _rand(5, (4, 256), scale=1.0) * np.float32(3e38)
    q, s = quant.quantize_activations(jnp.asarray(x))
    qf = np.asarray(q, np.float32)
    assert np.all(np.isfinite(qf)) and np.all(np.isfinite(np.asarray(s)))
    assert np.max(np.abs(qf), axis=-1).min() == 448.0
    deq = np.asarray(quant.dequantize_activations(q, s))
    _check_bound(x, deq, np.repeat(np.asarray(s), 128, -1))


def test_cast_clips_out_of_range_instead_of_nan():
    y = jnp.asarray([500.0, -1e6, 448.0, 464.0, -449.0], jnp.float32)
    out = np.asarray(quant._cast_fp8(y), np.float32)
    np.testing.assert_array_equal(out, [448.0, -448.0, 448.0, 448.0, -448.0])
    raw = np.asarray(y.astype(jnp.float8_e4m3fn), np.float32)  # why the clip exists
    assert np.isnan(raw[1])


@pytest.mark.parametrize("tiny", [0.0, 1e-30, 1e-42])
def test_scales_never_zero(tiny):
    x = np.full((3, 256), tiny, np.float32)
    x[0, :5] = [tiny, -tiny, 0.0, tiny, 0.0]
    for q, s in (
        quant.quantize_activations(jnp.asarray(x)),
        quant.quantize_weight_blocks(jnp.asarray(x)),
        quant.quantize_weight_channels(jnp.asarray(x)),
        quant.quantize_kv(jnp.asarray(x)),
    ):
        s = np.asarray(s)
        assert np.all(s > 0) and np.all(np.isfinite(s))
        assert np.all(np.isfinite(np.asarray(q, np.float32)))
    q, s = quant.quantize_activations(jnp.asarray(x))
    deq = np.asarray(quant.dequantize_activations(q, s))
    np.testing.assert_array_equal(deq[x == 0], 0.0)  # zero stays exactly zero
    assert np.all(np.abs(deq - x) <= ABS_SUB * np.repeat(s, 128, -1) * SLACK)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_poison_only_their_block(bad):
    """Documented policy: a NaN/inf input turns its own block into NaN on dequantize; other
    blocks (other tokens, other 128-groups, other weight blocks) are unaffected."""
    x = _rand(6, (3, 384), scale=2.0)
    x[1, 130] = bad
    q, s = quant.quantize_activations(jnp.asarray(x))
    deq = np.asarray(quant.dequantize_activations(q, s))
    assert np.all(np.isnan(deq[1, 128:256]))
    assert np.isposinf(np.asarray(s)[1, 1]) and np.all(np.isfinite(np.delete(np.asarray(s), 1, 0)))
    mask = np.ones_like(x, bool)
    mask[1, 128:256] = False
    assert np.all(np.isfinite(deq[mask]))

    w = _rand(7, (256, 256), scale=0.1)
    w[200, 3] = bad
    qw, sw = quant.quantize_weight_blocks(jnp.asarray(w))
    dw = np.asarray(quant.dequantize_weight_blocks(qw, sw))
    assert np.all(np.isnan(dw[128:, :128])) and np.isposinf(np.asarray(sw)[1, 0])
    assert np.all(np.isfinite(dw[:128])) and np.all(np.isfinite(dw[:, 128:]))

    kv = _rand(8, (4, 64), scale=1.0)
    kv[2, 7] = bad
    qk, sk = quant.quantize_kv(jnp.asarray(kv))
    dk = np.asarray(quant.dequantize_kv(qk, sk))
    assert np.isposinf(np.asarray(sk)[2])
    assert np.all(np.isnan(dk[2])) and np.all(np.isfinite(np.delete(dk, 2, 0)))


def test_quantize_is_jittable_and_deterministic():
    x = jnp.asarray(_rand(9, (2, 256)))
    q1, s1 = jax.jit(quant.quantize_activations)(x)
    q2, s2 = quant.quantize_activations(x)
    np.testing.assert_array_equal(np.asarray(q1, np.float32), np.asarray(q2, np.float32))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))


def test_cast_rounds_once_to_nearest_even_like_numpy():
    """``_cast_fp8`` rounds to the e4m3 grid in float32 (so a backend converting through a
    16-bit intermediate cannot double-round): bitwise equal to ml_dtypes' single RNE rounding
    on exact midpoints, their float32 neighbours, subnormals and random values. (Through
    float16 first, 0.3% of such values would differ: the GPU failure this guards against.)"""
    import ml_dtypes

    e4m3 = ml_dtypes.float8_e4m3fn
    grid = np.arange(256, dtype=np.uint8).view(e4m3).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            grid,
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
        ]
        + [rng.standard_normal(20_000).astype(np.float32) * s for s in (1e-3, 1.0, 100.0)]
    )
    x = np.clip(x, -448, 448)
    want = x.astype(e4m3).view(np.uint8)
    got = np.asarray(quant._cast_fp8(jnp.asarray(x))).view(np.uint8)
    np.testing.assert_array_equal(got, want)
    twice = x.astype(np.float16).astype(e4m3).view(np.uint8)
    assert (twice != want).sum() > 100  # the test data does exercise double rounding


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16])
def test_set_at_writes_the_same_bytes_as_a_scatter_in_place(dtype):
    """`quant.set_at` (an unsigned-integer scatter for narrow floats on CPU) stores exactly
    what ``.at[].set`` stores, drops out-of-range rows with mode="drop", and the compiled CPU
    write into a donated buffer holds no wider float copy of it (XLA:CPU's FP8/bf16 scatter
    upcast the whole buffer to f16/f32)."""
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.normal(size=(64, 512)), dtype)
    rows = jnp.asarray([3, 70, 9], jnp.int32)  # 70: out of range, dropped
    vals = jnp.asarray(rng.normal(size=(3, 512)), jnp.float32)
    want = np.asarray(buf.at[rows].set(vals.astype(dtype), mode="drop"))
    got = np.asarray(quant.set_at(buf, rows, vals, mode="drop"))
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    step = jax.jit(lambda b, r, v: quant.set_at(b, r, v, mode="drop"), donate_argnums=0)
    hlo = step.lower(buf, rows, vals).compile().as_text()
    assert not re.search(r"[ (]f(16|32)\[64,512\]", hlo), "buffer upcast around the scatter"


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_block_and_group_sizes_must_be_positive_ints(bad):
    """group=0 / block=0 raised ZeroDivisionError, group=-1 a deep jax reshape error."""
    x = jnp.asarray(np.random.default_rng(40).standard_normal((3, 100)), jnp.float32)
    q, s = quant.quantize_activations(x)
    wq, ws = quant.quantize_weight_blocks(x)
    with pytest.raises(ValueError, match=f"group must be a positive integer, got {bad!r}"):
        quant.quantize_activations(x, group=bad)
    with pytest.raises(ValueError, match=f"group must be a positive integer, got {bad!r}"):
        quant.dequantize_activations(q, s, group=bad)
    with pytest.raises(ValueError, match=f"block must be a positive integer, got {bad!r}"):
        quant.quantize_weight_blocks(x, block=bad)
    with pytest.raises(ValueError, match=f"block must be a positive integer, got {bad!r}"):
        quant.dequantize_weight_blocks(wq, ws, block=bad)


def test_dequantize_scale_shapes_are_checked():
    """A wrongly shaped scale was repeated/broadcast into garbage or failed deep in jnp."""
    rng = np.random.default_rng(41)
    x = jnp.asarray(rng.standard_normal((3, 100)), jnp.float32)
    q, s = quant.quantize_activations(x)
    for bad in (jnp.ones((3,)), jnp.ones((3, 5))):
        with pytest.raises(
            ValueError, match=r"scale must be \[\.\.\., ceil\(K/group\)\] = \(3, 1\)"
        ):
            quant.dequantize_activations(q, bad)
    with pytest.raises(ValueError, match=r"= \(3, 4\) for values \(3, 100\), got \(3, 1\)"):
        quant.dequantize_activations(q, s, group=32)  # the scales of group=128
    w = jnp.asarray(rng.standard_normal((2, 200, 300)), jnp.float32)
    wq, ws = quant.quantize_weight_blocks(w)
    with pytest.raises(ValueError, match=r"ceil\(N/block\), ceil\(K/block\)\] = \(2, 2, 3\)"):
        quant.dequantize_weight_blocks(wq, jnp.ones((2, 3, 3)))  # too large: was accepted
    with pytest.raises(ValueError, match=r"= \(2, 2, 3\) .*got \(2, 3\)"):
        quant.dequantize_weight_blocks(wq, ws[0])
    kq, ks = quant.quantize_kv(jnp.ones((2, 4, 8)))
    with pytest.raises(
        ValueError, match=r"scale must be \[\.\.\., S\] .* = \(2, 4\) .*got \(2, 3\)"
    ):
        quant.dequantize_kv(kq, jnp.ones((2, 3)))
    cq, cs = quant.quantize_weight_channels(w[0])
    with pytest.raises(ValueError, match=r"scale must be \[\.\.\., N, 1\] = \(200, 1\)"):
        quant.dequantize_weight_channels(cq, cs[:, 0])
    np.testing.assert_array_equal(  # the right shapes still work
        np.asarray(quant.dequantize_kv(kq, ks)), np.ones((2, 4, 8), np.float32)
    )


def test_quantize_inputs_need_axes_and_a_real_dtype():
    """A 0-d input gave IndexError; complex and bool inputs were quantized silently."""
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K\] .*got shape \(\)"):
        quant.quantize_activations(jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., N K\] .*got shape \(4,\)"):
        quant.quantize_weight_blocks(jnp.ones((4,)))
    with pytest.raises(ValueError, match="real .*got complex64"):
        quant.quantize_kv(jnp.ones((2, 4), jnp.complex64))
    with pytest.raises(ValueError, match="real .*got bool"):
        quant.quantize_activations(jnp.ones((2, 4), bool))
