"""Public grouped GEMM API: ``grouped_matmul`` and ``grouped_swiglu`` (MoE expert FFN).

Rows of ``x`` are sorted by group (expert); ``group_sizes[g]`` rows in a row use group g's
weights. Weights are ``[G, N, K]`` (K-major, the project-wide ``[out, in]`` layout). FP8 inputs
follow ``step3_jax.quant``: activations per-token per-128 scales ``[M, K/128]``, weights
128x128 block scales ``[G, N/128, K/128]``; dequantized = float32(values) * scale. Output is
bf16 with f32 accumulation. Rows past ``sum(group_sizes)`` are zero.

Implementations:
* ``"pallas"``: the Mosaic GPU kernel (``mosaic_gpu.py``), Hopper only.
* ``"xla"``: portable; cost grows with the routed rows, not with the number of groups: groups
  are cut into 64-row tiles and a ``lax.scan`` over the tiles multiplies each by its own
  group's weights (empty tiles skipped with ``lax.cond``). XLA's ``lax.ragged_dot`` is not used
  because it runs dense over all groups on GPU.
* ``None``: ``"pallas"`` when it can run here (`supported`), else ``"xla"``, by the one rule
  of `step3_jax.kernels.dispatch`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from step3_jax import quant
from step3_jax.kernels import dispatch
from step3_jax.kernels.checks import as_array, concrete
from step3_jax.kernels.grouped_gemm import mosaic_gpu
from step3_jax.kernels.grouped_gemm.activations import ACTIVATIONS, check_epilogue
from step3_jax.kernels.grouped_gemm.config import SCALE_BLOCK, TuningConfig, tuned_config
from step3_jax.kernels.grouped_gemm.dense_group import DenseGroup

XLA_TILE = 64  # rows per scan step of the "xla" path


def _is_fp8(a) -> bool:
    return a.dtype == jnp.float8_e4m3fn


def _check_scale(name, scale, shape):
    if scale is None:
        raise ValueError(f"{name} is required for FP8 inputs: expected f32 {shape}")
    if tuple(scale.shape) != tuple(shape) or scale.dtype != jnp.float32:
        raise ValueError(
            f"{name} must be float32 {tuple(shape)}, got {scale.dtype} {tuple(scale.shape)}"
        )


def check_offset(name: str, offset, groups: int, pool: int) -> None:
    """``offset + groups <= pool`` and ``offset >= 0`` for an offset known here (a Python or
    NumPy int, or a concrete array: an eager call); a traced one is the caller's to keep
    (`lax.dynamic_index_in_dim` would clamp it silently onto the pool's last weight)."""
    if offset is None or not concrete(offset):
        return
    value = np.asarray(offset)  # one host read (eager calls only)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{name} must be an int scalar, got {offset!r}")
    o = int(value)
    if o < 0 or o + groups > pool:
        raise ValueError(
            f"{name}={o} with G={groups} groups needs a pool of >= {o + groups} weights "
            f"(and {name} >= 0), got P={pool}"
        )


def _check_group_values(group_sizes, rows: int) -> None:
    """Concrete ``group_sizes`` (not traced): non-negative, summing to at most ``rows``."""
    if not concrete(group_sizes):
        return
    sizes = np.asarray(group_sizes).astype(np.int64)
    if (sizes < 0).any() or sizes.sum() > rows:
        raise ValueError(
            f"group_sizes must be >= 0 with sum <= {rows} (the routed rows of x), got "
            f"{sizes.tolist() if sizes.size <= 16 else f'sum {sizes.sum()}, min {sizes.min()}'}"
        )


def _validate(x, weights, group_sizes, x_scale, w_scales, implementation, pooled=False, dense=None):
    """Checks shapes/dtypes; returns (x, x_scale) with x quantized when weights are FP8."""
    dispatch.check_implementation("grouped_gemm", implementation)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float [M, K], got {x.dtype} {x.shape}")
    m, k = x.shape
    w0 = weights[0]
    if w0.ndim != 3 or w0.shape[2] != k or not jnp.issubdtype(w0.dtype, jnp.floating):
        raise ValueError(
            f"weights must be float [G, N, K={k}] (K-major), got {w0.dtype} {w0.shape}"
        )
    for w in weights[1:]:
        if w.shape != w0.shape or w.dtype != w0.dtype:
            raise ValueError(f"w_gate and w_up must match, got {w0.shape} and {w.shape}")
    pool, n, _ = w0.shape
    n_g = group_sizes.shape[0] if group_sizes.ndim == 1 else -1
    ok_g = 1 <= n_g <= pool if pooled else n_g == pool
    if not ok_g or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        want = f"[G <= {pool}] (group_offset given: a pool)" if pooled else f"[{pool}]"
        raise ValueError(
            f"group_sizes must be int {want}, got {group_sizes.dtype}{group_sizes.shape}"
        )
    g = group_sizes.shape[0]
    kb, nb = -(-k // SCALE_BLOCK), -(-n // SCALE_BLOCK)
    if _is_fp8(w0):
        for i, s in enumerate(w_scales):
            _check_scale(f"w_scale[{i}]", s, (g, nb, kb))
        if not _is_fp8(x):
            if x_scale is not None:
                raise ValueError("x_scale given but x is not float8_e4m3fn")
            x, x_scale = quant.quantize_activations(x)  # per token per 128 group
        _check_scale("x_scale", x_scale, (m, kb))
    elif _is_fp8(x):
        raise ValueError(f"x is FP8 but weights are {w0.dtype}: FP8 x needs FP8 weights")
    elif any(s is not None for s in (x_scale, *w_scales)):
        raise ValueError("scales are only accepted with float8_e4m3fn weights")
    if dense is not None:
        if not isinstance(dense, DenseGroup):
            raise TypeError(f"dense must be a DenseGroup, got {type(dense).__name__}")
        dense.check(m, n, k, len(weights), _is_fp8(w0))
    return x, x_scale


def supported(x, weights, dense: DenseGroup | None = None) -> str | None:
    """None if the Mosaic GPU kernel can run this call on the default device, else the reason
    (shapes may be abstract). The dispatch rule is `step3_jax.kernels.dispatch.choose`."""
    if not mosaic_gpu.available():
        return "this jax has no usable Mosaic GPU Pallas API"
    kind = dispatch.hopper_device()
    if kind is None:
        return "needs a Hopper GPU (H100/H200)"
    if x.dtype not in (jnp.bfloat16, jnp.float8_e4m3fn):
        return f"needs bfloat16 or float8_e4m3fn rows, got {x.dtype}"
    _, n, k = weights[0].shape
    if n % 128 or k % 128:
        return f"needs N and K multiples of 128, got N={n} K={k}"
    if dense is not None and (dense.n % 128 or dense.k % 128 or dense.row0 % 8):
        return (
            f"needs a dense group's N and K multiples of 128 and its first row of 8, got "
            f"N={dense.n} K={dense.k} row0={dense.row0}"
        )
    return None


def _xla_tiles(group_sizes, m: int, tile: int):
    """Static-length list of (group, first row, rows) of ``tile``-row pieces of each group
    (groups end at row ``m``)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    start = mosaic_gpu.running_sum(jnp, sizes) - sizes
    sizes = jnp.clip(sizes, 0, jnp.maximum(m - start, 0))
    n_g = (sizes + tile - 1) // tile
    t = jnp.arange(-(-m // tile) + group_sizes.shape[0], dtype=jnp.int32)
    g, j, tile_end = mosaic_gpu.tile_groups(jnp, n_g, t)
    rows = jnp.where(t < tile_end[-1], jnp.clip(sizes[g] - j * tile, 0, tile), 0)
    return g, start[g] + j * tile, rows


def compute_dtype(x) -> jnp.dtype:
    """The XLA path's operand and output dtype: float32 for a float32 ``x`` (a float32 model
    stays float32 end to end), bfloat16 otherwise (bf16 and FP8 inputs; the kernel's dtype)."""
    return jnp.dtype(jnp.float32) if x.dtype == jnp.float32 else jnp.dtype(jnp.bfloat16)


def _dequant_rows(x, x_scale, idx, dtype):
    """Gathered rows of x as ``dtype`` (FP8 values times their per-128 scales)."""
    xt = x[idx].astype(jnp.float32)
    if x_scale is not None:
        xt = xt * jnp.repeat(x_scale[idx], SCALE_BLOCK, axis=1)[:, : x.shape[1]]
    return xt.astype(dtype)


def _dequant_expert(w, w_scale, g, offset, dtype):
    """Expert g's weight [N, K] (``w[offset + g]``) as ``dtype`` (FP8 values times their
    128x128 block scales ``w_scale[g]``)."""
    wg = lax.dynamic_index_in_dim(w, offset + g, keepdims=False)
    if w_scale is None:
        return wg.astype(dtype)
    sg = lax.dynamic_index_in_dim(w_scale, g, keepdims=False)
    return quant.dequantize_weight_blocks(wg, sg, dtype=dtype)


def _epilogue_xla(ys, bias=None, activation=None):
    """The f32 value to store: SwiGLU of two projections, or ``activation(y + bias)`` of
    one (the kernel's epilogue, `activations.ACTIVATIONS`)."""
    if len(ys) == 2:
        return jax.nn.silu(ys[0]) * ys[1]
    y = ys[0] if bias is None else ys[0] + bias.astype(jnp.float32)
    return y if activation is None else ACTIVATIONS[activation](y)


def _dense_xla(x, x_scale, dense: DenseGroup, cdt):
    """The dense group's rows of the output, [rows, N_d] (f32 accumulation)."""
    idx = dense.row0 + jnp.arange(dense.rows, dtype=jnp.int32)
    xt = _dequant_rows(x, x_scale, idx, cdt)[:, : dense.k]
    scales = dense.w_scales or (None,) * len(dense.weights)
    ys = [
        jnp.einsum(
            "TK,NK->TN",
            xt,
            w.astype(cdt) if s is None else quant.dequantize_weight_blocks(w, s, dtype=cdt),
            preferred_element_type=jnp.float32,
        )
        for w, s in zip(dense.weights, scales, strict=True)
    ]
    return _epilogue_xla(ys)


def _grouped_xla(
    x, weights, group_sizes, x_scale, w_scales, group_offsets, dense=None, bias=None,
    activation=None,
):  # fmt: skip
    """Tile-scan grouped GEMM (see module docstring), then the dense group's rows if any;
    `compute_dtype` operands and output, f32 accumulation."""
    cdt = compute_dtype(x)
    m = x.shape[0]
    n = weights[0].shape[1]
    w_scales = w_scales if w_scales else (None,) * len(weights)
    limit = m if dense is None else dense.row0
    tg, trow, trows = _xla_tiles(group_sizes, limit, XLA_TILE)
    local = jnp.arange(XLA_TILE, dtype=jnp.int32)

    def step(out, tile):
        g, row0, rows = tile

        def compute(out):
            idx = jnp.minimum(row0 + local, m - 1)
            xt = _dequant_rows(x, x_scale, idx, cdt)
            ys = [
                jnp.einsum(
                    "TK,NK->TN",
                    xt,
                    _dequant_expert(w, s, g, off, cdt),
                    preferred_element_type=jnp.float32,
                )
                for w, s, off in zip(weights, w_scales, group_offsets, strict=True)
            ]
            y = _epilogue_xla(ys, bias, activation)
            dst = jnp.where(local < rows, row0 + local, m)  # m: dropped (out of bounds)
            return out.at[dst].set(y.astype(out.dtype), mode="drop")

        return lax.cond(rows > 0, compute, lambda o: o, out), None

    out0 = jnp.zeros((m, n), cdt)
    out, _ = lax.scan(step, out0, (tg, trow, trows))
    if dense is not None:
        y = _dense_xla(x, x_scale, dense, cdt).astype(cdt)
        out = lax.dynamic_update_slice(out, y, (dense.row0, 0))
    return out


def _offsets(group_offset, weights, groups: int) -> tuple:
    """``group_offset`` (None, one scalar, or one per weight) as one int32 scalar per weight;
    offsets known here are checked against each weight's pool (`check_offset`)."""
    n_w = len(weights)
    offs = group_offset if isinstance(group_offset, (tuple, list)) else (group_offset,) * n_w
    if len(offs) != n_w:
        raise ValueError(f"group_offset: one scalar or {n_w} (one per weight), got {len(offs)}")
    for o, w in zip(offs, weights, strict=True):
        check_offset("group_offset", o, groups, w.shape[0])
    return tuple(jnp.asarray(0 if o is None else o, jnp.int32) for o in offs)


def _config_for(config, m):
    if config is not None:
        return config
    return tuned_config(jax.devices()[0].device_kind, m)


def _static_groups(group_sizes, group_offset, n_w: int):
    """``(sizes, offsets)`` as Python ints when both are known while tracing (NumPy sizes, int
    or None offsets: a dense GEMM's one group of M rows), else None. The kernel's tile table
    is then built on the host, a constant of the program (not a few small kernels a call)."""
    offs = group_offset if isinstance(group_offset, (tuple, list)) else (group_offset,) * n_w
    if not isinstance(group_sizes, np.ndarray):
        return None
    if not all(o is None or isinstance(o, (int, np.integer)) for o in offs):
        return None
    return tuple(int(v) for v in group_sizes), tuple(int(o or 0) for o in offs)


@functools.partial(
    jax.jit, static_argnames=("impl", "config", "zero_tail", "static_groups", "activation")
)
def _run(
    x, weights, group_sizes, x_scale, w_scales, group_offset, dense=None, bias=None, *, impl,
    config, zero_tail, static_groups=None, activation=None,
):  # fmt: skip
    if static_groups is not None:  # `_static_groups`: NumPy sizes and int offsets
        group_sizes, group_offset = np.asarray(static_groups[0], np.int32), static_groups[1]
    if impl == "xla":
        return _grouped_xla(
            x, weights, group_sizes, x_scale, w_scales, group_offset, dense, bias, activation
        )
    return mosaic_gpu.grouped_gemm_mgpu(
        x,
        weights,
        group_sizes,
        x_scale=x_scale,
        w_scales=w_scales or None,
        config=config,
        zero_tail=zero_tail,
        group_offset=group_offset,
        dense=dense,
        bias=bias,
        activation=activation,
    )


def grouped(
    x,
    weights,
    group_sizes,
    *,
    x_scale=None,
    w_scales=(),
    implementation=None,
    config: TuningConfig | None = None,
    zero_tail: bool = True,
    group_offset=None,
    dense: DenseGroup | None = None,
    bias=None,
    activation: str | None = None,
    check_values: bool = True,
):
    """Shared entry of both public functions (``weights``: (w,) or (w_gate, w_up)).

    ``zero_tail=False`` leaves rows past sum(group_sizes) unspecified (``moe_ffn`` masks them
    and saves their write traffic on an expert-parallel shard). ``group_offset`` (None: the
    weights are exactly the G groups; else an int or int32 scalar, may be traced, or a tuple
    with one per weight): group g multiplies by ``weights[i][offset_i + g]``, so the weights
    may be a larger pool ``[P, N, K]`` read in place (the AFD arena) instead of a sliced copy;
    the weight scales stay per group ``[G, ...]``. The caller keeps ``offset_i + G <= P``.
    ``group_sizes`` may be a NumPy array (sizes known when tracing). ``dense``: one more
    group with weights of its own over a static row range after the routed rows
    (`DenseGroup`: the shared expert in the routed launch); the routed groups end at its
    first row. ``bias`` / ``activation``: see `grouped_matmul`. ``check_values``: concrete
    (eager or NumPy) ``group_sizes`` are checked to be >= 0 and to sum to at most the routed
    rows (one host read; traced sizes never are); False where the caller built them
    (`moe_ffn`'s bincount).
    """
    pooled = group_offset is not None
    group_sizes = as_array(group_sizes)
    x, x_scale = _validate(
        x, weights, group_sizes, x_scale, tuple(w_scales), implementation, pooled, dense
    )
    if check_values:
        _check_group_values(group_sizes, x.shape[0] if dense is None else dense.row0)
    check_epilogue(weights, bias, activation, dense)
    w_scales = tuple(w_scales) if _is_fp8(weights[0]) else ()
    impl = dispatch.choose("grouped_gemm", implementation, supported(x, weights, dense))
    cfg = _config_for(config, x.shape[0]) if impl == "pallas" else None
    return _run(
        x,
        tuple(weights),
        jnp.asarray(group_sizes, jnp.int32),
        x_scale,
        w_scales,
        _offsets(group_offset, weights, group_sizes.shape[0]),
        dense,
        bias,
        impl=impl,
        config=cfg,
        zero_tail=zero_tail,
        static_groups=_static_groups(group_sizes, group_offset, len(weights)),
        activation=activation,
    )


def grouped_matmul(
    x: Float[Array, "M K"],
    w: Float[Array, "G N K"],
    group_sizes: Int[Array, " G"],
    *,
    x_scale: Float[Array, "M KB"] | None = None,
    w_scale: Float[Array, "G NB KB"] | None = None,
    implementation: str | None = None,
    config: TuningConfig | None = None,
    group_offset=None,
    bias: Float[Array, " N"] | None = None,
    activation: str | None = None,
) -> Float[Array, "M N"]:
    """``out[m] = x[m] @ w[group_offset + group(m)]^T`` for rows sorted by group; bf16 ``[M, N]``.

    x: [M, K] bf16 or float8_e4m3fn (bf16 x with FP8 w is quantized per token per 128).
    w: [P, N, K] bf16 or float8_e4m3fn, P >= G. group_sizes: [G] int (array, NumPy array or
    list), each >= 0, sum <= M; concrete sizes (an eager call, NumPy) are checked, traced ones
    never read back.
    x_scale: [M, ceil(K/128)] f32 (FP8 x). w_scale: [G, ceil(N/128), ceil(K/128)] f32 (FP8 w).
    group_offset: None, or the first weight of group 0 in a pool (see ``grouped``); one known
    here (an int, a concrete array) must keep ``0 <= group_offset <= P - G``.
    bias: [N] float, added to every computed row (one bias for all groups), and activation:
    None or ``"quick_gelu"``: the output is ``activation(x @ w^T + bias)``, evaluated in f32 on
    the accumulator before the one bf16 rounding (the kernel's epilogue: no extra pass over
    the output). Rows past sum(group_sizes) stay zero.
    """
    return grouped(
        x,
        (w,),
        group_sizes,
        x_scale=x_scale,
        w_scales=(w_scale,),
        implementation=implementation,
        config=config,
        group_offset=group_offset,
        bias=bias,
        activation=activation,
    )


def grouped_swiglu(
    x: Float[Array, "M K"],
    w_gate: Float[Array, "G F K"],
    w_up: Float[Array, "G F K"],
    group_sizes: Int[Array, " G"],
    *,
    x_scale: Float[Array, "M KB"] | None = None,
    w_gate_scale: Float[Array, "G FB KB"] | None = None,
    w_up_scale: Float[Array, "G FB KB"] | None = None,
    implementation: str | None = None,
    config: TuningConfig | None = None,
    group_offset=None,
) -> Float[Array, "M F"]:
    """Fused gate/up projection with SwiGLU: ``silu(x @ w_gate^T) * (x @ w_up^T)``, bf16.

    Shapes and dtypes as in ``grouped_matmul``; both projections use each row's group.
    """
    return grouped(
        x,
        (w_gate, w_up),
        group_sizes,
        x_scale=x_scale,
        w_scales=(w_gate_scale, w_up_scale),
        implementation=implementation,
        config=config,
        group_offset=group_offset,
    )
