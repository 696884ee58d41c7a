"""Merging attention partials by their log-sum-exps: the split-K grid's J partials of a row
(`api`) and the ragged work list's pieces of a sequence (`ragged.combine_ragged`) both end
here. A leaf module: the kernel API imports the work list, and both import this."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def combine_splits(
    out: Float[Array, "J B T N H"], lse: Float[Array, "J B T N"]
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Merge split-K partials (each normalised over its own keys) by their log-sum-exps.

    out = sum_j exp(lse_j - lse) * out_j with lse = logsumexp_j lse_j; splits that saw no key
    have lse_j = -inf and weight 0; if no split saw a key the result is 0 and -inf.
    """
    if out.shape[0] == 1:
        return out[0].astype(jnp.bfloat16), lse[0]
    # Elementwise + reductions over J only (no einsum: a [J] contraction per (b, t, n) row
    # can become a batched matmul), so XLA fuses the merge into few, small kernels.
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)  # [J, B, T, N]; exp(-inf) = 0 for empty splits
    tot = jnp.sum(w, axis=0)
    pos = tot > 0
    o = jnp.sum(w[..., None] * out.astype(jnp.float32), axis=0)
    o = o * jnp.where(pos, 1.0 / jnp.where(pos, tot, 1.0), 0.0)[..., None]
    lse_all = jnp.where(pos, jnp.log(jnp.where(pos, tot, 1.0)) + m_safe, -jnp.inf)
    return o.astype(jnp.bfloat16), lse_all


__all__ = ["combine_splits"]
