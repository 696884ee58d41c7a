"""`VisionMLP`'s two forms: fc1, its bias and quick_gelu as one Pallas launch (the grouped
kernel's epilogue; `KernelPolicy.vision_mlp`), or a GEMM then an XLA pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from step3_jax.kernels import dispatch
from step3_jax.policy import KernelPolicy
from step3_jax.quant_model import Fp8Weight, linear_activation_fused
from step3_jax.vision.layers import VisionMLP, quick_gelu

HOPPER = pytest.mark.skipif(dispatch.hopper_device() is None, reason="needs a Hopper GPU")
# Widths the kernel takes (multiples of 128); tokens a multiple of 8 but not of the tile.
D, F, T = 256, 512, 272


def _mlp(seed: int = 0) -> VisionMLP:
    mlp = VisionMLP(D, F, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
    kb1, kb2 = jax.random.split(jax.random.key(seed + 100))
    mlp.fc1.bias.set_value(jax.random.normal(kb1, (F,), jnp.float32).astype(jnp.bfloat16))
    mlp.fc2.bias.set_value(jax.random.normal(kb2, (D,), jnp.float32).astype(jnp.bfloat16))
    return mlp


def _x(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (1, T, D), jnp.float32).astype(jnp.bfloat16)


def test_policy_field_is_validated_and_xla_forms_pin_it():
    assert KernelPolicy().vision_mlp is None
    assert KernelPolicy.xla().vision_mlp == KernelPolicy.reference().vision_mlp == "xla"
    with pytest.raises(ValueError, match="vision_mlp"):
        KernelPolicy(vision_mlp="cublas")


def test_default_off_hopper_is_the_unfused_form():
    """Off a Hopper GPU the default (None) runs the XLA form, bitwise; "pallas" refuses with
    the reason, and "xla" never fuses."""
    mlp, x = _mlp(), _x()
    want = mlp(x, implementation="xla")
    if dispatch.hopper_device() is None:
        np.testing.assert_array_equal(np.asarray(mlp(x)), np.asarray(want))
        with pytest.raises(ValueError, match="cannot run here"):
            mlp(x, implementation="pallas")
    w, b = mlp.fc1.weight[...], mlp.fc1.bias
    assert linear_activation_fused(x, w, b, "quick_gelu", "xla") is None
    # float32 activations never take the bf16 kernel: None falls back, "pallas" says why
    assert linear_activation_fused(x.astype(jnp.float32), w, b, "quick_gelu") is None
    with pytest.raises(ValueError, match="needs bf16 activations"):
        linear_activation_fused(x.astype(jnp.float32), w, b, "quick_gelu", "pallas")
    # a block-FP8 fc1 follows the FP8 linears' policy too: their XLA forms keep it out
    w8 = Fp8Weight.quantize(w.astype(jnp.float32))
    assert linear_activation_fused(x, w8, b, "quick_gelu", None, gemm="xla") is None
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K=256\]"):
        linear_activation_fused(x[..., :128], w, b, "quick_gelu")


def _oracle(mlp: VisionMLP, x):
    """float32 hidden pre-activation, hidden and output of the bf16 module's weights."""
    f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    x64 = f32(x)[0]
    pre = x64 @ f32(mlp.fc1.weight[...]).T + f32(mlp.fc1.bias[...])
    h = pre / (1 + np.exp(-1.702 * pre))
    out = h @ f32(mlp.fc2.weight[...]).T + f32(mlp.fc2.bias[...])
    return pre, h, out


