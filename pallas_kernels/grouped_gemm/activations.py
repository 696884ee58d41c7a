"""Activations the grouped GEMM's one-weight epilogue applies (by name), as plain jnp
functions: the kernel evaluates them on its f32 accumulator, the XLA path and the model's
own layers (`step3_jax.vision.layers.quick_gelu`) call the same function."""

from __future__ import annotations

import jax


def quick_gelu(x):
    """``x * sigmoid(1.702 x)`` (CLIP's activation; HF ``"quick_gelu"``)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu}
