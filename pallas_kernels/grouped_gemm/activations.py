"""Activations the grouped GEMM's one-weight epilogue applies (by name).

``ACTIVATIONS`` are the plain jnp functions: the XLA path and the model's own layers
(`step3_jax.vision.layers.quick_gelu`) call them. ``KERNEL_ACTIVATIONS`` are the same math
written for the kernel's epilogue, which evaluates them on every f32 accumulator element of
the output while its SM streams nothing: there the special-function unit's approximate
instructions pay (the kernel compiles them with ``approx_math``: ``exp`` as ``ex2.approx``,
``rsqrt`` as ``rsqrt.approx``, each within ~2^-22 relative), where a precise ``expf`` and
an IEEE division cost ~30 instructions an element (H100, fc1 of the vision MLP: +34 us a
layer for the precise form, docs/LOG.md "Vision tower").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def quick_gelu(x):
    """``x * sigmoid(1.702 x)`` (CLIP's activation; HF ``"quick_gelu"``)."""
    return x * jax.nn.sigmoid(1.702 * x)


def quick_gelu_kernel(x):
    """`quick_gelu` with the sigmoid's reciprocal as ``rsqrt(1 + e^-z)^2`` (1 + e^-z >= 1, so
    the square root is real; e^-z = inf gives 0, the limit; NaN stays NaN): two approximate
    SFU instructions instead of an accurate exp and a division."""
    r = lax.rsqrt(1.0 + lax.exp(-1.702 * x))
    return x * (r * r)


ACTIVATIONS = {"quick_gelu": quick_gelu}
KERNEL_ACTIVATIONS = {"quick_gelu": quick_gelu_kernel}


def check_epilogue(weights, bias, activation, dense=None) -> None:
    """The one-weight epilogue's arguments: ``bias`` a float [N] vector and ``activation`` a
    key of `ACTIVATIONS`, for ONE weight [G, N, K] and no dense group (SwiGLU has its own)."""
    if bias is None and activation is None:
        return
    if len(weights) != 1 or dense is not None:
        raise ValueError("bias and activation apply to one weight and no dense group")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)} or None, got {activation!r}"
        )
    n = weights[0].shape[1]
    if bias is not None and (
        tuple(bias.shape) != (n,) or not jnp.issubdtype(bias.dtype, jnp.floating)
    ):
        raise ValueError(f"bias must be a float [N={n}] vector, got {bias.dtype}{bias.shape}")
