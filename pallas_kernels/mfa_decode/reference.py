"""Float32 oracle for MFA decode attention (same signature as the public API).

Semantics (shared by every implementation): query t of sequence b sits at position
``lengths[b] - T + t`` and sees cache slots ``s <= lengths[b] - T + t``. Slots at or beyond
``lengths[b]`` may hold garbage or NaN and never influence the result. A query with no visible
key returns zeros and lse = -inf. FP8 caches are dequantized as
``float32(k_fp8) * k_scale[..., s]`` (the KV format of ``step3_jax.quant.quantize_kv``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def gather_pages(
    cache: Array, block_table: Int[Array, "B P"], scale: Array | None = None
) -> tuple[Array, Array | None]:
    """Paged [P_total, page, ...] -> contiguous [B, P * page, ...] by the block table."""
    b, p = block_table.shape
    page = cache.shape[1]
    out = cache[block_table].reshape(b, p * page, *cache.shape[2:])
    if scale is None:
        return out, None
    return out, scale[block_table].reshape(b, p * page)


def visible_mask(lengths: Int[Array, " B"], t: int, s: int) -> Array:
    """[B, T, S] bool: key s visible to query t (causal among the T new tokens)."""
    pos = lengths[:, None] - t + jnp.arange(t)[None, :]  # [B, T] query positions
    return jnp.arange(s)[None, None, :] <= pos[:, :, None]


def mfa_decode_reference(
    q: Float[Array, "B T N H"] | Float[Array, "B N H"],
    k: Array,
    v: Array,
    lengths: Int[Array, " B"],
    *,
    k_scale: Float[Array, "..."] | None = None,
    v_scale: Float[Array, "..."] | None = None,
    block_table: Int[Array, "B P"] | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    v_transposed: bool = False,
):
    """Plain-jnp float32 MFA decode attention; returns bf16 out (and float32 lse [B, T, N]).
    ``v_transposed``: v is [B, H, S] (paged: [P_total, H, page]); see the kernel API."""
    squeeze = q.ndim == 3
    if v_transposed:
        v = jnp.swapaxes(v, 1, 2)
    q4 = q[:, None] if squeeze else q
    if block_table is not None:
        k, k_scale = gather_pages(k, block_table, k_scale)
        v, v_scale = gather_pages(v, block_table, v_scale)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    if k_scale is not None:
        kf = kf * k_scale.astype(jnp.float32)[..., None]
    if v_scale is not None:
        vf = vf * v_scale.astype(jnp.float32)[..., None]
    t, h = q4.shape[1], q4.shape[-1]
    scale = h**-0.5 if sm_scale is None else sm_scale
    mask = visible_mask(lengths.astype(jnp.int32), t, k.shape[1])  # [B, T, S]
    # Zero invisible rows first: 0 * NaN = NaN inside the P.V contraction otherwise.
    kf = jnp.where(mask.any(1)[..., None], kf, 0.0)
    vf = jnp.where(mask.any(1)[..., None], vf, 0.0)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("BTNH,BSH->BTNS", q4.astype(jnp.float32), kf, precision=hi) * scale
    s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    lsum = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("BTNS,BSH->BTNH", p, vf, precision=hi)
    o = jnp.where(lsum > 0, o / jnp.where(lsum > 0, lsum, 1.0), 0.0)
    lse = jnp.where(
        lsum[..., 0] > 0, jnp.log(jnp.where(lsum[..., 0] > 0, lsum[..., 0], 1.0)), -jnp.inf
    )
    lse = lse + m_safe[..., 0]
    out = o.astype(jnp.bfloat16)
    if squeeze:
        out, lse = out[:, 0], lse[:, 0]
    return (out, lse) if return_lse else out
