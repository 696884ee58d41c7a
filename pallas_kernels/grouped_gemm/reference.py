"""Plain-jnp float32 oracles for the grouped GEMMs (dense over all groups: tests only).

Same signatures as the public API in ``api.py`` (minus ``implementation``/``config``). Every
row is multiplied by EVERY group's weights and the right result is then selected, which is
O(M * G * N * K): obviously correct, far too slow for real shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from step3_jax import quant


def dequantize_x(x: Array, x_scale: Array | None) -> Float[Array, "M K"]:
    """float32 activations: FP8 values times per-token per-128 scales, or a plain cast."""
    if x_scale is None:
        return x.astype(jnp.float32)
    return quant.dequantize_activations(x, x_scale)


def dequantize_w(w: Array, w_scale: Array | None) -> Float[Array, "G N K"]:
    """float32 weights: FP8 values times 128x128 block scales, or a plain cast."""
    if w_scale is None:
        return w.astype(jnp.float32)
    return quant.dequantize_weight_blocks(w, w_scale)


def row_groups(group_sizes: Int[Array, " G"], m: int) -> Int[Array, " M"]:
    """Group id of each row; rows past sum(group_sizes) get G (no group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")


def _per_row(x32: Array, w32: Array, group_sizes: Array) -> Float[Array, "M N"]:
    """y[m] = x[m] @ w[group(m)]^T in float32; zero rows past the groups."""
    m = x32.shape[0]
    y_all = jnp.einsum("MK,GNK->GMN", x32, w32, precision=jax.lax.Precision.HIGHEST)
    gid = row_groups(group_sizes, m)
    onehot = (gid[None, :] == jnp.arange(w32.shape[0])[:, None]).astype(jnp.float32)
    return jnp.einsum("GM,GMN->MN", onehot, y_all, precision=jax.lax.Precision.HIGHEST)


def grouped_matmul(x, w, group_sizes, *, x_scale=None, w_scale=None) -> Float[Array, "M N"]:
    """float32 oracle of ``api.grouped_matmul``: ``[M, N]`` float32 (not rounded to bf16)."""
    return _per_row(dequantize_x(x, x_scale), dequantize_w(w, w_scale), group_sizes)


def grouped_swiglu(
    x, w_gate, w_up, group_sizes, *, x_scale=None, w_gate_scale=None, w_up_scale=None
) -> Float[Array, "M F"]:
    """float32 oracle of ``api.grouped_swiglu``: silu(x @ w_gate^T) * (x @ w_up^T)."""
    x32 = dequantize_x(x, x_scale)
    gate = _per_row(x32, dequantize_w(w_gate, w_gate_scale), group_sizes)
    up = _per_row(x32, dequantize_w(w_up, w_up_scale), group_sizes)
    return jax.nn.silu(gate) * up


def moe_ffn(
    x,
    expert_ids,
    expert_weights,
    w_gate,
    w_up,
    w_down,
    *,
    first_expert=0,
    w_gate_scale=None,
    w_up_scale=None,
    w_down_scale=None,
) -> Float[Array, "T D"]:
    """float32 oracle of ``moe.moe_ffn`` with float32 activations (no activation FP8).

    Every token runs through every local expert; the router weights of (token, k) pairs routed
    to a local expert select and weight the results.
    """
    x32 = x.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    wg = dequantize_w(w_gate, w_gate_scale)
    wu = dequantize_w(w_up, w_up_scale)
    wd = dequantize_w(w_down, w_down_scale)
    h = jax.nn.silu(jnp.einsum("TD,EFD->ETF", x32, wg, precision=hp))
    h = h * jnp.einsum("TD,EFD->ETF", x32, wu, precision=hp)
    y = jnp.einsum("ETF,EDF->ETD", h, wd, precision=hp)
    e_local = w_gate.shape[0]
    local = expert_ids - first_expert
    onehot = (local[..., None] == jnp.arange(e_local)).astype(jnp.float32)  # [T, K, E]
    coef = jnp.einsum("TKE,TK->ET", onehot, expert_weights.astype(jnp.float32))
    return jnp.einsum("ET,ETD->TD", coef, y, precision=hp)
