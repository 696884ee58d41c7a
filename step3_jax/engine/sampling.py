"""Per-slot sampling for the engine: every batch row has its own temperature, top-k, top-p and
random stream, all as traced ``[B]`` arrays, so one compiled sampler serves any mix of requests.

Semantics per row match `step3_jax.sampling.sample` with that row's scalars: temperature 0 is
greedy (argmax); otherwise logits are divided by the temperature, the top-k then the nucleus
(top-p) filters of `step3_jax.sampling.filter_logits` apply (ties at a threshold kept), and a
token is drawn. Row b's key is ``fold_in(key(seeds[b]), steps[b])``: a request's draws depend on
its own seed and token index only, never on which slot or batch it shares.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def filter_rows(
    logits: Float[Array, "B V"], top_k: Int[Array, " B"], top_p: Float[Array, " B"]
) -> Float[Array, "B V"]:
    """Per-row top-k (0: off) then top-p (1: off) filtering: dropped logits become -inf."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # Nucleus over the top-k survivors: the first k sorted entries are exactly those kept
    # above, except ties at the k-th value, which top-k keeps too (and so do we here).
    desc = jnp.where(desc < kth, -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


@jax.jit
def sample_rows(
    logits: Float[Array, "B V"],
    temperature: Float[Array, " B"],
    top_k: Int[Array, " B"],
    top_p: Float[Array, " B"],
    seeds: Int[Array, " B"],
    steps: Int[Array, " B"],
) -> Int[Array, " B"]:
    """One token per row (int32 ``[B]``); see the module docstring."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = filter_rows(logits / t, top_k, top_p)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
        drawn = jax.vmap(functools.partial(jax.random.categorical, axis=-1))(keys, filtered)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    # An all-greedy batch skips the [B, V] sort entirely.
    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, draw)


__all__ = ["filter_rows", "sample_rows"]