@pytest.mark.gpu
@HOPPER
def test_fused_mlp_matches_the_oracle_and_the_unfused_form():
    """Fused: one bf16 rounding of quick_gelu(pre) (2^-8 relative), the f32 pre-activation
    exact to accumulation order (2^-20 relative of sum |x||w|, negligible); then fc2 in bf16
    (its input rounding is already counted, its output rounded once more: 2^-8). Bound on
    the output: |w2| @ (2^-8 |h|) + 2^-8 |out| + 2^-8 * (the fc2 bias' bf16 add). The unfused
    form rounds pre as well (quick_gelu's slope is at most 1.13), so against it the bound
    doubles and takes 1.13 * 2^-8 |pre| more."""
    mlp, x = _mlp(), _x()
    fused = mlp(x, implementation="pallas")
    unfused = mlp(x, implementation="xla")
    assert fused.dtype == unfused.dtype == jnp.bfloat16
    pre, h, out = _oracle(mlp, x)
    w2 = np.abs(np.asarray(mlp.fc2.weight[...].astype(jnp.float32), np.float64))
    u = 2.0**-8
    bound = w2 @ (u * np.abs(h)).T
    bound = bound.T + 2 * u * np.abs(out) + 1e-6
    got = np.asarray(fused.astype(jnp.float32), np.float64)[0]
    assert np.all(np.abs(got - out) <= bound), np.max(np.abs(got - out) / bound)
    bound_unfused = (w2 @ (u * (2 * np.abs(h) + 1.13 * np.abs(pre))).T).T + 4 * u * np.abs(out)
    ref = np.asarray(unfused.astype(jnp.float32), np.float64)[0]
    assert np.all(np.abs(got - ref) <= bound_unfused + 1e-6)


@pytest.mark.gpu
@HOPPER
def test_fused_hidden_with_fp8_fc1_matches_its_dequantized_weight():
    """A block-FP8 fc1 in the fused form: quick_gelu(x_q @ w_q^T + b) with x quantized per
    token per 128 inside, against the same quantized operands dequantized in float64:
    x's e4m3 rounding (2^-4 relative per element) bounds the pre-activation error by
    2^-4 * |x| @ |w|^T, then quick_gelu (slope <= 1.13) and one bf16 rounding."""
    mlp, x = _mlp(), _x()
    w = Fp8Weight.quantize(mlp.fc1.weight[...].astype(jnp.float32))
    got = linear_activation_fused(x, w, mlp.fc1.bias, "quick_gelu", "pallas")
    w64 = np.asarray(w.dequantize(), np.float64)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)[0]
    pre = x64 @ w64.T + np.asarray(mlp.fc1.bias[...].astype(jnp.float32), np.float64)
    want = pre / (1 + np.exp(-1.702 * pre))
    bound = 1.13 * 2.0**-4 * (np.abs(x64) @ np.abs(w64).T) + 2.0**-8 * np.abs(want) + 1e-6
    err = np.abs(np.asarray(got.astype(jnp.float32), np.float64)[0] - want)
    assert np.all(err <= bound), np.max(err / bound)


def test_the_kernels_quick_gelu_is_quick_gelu():
    """The epilogue's form (sigmoid's reciprocal as rsqrt(1 + e^-z)^2) against the plain one
    in float32, over the range where either tail matters, and at inf/NaN: the two differ by
    float32 rounding only (a few ulps of the larger of |x| and |result|, far below the bf16
    rounding the kernel applies after); inf and NaN as the plain form gives them."""
    from step3_jax.kernels.grouped_gemm.activations import quick_gelu_kernel

    x = jnp.concatenate([jnp.linspace(-120.0, 120.0, 20001), jnp.array([0.0, -0.0, 1e-30])])
    got, want = np.asarray(quick_gelu_kernel(x)), np.asarray(quick_gelu(x))
    tol = 8 * np.finfo(np.float32).eps * np.maximum(np.abs(want), 1e-30)
    tail = np.abs(np.asarray(x)) > 20  # e^-z over/underflow: both give 0 or x exactly
    assert np.all(np.abs(got - want)[~tail] <= tol[~tail] + 1e-37)
    assert np.all(np.abs(got - want)[tail] <= 1e-30 + 8e-7 * np.abs(want)[tail])
    edge = jnp.array([np.inf, -np.inf, np.nan])  # inf, NaN (-inf * 0), NaN in both forms
    np.testing.assert_array_equal(quick_gelu_kernel(edge), quick_gelu(edge))


def test_quick_gelu_is_one_function():
    """The model's activation and the kernel epilogue's are the same function object."""
    from step3_jax.kernels.grouped_gemm.activations import ACTIVATIONS

    assert ACTIVATIONS["quick_gelu"] is quick_gelu
