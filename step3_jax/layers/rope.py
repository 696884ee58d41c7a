"""NeoX-style (rotate-half) rotary position embedding over the full head dim.

Step-3 uses plain RoPE (theta 500000, ``rope_scaling: null`` in the release). `RopeScaling`
carries the one scaling rule a checkpoint of the family may ask for: ``"linear"`` (positions
divided by ``factor``, i.e. every inverse frequency divided by ``factor``). Other HF rope types
(``dynamic``, ``yarn``, ``llama3``, ``longrope``, ...) change the frequencies differently and
are refused by name in `RopeScaling.__post_init__` rather than silently ignored.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Defined beside Step3Config (a leaf module without jax) so the config stays light to import.
from step3_jax.config import ROPE_SCALING_TYPES, RopeScaling

__all__ = ["ROPE_SCALING_TYPES", "RopeScaling", "apply_rope", "rope_frequencies"]


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> Float[Array, " H2"]:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for i in [0, head_dim / 2), divided
    by ``scaling.factor`` for linear scaling."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is not None:  # "linear": the only type RopeScaling accepts
        inv_freq = inv_freq / scaling.factor
    return inv_freq


def apply_rope(
    x: Float[Array, "B T *heads H"],
    positions: Int[Array, "B T"],
    theta: float,
    scaling: RopeScaling | None = None,
) -> Float[Array, "B T *heads H"]:
    """Rotates pairs (x[i], x[i + H/2]) by ``positions * freq_i`` (NeoX rotate-half layout).

    Angles and the rotation are computed in float32 (positions up to 65536 times frequencies
    near 1 lose all precision in bf16) and the result is cast back to ``x.dtype``.
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta, scaling)
    extra = x.ndim - angles.ndim  # head axes between T and H
    angles = angles.reshape(angles.shape[:2] + (1,) * extra + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
