"""``Fp8Weight.project(..., implementation="pallas")``: the grouped-GEMM kernel, one group.

Off Hopper (CI) ``implementation=None`` computes the ``"xla"`` (dequant) form, checked bitwise,
and an explicit ``"pallas"`` is a clear error. On a Hopper GPU it
runs the kernel and is compared with the ``"dequant"`` form on the same quantized activations.
Tolerance (derived): both forms contract the same e4m3 operands; ``"dequant"`` rounds each
dequantized operand to bf16 (relative 2**-9 each, so <= 2**-8 per product) and the kernel
multiplies them exactly, accumulating in f32; both round the result to bf16 (2**-8 relative).
Per-product errors are independent with std <= 2**-8/sqrt(3) of |x_k w_k|, so for K >= 2048
random terms the output error is ~2**-8 |out| at most and 1 - cos <~ 2**-16 (1.5e-5); we allow
2e-4, and 2**-6 of the largest |out| elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.quant_model import Fp8Weight

# (equation, x shape, weight shape, num_contract): the projections of the Step-3 MFA layer.
CASES = [
    ("BTD,RD->BTR", (4, 1, 1024), (512, 1024), 1),  # q_proj
    ("BTR,NHR->BTNH", (4, 1, 512), (8, 256, 512), 1),  # wq
    ("BTNH,DNH->BTD", (4, 1, 8, 256), (1024, 8, 256), 2),  # o_proj
]


# Row counts and widths that reach each dense tile pick of `grouped_gemm.config.dense_config`
# (M = 256: N <= 4096 vs wider; M = 512; T > 1 rows).
WIDE_CASES = [
    ("BTD,RD->BTR", (256, 1, 1024), (2560, 1024), 1),
    ("BTD,RD->BTR", (256, 1, 1024), (5120, 1024), 1),
    ("BTD,RD->BTR", (2, 256, 1024), (2560, 1024), 1),
]


def _has_hopper() -> bool:
    try:
        d = jax.devices()[0]
    except RuntimeError:
        return False
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")


def _case(seed, x_shape, w_shape, num_contract):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape, jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[-num_contract:]))
    q = Fp8Weight.quantize(w, num_contract=num_contract)
    return x, q


@pytest.mark.parametrize("eqn,x_shape,w_shape,nc", CASES)
def test_default_off_hopper_is_the_xla_form(eqn, x_shape, w_shape, nc):
    if _has_hopper():
        pytest.skip("on Hopper the kernel runs: see test_pallas_form_matches_dequant_on_gpu")
    x, q = _case(1, x_shape, w_shape, nc)
    got = q.project(x, eqn, jnp.bfloat16, None)
    want = q.project(x, eqn, jnp.bfloat16, "xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="fp8_linear: implementation='pallas' cannot run here"):
        q.project(x, eqn, jnp.bfloat16, "pallas")
    with pytest.raises(ValueError, match="implementation must be one of"):
        q.project(x, eqn, jnp.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _has_hopper(), reason="Mosaic GPU kernel needs a Hopper GPU")
@pytest.mark.parametrize("eqn,x_shape,w_shape,nc", CASES + WIDE_CASES)
def test_pallas_form_matches_dequant_on_gpu(eqn, x_shape, w_shape, nc):
    x, q = _case(2, x_shape, w_shape, nc)
    got = np.asarray(q.project(x, eqn, jnp.bfloat16, "pallas"), np.float32)
    want = np.asarray(q.project(x, eqn, jnp.bfloat16, "xla"), np.float32)
    assert got.shape == want.shape
    cos = np.sum(got * want) / np.sqrt(np.sum(got * got) * np.sum(want * want))
    assert 1 - cos <= 2e-4, 1 - cos
    np.testing.assert_allclose(got, want, atol=2.0**-6 * np.abs(want).max(), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_hopper(), reason="Mosaic GPU kernel needs a Hopper GPU")
@pytest.mark.parametrize(
    "eqn,x_shape,w_shape,nc",
    [
        ("BTD,ND->BTN", (256, 1, 1024), (2560, 1024), 1),  # the AFD packet
        ("BTNH,DNH->BTD", (256, 1, 8, 256), (1024, 8, 256), 2),  # o from the MFA epilogue
    ],
)
def test_pallas_form_reads_quantized_activations_on_gpu(eqn, x_shape, w_shape, nc):
    """Pre-quantized activations go to the kernel as they are (o_proj's: per head per 128
    columns, the flattened K's blocks): against the kernel on their bf16 dequantized value
    (quantized again inside), at most one more e4m3 rounding of each input (<= 2**-4
    relative); and against the XLA form on that value."""
    from step3_jax import quant

    x, q = _case(3, x_shape, w_shape, nc)
    qa = quant.QuantizedActivations.quantize(x)
    got = np.asarray(q.project(qa, eqn, jnp.bfloat16, "pallas"), np.float32)
    want = np.asarray(q.project(qa.dequantize(), eqn, jnp.bfloat16, "pallas"), np.float32)
    assert np.linalg.norm(got - want) <= 2.0**-4 * np.linalg.norm(want)
    xla = np.asarray(q.project(qa.dequantize(), eqn, jnp.bfloat16, "xla"), np.float32)
    assert np.linalg.norm(got - xla) <= 2.0**-4 * np.linalg.norm(xla)


def test_mfa_stored_fused_qkv_matches_separate_xla():
    """The default FP8 layer stores q/k/v as ONE weight (the 128-row scale blocks concatenate
    exactly) and runs one GEMM with the default implementation (the kernel on Hopper, the XLA
    form elsewhere). Against separate "xla" projections: off Hopper both are XLA dots over the
    same dequantized operands (only the summation order can differ: within 1 bf16 rounding,
    2**-8 relative); on Hopper the kernel's tolerance above applies (2**-6 of the largest
    |value|) to k and v. q passes a SECOND FP8 GEMM (wq) whose input q_lo is re-quantized per
    token: a tiny q_lo difference can flip one e4m3 rounding (a 2**-4 step), moving some of
    that token's q outputs past the bound (seen on an H100: 8 of 6,144 values, one token). So
    q gets a cosine bound and a 1% outlier budget."""
    from flax import nnx

    from step3_jax.layers.mfa import MFAttention
    from step3_jax.quant_model import quantize_model

    def layer(fuse):
        return quantize_model(MFAttention(512, 256, 4, 256, rngs=nnx.Rngs(3)), "fp8", fuse_qkv=fuse)

    fused, plain = layer(None), layer(False)
    assert fused.fused_qkv and fused.qkv_proj[...].shape == (256 + 2 * 256, 512)
    assert not plain.fused_qkv
    x = jax.random.normal(jax.random.key(4), (2, 3, 512), jnp.float32).astype(jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
    tol = 2.0**-6 if _has_hopper() else 2.0**-8
    pairs = zip(fused.qkv(x, pos, None), plain.qkv(x, pos, "xla"), strict=True)
    for i, (got, want) in enumerate(pairs):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        bound = tol * np.abs(want).max()
        if i == 0:  # q: see the docstring
            cos = np.sum(got * want) / np.sqrt(np.sum(got * got) * np.sum(want * want))
            assert cos >= 0.999 and np.mean(np.abs(got - want) > bound) <= 0.01
        else:
            np.testing.assert_allclose(got, want, atol=bound, rtol=0)


def _swiglu_case(seed, m, f, d):
    from step3_jax.layers.mlp import swiglu

    kx, kg, ku, kd = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (m, d), jnp.float32).astype(jnp.bfloat16)
    ws = [
        Fp8Weight.quantize(jax.random.normal(k, s, jnp.float32) / np.sqrt(s[1]))
        for k, s in ((kg, (f, d)), (ku, (f, d)), (kd, (d, f)))
    ]
    return swiglu, x, ws


def test_swiglu_fused_gate_up_only_where_the_kernel_runs():
    """Off Hopper (and for the XLA forms, and float weights) ``swiglu_hidden_fused`` declines
    (None) and `swiglu` runs its two projections; an explicit "pallas" off Hopper is the
    dispatch rule's clear error."""
    from step3_jax.quant_model import swiglu_hidden_fused

    swiglu, x, (wg, wu, wd) = _swiglu_case(5, 16, 256, 512)
    for impl in ("xla", "xla_fp8"):
        assert swiglu_hidden_fused(x, wg, wu, impl) is None
    assert swiglu_hidden_fused(x, wg.dequantize(jnp.bfloat16), wu, None) is None
    if _has_hopper():
        pytest.skip("on Hopper the fused kernel runs: see test_swiglu_fused_matches_two_gemms")
    assert swiglu_hidden_fused(x, wg, wu, None) is None
    with pytest.raises(ValueError, match="fp8_linear: implementation='pallas' cannot run here"):
        swiglu_hidden_fused(x, wg, wu, "pallas")
    got = swiglu(x, wg, wu, wd)
    want = swiglu(x, wg, wu, wd, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_hopper(), reason="Mosaic GPU kernel needs a Hopper GPU")
