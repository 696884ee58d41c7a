"""NeoX-style (rotate-half) rotary position embedding over the full head dim."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_frequencies(head_dim: int, theta: float) -> Float[Array, " H2"]:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for i in [0, head_dim / 2)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(
    x: Float[Array, "B T *heads H"], positions: Int[Array, "B T"], theta: float
) -> Float[Array, "B T *heads H"]:
    """Rotates pairs (x[i], x[i + H/2]) by ``positions * freq_i`` (NeoX rotate-half layout).

    Angles and the rotation are computed in float32 (positions up to 65536 times frequencies
    near 1 lose all precision in bf16) and the result is cast back to ``x.dtype``.
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
    extra = x.ndim - angles.ndim  # head axes between T and H
    angles = angles.reshape(angles.shape[:2] + (1,) * extra + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
