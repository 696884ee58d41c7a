"""MFA decode, issue 16 item 1 on CPU: the numerics of P.V as an FP8 wgmma.

With a transposed V cache the kernel rounds P' = P * v_scale / c to e4m3 per row (c: the row's
block maximum over 448) instead of to f16 (c: the maximum itself). The Mosaic GPU interpreter
cannot run the kernel on CPU (it stops at the wgmma accumulators), so here the kernel's OWN
online-softmax step (``mosaic_gpu_parts._softmax_step``: plain jnp on register values) drives
an emulation of one CTA's loop (f32 wgmma products, the acc * rescale carry, the epilogue's
c / l), block by block, on NaN-padded ragged FP8 caches. Checked against the float32 oracle fed
the same FP8 q with the bound derived in ``test_mfa_decode``'s docstring, and the accuracy
cost of FP8 P against f16 P is measured on diffuse and peaked attention (docs/LOG.md).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.kernels.mfa_decode import mfa_decode_reference
from step3_jax.kernels.mfa_decode import mosaic_gpu_parts as parts
from step3_jax.quant import dequantize_kv, quantize_kv
from tests.pallas_kernels.test_mfa_decode import H, N, make_case

BS = 64


def _shape(batch, s_cap, v_transposed):
    return parts.KernelShape(
        batch=batch, t=1, max_len=s_cap, block_s=BS, num_stages=4, num_splits=1, fp8=True,
        paged=False, page_size=0, sm_scale=H**-0.5, out_dtype=jnp.float32, wg_split="seq",
        v_transposed=v_transposed,
    )  # fmt: skip


def emulate_cta(case, v_transposed):
    """out [B, N, H] float32 of one CTA per sequence (no split), T = 1."""
    q8, qs = quantize_kv(case["q"][:, 0])  # the kernel's per-row e4m3 q
    b, s_cap = case["k"].shape[:2]
    ks = _shape(b, s_cap, v_transposed)
    outs = []
    for i in range(b):
        length = int(case["lengths"][i])
        row_scale = qs[i] * (ks.sm_scale * parts.LOG2E)
        carry = (jnp.full((N,), -jnp.inf), jnp.zeros((N,)), jnp.ones((N,)))
        acc = jnp.zeros((N, H), jnp.float32)
        n_blocks = -(-length // BS)
        for blk in range(n_blocks):
            sl = slice(blk * BS, (blk + 1) * BS)
            k8 = case["k"][i, sl].astype(jnp.float32)
            s = (q8[i].astype(jnp.float32) @ k8.T) * row_scale[:, None]
            s = s * case["k_scale"][i, sl][None, :]
            masked = blk == n_blocks - 1
            valid = (jnp.arange(BS) < length - blk * BS)[None, :] if masked else None
            valid = jnp.broadcast_to(valid, (N, BS)) if masked else None
            p_op, rescale, carry = parts._softmax_step(ks, s, carry, valid, case["v_scale"][i, sl])
            v8 = case["v"][i, sl].astype(jnp.float32)
            if masked:  # the kernel zeroes V rows (V^T columns) past the visible end
                v8 = jnp.where((jnp.arange(BS) < length - blk * BS)[:, None], v8, 0.0)
            acc = acc * rescale[:, None] + p_op.astype(jnp.float32) @ v8
        m, lsum, c = carry
        pos = lsum > 0
        outs.append(acc * jnp.where(pos, c / jnp.where(pos, lsum, 1.0), 0.0)[:, None])
    return np.asarray(jnp.stack(outs))


def _oracle(case, v=None):
    """float32 oracle on the kernel's FP8 q (optionally another V), [B, N, H]."""
    ref_case = {**case, "q": dequantize_kv(*quantize_kv(case["q"]))}
    if v is not None:
        ref_case["v"] = v
    return np.asarray(mfa_decode_reference(**ref_case), np.float32)[:, 0]