@pytest.mark.parametrize("m,f,d", [(256, 1792, 7168), (7, 256, 512)])
def test_swiglu_fused_matches_two_gemms_on_gpu(m, f, d):
    """The fused gate/up kernel against the XLA two-projection form on the same FP8 operands:
    the shared expert's shape on one 1A3F FFN device and an odd row count. The hidden
    activation is compared (the kernel tolerance of the module docstring, applied to gate and
    up, then SwiGLU: |d(silu(g) u)| <= |silu'(g)| |u| dg + |silu(g)| du, so the same 2**-6 of
    the largest |value| bound with a 2x margin), and the layer output by cosine."""
    from step3_jax.quant_model import swiglu_hidden_fused

    swiglu, x, (wg, wu, wd) = _swiglu_case(6, m, f, d)
    got = np.asarray(swiglu_hidden_fused(x, wg, wu, None), np.float32)
    g = wg.project(x, "MD,FD->MF", jnp.float32, "xla")
    u = wu.project(x, "MD,FD->MF", jnp.float32, "xla")
    want = np.asarray((jax.nn.silu(g) * u).astype(jnp.bfloat16), np.float32)
    assert got.shape == (m, f)
    np.testing.assert_allclose(got, want, atol=2.0**-5 * np.abs(want).max(), rtol=0)
    out = np.asarray(swiglu(x, wg, wu, wd), np.float32)
    ref = np.asarray(swiglu(x, wg, wu, wd, implementation="xla"), np.float32)
    cos = np.sum(out * ref) / np.sqrt(np.sum(out * out) * np.sum(ref * ref))
    assert 1 - cos <= 1e-3, 1 - cos
