"""The routed MoE FFN on the grouped GEMMs: permute -> gate/up SwiGLU -> down -> combine.

``moe_ffn`` is what the model's MoE layer calls (one device's experts: all of them, an
expert-parallel shard ``[first_expert, first_expert + E_local)``, and/or a tensor-parallel
slice of F; the caller sums partial outputs across devices).

Steps (T tokens, K routes per token, TK = T*K pairs):
1. dispatch: sort the (token, k) pairs by local expert (pairs routed to other devices sort
   last), group sizes by bincount, gather the token rows (quantized to FP8 once per token,
   before the K-fold gather, when the weights are FP8);
2. ``grouped_swiglu`` over the sorted rows -> h [TK, F]; FP8: h is re-quantized per token per
   128 (the down projection is FP8 x FP8 too);
3. ``grouped_matmul`` with w_down -> y [TK, D];
4. combine: gather y back to (token, k) order with the inverse permutation and take the
   router-weighted sum over k (a gather plus a K-term sum is cheaper than a scatter-add).

With ``shared`` (the always-on shared expert, or this device's slice of it) both GEMMs take it
as one more group of their launch (`DenseGroup`): the T token rows follow the sorted rows, its
gate/up writes the first F_s columns of h, its down reads them, and its output is added in
f32. Meant to run its compute-bound tiles while the routed tiles stream expert weights; on an
H100 it was slower than the shared expert's own launches (docs/LOG.md, "The shared expert in
the routed launch"), so the model uses it only when asked (`KernelPolicy.shared_expert`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from step3_jax import quant
from step3_jax.kernels.grouped_gemm.api import check_offset, grouped
from step3_jax.kernels.grouped_gemm.config import TuningConfig
from step3_jax.kernels.grouped_gemm.dense_group import DenseGroup

# Up to this many (token, k) pairs `_dispatch` ranks them by compare-and-count ([TK, TK]
# compares folded into two reductions: ~2 small fusions on the GPU) instead of a sort kernel
# plus a scatter for the inverse (~14 us a MoE layer on an H100 at 1,536 pairs); past it the
# quadratic work would cost more than the sort.
RANK_BY_COUNT_MAX_PAIRS = 2048


def _dispatch(expert_ids, first_expert: int, e_local: int):
    """Stable sort order of the flattened (token, k) pairs by local expert, and group sizes.

    Returns (order [TK] int32, inverse [TK] int32, valid [TK] bool in original order,
    group_sizes [E_local] int32). ``inverse[i]`` is pair i's sorted position: the number of
    pairs with a smaller key plus the earlier pairs with the same key (the stable rank).
    """
    local = expert_ids.reshape(-1).astype(jnp.int32) - first_expert
    valid = (local >= 0) & (local < e_local)
    key = jnp.where(valid, local, e_local)  # non-local pairs last
    n = key.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    if n <= RANK_BY_COUNT_MAX_PAIRS:
        before = (key[None, :] < key[:, None]) | (
            (key[None, :] == key[:, None]) & (pos[None, :] < pos[:, None])
        )
        inverse = jnp.sum(before, axis=1, dtype=jnp.int32)
        order = jnp.sum(jnp.where(inverse[None, :] == pos[:, None], pos[None, :], 0), axis=1)
        # Measured: XLA once fused these [TK, TK] reductions into a consumer (the gather and
        # concatenation of `moe_ffn(shared=)`) and recomputed them per output element, ~700 us
        # a layer on an H100 (docs/LOG.md). The barrier keeps them fusions of their own.
        order, inverse = lax.optimization_barrier((order.astype(jnp.int32), inverse))
    else:
        order = jnp.argsort(key, stable=True).astype(jnp.int32)
        inverse = jnp.zeros_like(order).at[order].set(pos)
    group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    return order, inverse, valid, group_sizes


def _check_moe_args(x, expert_ids, expert_weights, w_gate, w_up, w_down, e_local):
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got {x.shape}")
    t, d = x.shape
    if (
        expert_ids.ndim != 2
        or expert_ids.shape[0] != t
        or not jnp.issubdtype(expert_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"expert_ids must be int [T={t}, K], got {expert_ids.dtype} {expert_ids.shape}"
        )
    if expert_weights.shape != expert_ids.shape:
        raise ValueError(f"expert_weights must be {expert_ids.shape}, got {expert_weights.shape}")
    e, f, d2 = w_gate.shape
    if d2 != d or w_up.shape[1:] != w_gate.shape[1:]:
        raise ValueError(f"w_gate/w_up must be [E, F, D={d}], got {w_gate.shape}, {w_up.shape}")
    if w_down.shape[1:] != (d, f):
        raise ValueError(f"w_down must be [E, D={d}, F={f}], got {w_down.shape}")
    if not 1 <= e_local <= min(e, w_up.shape[0], w_down.shape[0]):
        raise ValueError(
            f"num_local_experts={e_local} must be in [1, {min(e, w_up.shape[0], w_down.shape[0])}]"
            " (the weights' leading axis)"
        )


def moe_ffn(
    x: Float[Array, "T D"],
    expert_ids: Int[Array, "T K"],
    expert_weights: Float[Array, "T K"],
    w_gate: Float[Array, "E F D"],
    w_up: Float[Array, "E F D"],
    w_down: Float[Array, "E D F"],
    *,
    first_expert: int = 0,
    w_gate_scale: Float[Array, "E FB DB"] | None = None,
    w_up_scale: Float[Array, "E FB DB"] | None = None,
    w_down_scale: Float[Array, "E DB FB"] | None = None,
    quantize_activations: bool | None = None,
    implementation: str | None = None,
    config: TuningConfig | None = None,
    num_local_experts: int | None = None,
    weight_offset=None,
    x_scale: Float[Array, "T DB"] | None = None,
    shared: tuple | None = None,
    shared_scales: tuple | None = None,
) -> Float[Array, "T D"]:
    """Routed expert FFN of one device: ``sum_k weight[t,k] * expert_{id[t,k]}(x[t])``, plus
    the shared expert ``down(silu(gate x) * up x)`` when ``shared`` is given.

    Only experts ``[first_expert, first_expert + E_local)`` contribute; others give 0.
    Expert ``first_expert + j`` uses weights ``w_*[weight_offset + j]`` and scales
    ``w_*_scale[j]``: by default (both None) the weights are exactly
    this device's ``E_local`` experts; with a larger pool (e.g. every layer's experts in one
    AFD arena, read in place instead of copied) pass ``num_local_experts`` and the (possibly
    traced) ``weight_offset``: one int32 scalar, or a tuple (gate, up, down) of them.
    x: [T, D] bf16. expert_ids: [T, K] int (global ids). expert_weights: [T, K] f32.
    Weights bf16, or float8_e4m3fn with 128x128 block scales ([E, F/128, D/128] for gate/up,
    [E, D/128, F/128] for down). quantize_activations (None: iff weights are FP8) runs both
    GEMMs FP8 x FP8 with per-token per-128 activation scales. Returns [T, D] in x's dtype
    (a float32 x runs the XLA path in float32 end to end). ``x_scale`` [T, ceil(D/128)] f32:
    x is float8_e4m3fn, already quantized in that format (e.g. an AFD packet), and is used as
    it is (FP8 weights only); the result is then bf16.
    ``shared = (w_gate [F_s, D], w_up [F_s, D], w_down [D, F_s])`` in the experts' dtype with
    ``shared_scales`` (their 128x128 block scales, FP8 only), F_s <= F: the shared expert
    runs inside the same two launches (see the module docstring).
    """
    if (num_local_experts is None) != (weight_offset is None):
        raise ValueError(
            "num_local_experts and weight_offset go together (a pool of expert weights), "
            f"got {num_local_experts=}, {weight_offset is None=}"
        )
    e_local = w_gate.shape[0] if num_local_experts is None else int(num_local_experts)
    _check_moe_args(x, expert_ids, expert_weights, w_gate, w_up, w_down, e_local)
    fp8_w = w_gate.dtype == quant.FP8_DTYPE
    q_act = fp8_w if quantize_activations is None else quantize_activations
    if q_act != fp8_w:
        raise ValueError(
            f"{quantize_activations=} with {w_gate.dtype} weights: the kernels run FP8 x FP8 "
            "or bf16 x bf16 (W8A16 is not implemented)"
        )
    if x_scale is not None:
        want = (x.shape[0], -(-x.shape[1] // quant.BLOCK))
        ok_scale = x_scale.shape == want and x_scale.dtype == jnp.float32
        if not fp8_w or x.dtype != quant.FP8_DTYPE or not ok_scale:
            raise ValueError(
                f"x_scale (pre-quantized x) needs float8_e4m3fn x, FP8 weights and x_scale "
                f"float32 {want}; got x {x.dtype}, weights {w_gate.dtype}, x_scale "
                f"{x_scale.dtype} {x_scale.shape}"
            )
    out_dtype = jnp.bfloat16 if x_scale is not None else x.dtype
    t, n_k = expert_ids.shape
    order, inverse, valid, group_sizes = _dispatch(expert_ids, first_expert, e_local)
    token_of = order // n_k
    # group_sizes come from `_dispatch` (>= 0, sum <= TK by construction): never read back.
    kw = dict(implementation=implementation, config=config, zero_tail=False, check_values=False)
    off = weight_offset
    if off is not None and not isinstance(off, (tuple, list)):
        off = (off, off, off)
    if off is not None and len(off) != 3:
        raise ValueError(f"weight_offset: a scalar or (gate, up, down), got {len(off)} values")
    if off is not None:
        for o, w in zip(off, (w_gate, w_up, w_down), strict=True):
            check_offset("weight_offset", o, e_local, w.shape[0])
    gu_off, d_off = (None, None) if off is None else ((off[0], off[1]), off[2])
    if q_act:  # once per token (unless given), then gathered K-fold
        xr, xs = (x, x_scale) if x_scale is not None else quant.quantize_activations(x)
    else:
        xr, xs = x.astype(w_gate.dtype), None
    tk = t * n_k
    gate_up, down = _shared_groups(shared, shared_scales, tk, t) if shared else (None, None)
    rows = _with_shared_rows(xr[token_of], xr, gate_up)
    row_scales = None if xs is None else _with_shared_rows(xs[token_of], xs, gate_up)
    h = grouped(
        rows,
        (w_gate, w_up),
        group_sizes,
        x_scale=row_scales,
        w_scales=(w_gate_scale, w_up_scale),
        group_offset=gu_off,
        dense=gate_up,
        **kw,
    )
    hq, hs = quant.quantize_activations(h) if q_act else (h, None)
    y = grouped(
        hq,
        (w_down,),
        group_sizes,
        x_scale=hs,
        w_scales=(w_down_scale,),
        group_offset=d_off,
        dense=down,
        **kw,
    )
    # Rows of non-local pairs are unspecified (zero_tail=False): select, never multiply, so
    # stale NaN/inf there cannot leak into the sum.
    y_tk = jnp.where(valid[:, None], y[inverse], 0).reshape(t, n_k, -1)
    coef = jnp.where(valid.reshape(t, n_k), expert_weights, 0).astype(jnp.float32)
    out = jnp.einsum("TKD,TK->TD", y_tk.astype(jnp.float32), coef)
    if down is not None:
        out = out + y[down.row0 : down.row0 + t].astype(jnp.float32)
    return out.astype(out_dtype)


def _shared_groups(shared, shared_scales, tk: int, t: int):
    """The shared expert as the dense group of the gate/up and of the down launch: its T rows
    start at the first multiple of 8 after the ``tk`` sorted rows (the kernel's TMA boxes
    start on multiples of 8)."""
    if len(shared) != 3:
        raise ValueError(f"shared: (w_gate, w_up, w_down), got {len(shared)} arrays")
    scales = tuple(shared_scales) if shared_scales is not None else ()
    if scales and len(scales) != 3:
        raise ValueError(f"shared_scales: one per shared weight (3), got {len(scales)}")
    row0 = -(-tk // 8) * 8
    gate_up = DenseGroup(tuple(shared[:2]), scales[:2], row0=row0, rows=t)
    return gate_up, DenseGroup((shared[2],), scales[2:], row0=row0, rows=t)


def _with_shared_rows(routed, tokens, group: DenseGroup | None):
    """``routed`` rows, then (with a dense group) zero rows up to its first row and the
    token rows (one concatenation: XLA fuses it with the gather)."""
    if group is None:
        return routed
    pad = jnp.zeros((group.row0 - routed.shape[0], *routed.shape[1:]), routed.dtype)
    return jnp.concatenate([routed, pad, tokens.astype(routed.dtype)])


def shared_expert_ffn(
    x: Float[Array, "T D"],
    w_gate: Float[Array, "F D"],
    w_up: Float[Array, "F D"],
    w_down: Float[Array, "D F"],
    *,
    w_gate_scale: Float[Array, "FB DB"] | None = None,
    w_up_scale: Float[Array, "FB DB"] | None = None,
    w_down_scale: Float[Array, "DB FB"] | None = None,
    implementation: str | None = None,
    config: TuningConfig | None = None,
) -> Float[Array, "T D"]:
    """The always-on shared expert through the same kernels as one group holding every token.

    Weights as in ``moe_ffn`` without the expert axis. Returns ``down(silu(gate x) * up x)``
    as [T, D] in x's dtype (FP8 x FP8 when the weights are FP8).
    """
    t = x.shape[0]
    ones = jnp.ones((t, 1), jnp.float32)
    ids = jnp.zeros((t, 1), jnp.int32)
    add = lambda a: None if a is None else a[None]
    return moe_ffn(
        x,
        ids,
        ones,
        w_gate[None],
        w_up[None],
        w_down[None],
        w_gate_scale=add(w_gate_scale),
        w_up_scale=add(w_up_scale),
        w_down_scale=add(w_down_scale),
        implementation=implementation,
        config=config,
    )