def _bound(case):
    """Per-element |FP8 P.V - oracle| bound (test_mfa_decode docstring) on top of the bf16
    output rounding of the oracle (2^-8 relative, 2^-8 max|V| absolute)."""
    v = np.asarray(case["v"], np.float32) * np.asarray(case["v_scale"])[..., None]
    vmax = np.nanmax(np.abs(v))
    abs_v = jnp.abs(case["v"].astype(jnp.float32)).astype(case["v"].dtype)
    ref_abs = _oracle(case, v=abs_v)
    tokens = int(np.max(np.asarray(case["lengths"])))
    return 2.0**-8 * vmax + 2.0**-4 * ref_abs + 2.0**-10 / 448 * tokens * vmax


def _peaked(case, gain):
    """Sharper attention: q scaled up, so few tokens carry most of each row's mass."""
    return {**case, "q": (case["q"].astype(jnp.float32) * gain).astype(jnp.bfloat16)}


@pytest.mark.parametrize("gain", [1.0, 6.0], ids=["diffuse", "peaked"])
def test_fp8_p_within_derived_bound(gain):
    case = _peaked(make_case(21, [0, 1, 63, 64, 65, 300, 512], 512, fp8=True), gain)
    ref = _oracle(case)
    got = emulate_cta(case, v_transposed=True)
    assert np.isfinite(got).all(), "NaN from the padded cache leaked through P.V"
    err = np.abs(got - ref)
    bound = _bound(case) + 2.0**-8 * np.abs(ref)
    worst = float(np.max(err / bound))
    assert worst <= 1.0, f"FP8 P.V error {worst:.3f} x its derived bound"
    np.testing.assert_array_equal(got[0], 0.0)  # length 0: zeros


@pytest.mark.parametrize("gain", [1.0, 6.0], ids=["diffuse", "peaked"])
def test_fp8_p_costs_accuracy_but_little(gain):
    """The f16 P form (the kernel's other FP8 path, same emulation) is the baseline: FP8 P
    must be measurably worse (else P was not quantized) but within 4x its RMS error
    expectation: e4m3's relative rounding error has RMS <= 2^-4 / sqrt(3) per P entry and the
    entries' errors are independent, so the output's RMS error is that times
    sqrt(sum_s (p_s V_s)^2) / l <= 0.036 * |out| scale; we compare RMS errors over elements."""
    case = _peaked(make_case(22, [200, 512, 511, 380], 512, fp8=True), gain)
    ref = _oracle(case)
    e16 = emulate_cta(case, v_transposed=False) - ref
    e8 = emulate_cta(case, v_transposed=True) - ref
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    scale = rms(ref)
    print(f"gain {gain}: RMS error / RMS out: f16 P {rms(e16) / scale:.2e}, e4m3 P "
          f"{rms(e8) / scale:.2e}")  # fmt: skip
    assert rms(e8) > rms(e16)
    assert rms(e8) <= 4 * 2.0**-4 / np.sqrt(3) * scale


@pytest.mark.parametrize("gap", [110.0, 120.0])
@pytest.mark.parametrize("v_transposed", [False, True], ids=["f16_p", "e4m3_p"])
def test_block_far_below_the_running_max_stays_finite(v_transposed, gap):
    """A block whose best score is ``gap`` log2 units under the running max: its P * v_scale
    is near or below f32's smallest normal; c must not follow it down (on the GPU, whose
    division does not flush subnormals, 1 / c = inf turns its zeros into NaN and the rescale
    into inf; nearer the edge the rescale is ~2^110 and the next blocks overflow). Its entries
    round to 0 and the running state is unchanged."""
    ks = _shape(1, 2 * BS, v_transposed)
    rng = np.random.default_rng(3)
    s1 = jnp.asarray(rng.standard_normal((N, BS)), jnp.float32)
    s2 = s1 - gap
    v_col = jnp.full((BS,), 2.0**-5, jnp.float32)
    carry = (jnp.full((N,), -jnp.inf), jnp.zeros((N,)), jnp.ones((N,)))
    p1, r1, carry1 = parts._softmax_step(ks, s1, carry, None, v_col)
    p2, r2, carry2 = parts._softmax_step(ks, s2, carry1, None, v_col)
    for x in (*carry2, r2, p2.astype(jnp.float32)):
        assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_array_equal(np.asarray(r2), 1.0)  # same max, same c: acc unchanged
    assert float(jnp.max(p2.astype(jnp.float32))) == 0.0
    np.testing.assert_array_equal(np.asarray(carry2[2]), np.asarray(carry1[2]))
