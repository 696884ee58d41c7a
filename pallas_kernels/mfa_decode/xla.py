"""The "xla" implementation: plain jnp at working precision (bf16 operands, f32 accumulation).

This is what runs off-GPU and what the benchmark calls the XLA reference. Scales are folded the
way the kernel folds them: k_scale multiplies score columns, v_scale multiplies P columns, so the
FP8 cache is only cast (never rescaled element-wise) before the contractions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from step3_jax.kernels.mfa_decode.reference import gather_pages, visible_mask


def mfa_decode_xla(
    q: Float[Array, "B T N H"],
    k: Array,
    v: Array,
    lengths: Int[Array, " B"],
    *,
    k_scale: Array | None,
    v_scale: Array | None,
    block_table: Array | None,
    sm_scale: float,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Returns (out bf16 [B, T, N, H], lse f32 [B, T, N]); q is already 4-D."""
    if block_table is not None:
        k, k_scale = gather_pages(k, block_table, k_scale)
        v, v_scale = gather_pages(v, block_table, v_scale)
    t, s_len = q.shape[1], k.shape[1]
    mask = visible_mask(lengths.astype(jnp.int32), t, s_len)  # [B, T, S]
    seen = mask.any(1)  # [B, S]
    # Invisible V rows must be zero, not just weighted by 0: 0 * NaN = NaN in the matmul.
    v = jnp.where(seen[..., None], v, jnp.zeros((), v.dtype)).astype(jnp.bfloat16)
    s = jnp.einsum(
        "BTNH,BSH->BTNS",
        q.astype(jnp.bfloat16),
        k.astype(jnp.bfloat16),
        preferred_element_type=jnp.float32,
    )
    col = jnp.float32(sm_scale)
    if k_scale is not None:
        col = col * jnp.where(seen, k_scale.astype(jnp.float32), 0.0)[:, None, None, :]
    s = jnp.where(mask[:, :, None, :], s * col, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    lsum = jnp.sum(p, axis=-1)
    if v_scale is not None:
        p = p * jnp.where(seen, v_scale.astype(jnp.float32), 0.0)[:, None, None, :]
    o = jnp.einsum("BTNS,BSH->BTNH", p.astype(jnp.bfloat16), v, preferred_element_type=jnp.float32)
    pos = lsum > 0
    o = o * jnp.where(pos, 1.0 / jnp.where(pos, lsum, 1.0), 0.0)[..., None]
    lse = jnp.where(pos, jnp.log(jnp.where(pos, lsum, 1.0)) + m_safe[..., 0], -jnp.inf)
    return o.astype(jnp.bfloat16), lse
