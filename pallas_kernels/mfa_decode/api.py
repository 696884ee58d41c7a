"""Public API: ``mfa_decode_attention`` (MFA decode attention against a bf16 or FP8 KV cache).

Layouts (Step-3 names: B batch, T new tokens, N=64 heads, H=256 head dim, S cache capacity):

* q: [B, T, N, H] bf16 (T in 1..8), or [B, N, H] meaning T=1.
* contiguous cache: k, v [B, S, H]; paged cache: k, v [P_total, page_size, H] with
  ``block_table`` [B, max_pages] int32 (page ids; entries past a sequence's last page unused).
* FP8 cache: k, v float8_e4m3fn with float32 per-token scales k_scale, v_scale [B, S]
  (paged: [P_total, page_size]); dequantized value = float32(k_fp8) * k_scale.
* lengths [B] int32: valid cache tokens per sequence INCLUDING the T new ones.
* page_offsets [4] int32 (paged only, optional): added to the page ids of k, v, k_scale and
  v_scale respectively, so the four can live at different places of shared page pools (the
  AFD arena reads its KV cache in place this way).
* v_transposed (FP8 cache only): v is stored transposed, [B, H, S] (paged: [P_total, H,
  page_size]), each of the 256 value dims' tokens contiguous. That is the layout an FP8 wgmma
  reads for P.V (the kernel then quantizes P per row to e4m3 instead of converting V to f16);
  the bytes per token, and v_scale's layout, are unchanged. The flag, not the shape, says which
  layout v has (a token-major [B, 256, 256] v would pass as a transposed one).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from step3_jax.kernels import dispatch
from step3_jax.kernels.checks import as_array, concrete
from step3_jax.kernels.mfa_decode import config as cfg_lib
from step3_jax.kernels.mfa_decode import ragged
from step3_jax.kernels.mfa_decode.merge import combine_splits
from step3_jax.kernels.mfa_decode.xla import mfa_decode_xla
from step3_jax.quant import QuantizedActivations, quantize_kv

FP8 = jnp.dtype(jnp.float8_e4m3fn)
MAX_T = 8


def _validate(
    q, k, v, lengths, k_scale, v_scale, block_table, pools=False, v_transposed=False,
    page_offsets=None,
):  # fmt: skip
    """Static checks (shapes, dtypes) always; then `_check_values` (concrete arrays only).
    ``pools``: paged k, v and scales may have different page counts (``page_offsets``)."""
    if v_transposed:  # validated as the token-major view it stands for
        if v.ndim != 3 or v.dtype != FP8:
            raise ValueError(
                "v_transposed=True (the FP8 P.V layout) needs a float8_e4m3fn v of [*, H, *], "
                f"got {v.dtype} {v.shape}"
            )
        v = jax.ShapeDtypeStruct((v.shape[0], v.shape[2], v.shape[1]), v.dtype)
    if q.ndim != 4 or not 1 <= q.shape[1] <= MAX_T:
        raise ValueError(
            f"q must be [B, T, N, H] with T in 1..{MAX_T} (or [B, N, H]), got {q.shape}"
        )
    b, _, _, h = q.shape
    if q.dtype != jnp.bfloat16:
        raise ValueError(f"q must be bfloat16, got {q.dtype}")
    same = k.shape[1:] == v.shape[1:] if pools else k.shape == v.shape  # pools: any page count
    if not same or k.ndim != 3 or k.shape[-1] != h:
        what = " (v given transposed, shown token-major)" if v_transposed else ""
        raise ValueError(f"k and v must both be [*, *, H={h}]{what}, got {k.shape} and {v.shape}")
    if k.dtype != v.dtype or k.dtype not in (jnp.dtype(jnp.bfloat16), FP8):
        raise ValueError(f"k, v must both be bfloat16 or float8_e4m3fn, got {k.dtype}, {v.dtype}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int [B={b}], got {lengths.dtype} {lengths.shape}")
    if block_table is None and k.shape[0] != b:
        raise ValueError(f"contiguous k must be [B={b}, S, H], got {k.shape}")
    if block_table is not None and (
        block_table.ndim != 2
        or block_table.shape[0] != b
        or not jnp.issubdtype(block_table.dtype, jnp.integer)
    ):
        raise ValueError(
            f"block_table must be int32 [B={b}, max_pages], got {block_table.dtype} "
            f"{block_table.shape}"
        )
    if (k.dtype == FP8) != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale are required for an FP8 cache and only then")
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        want = (sc.shape[0] if pools and sc is not None else k.shape[0], k.shape[1])
        if sc is not None and (sc.shape != want or sc.dtype != jnp.float32):
            raise ValueError(f"{name} must be float32 {want}, got {sc.dtype} {sc.shape}")
    pages = [("k", k.shape[0]), ("v", v.shape[0])]
    scales = (("k_scale", k_scale), ("v_scale", v_scale))
    pages += [(n, sc.shape[0]) for n, sc in scales if sc is not None]
    _check_values(lengths, block_table, k.shape[1], pages, page_offsets)


def _check_values(lengths, block_table, tokens: int, pools: list, page_offsets=None) -> None:
    """Values of concrete (not traced) arrays: ``0 <= lengths <= capacity``, and each page a
    sequence reads (its first ``ceil(lengths / page_size)`` table entries, plus the operand's
    page offset) inside that operand's pool: the XLA gather would clamp or wrap a bad id onto
    another sequence's page, the kernel read out of bounds. Under jit the arrays are tracers
    and nothing is read back (no host sync in the decode loop). ``tokens``: S of a contiguous
    cache, else the page size; ``pools``: (name, page count) of k, v and the scales."""
    if not concrete(lengths):
        return
    lens = np.asarray(lengths).astype(np.int64)
    cap = tokens if block_table is None else block_table.shape[1] * tokens
    bad = np.flatnonzero((lens < 0) | (lens > cap))
    if bad.size:
        what = "S" if block_table is None else "max_pages * page_size"
        raise ValueError(f"lengths must be in [0, {what}={cap}], got {lens[bad[0]]} at b={bad[0]}")
    if block_table is None or not concrete(block_table, page_offsets):
        return
    table = np.asarray(block_table).astype(np.int64)
    read = np.arange(table.shape[1])[None, :] < -(-lens // tokens)[:, None]  # [B, max_pages]
    offsets = np.zeros(4, np.int64) if page_offsets is None else np.asarray(page_offsets)
    for i, (name, n_pages) in enumerate(pools):
        ids = table + int(offsets[i])
        bad = np.argwhere(read & ((ids < 0) | (ids >= n_pages)))
        if bad.size:
            b, j = bad[0]
            what = "block_table" if page_offsets is None else f"block_table + page_offsets[{i}]"
            raise ValueError(
                f"{what} entries must be in [0, P_total={n_pages}) ({name}'s pool), got "
                f"{ids[b, j]} (row {b}, page {j}, read for lengths[{b}]={lens[b]})"
            )


def _sm_scale(sm_scale, head_dim: int) -> float:
    """The softmax scale as a Python float (a static argument): 1/sqrt(H) by default; else a
    finite positive real number."""
    if sm_scale is None:
        return float(head_dim**-0.5)
    try:  # a Python/NumPy number or a concrete 0-d array; never a string or a bool
        value = None if isinstance(sm_scale, (str, bytes, bool)) else float(sm_scale)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"sm_scale must be a finite positive number known when tracing (or None), got "
            f"{sm_scale!r}"
        )
    return value


def supported(q, k, block_table=None) -> str | None:
    """None if the Pallas kernel can run this call on the default device, else the reason
    (shapes may be abstract). The dispatch rule is `step3_jax.kernels.dispatch.choose`."""
    kind = dispatch.hopper_device()
    if kind is None:
        return "needs a Hopper GPU (H100/H200)"
    if cfg_lib.device_family(kind) is None:
        return f"no tuning table for {kind}"
    n, h = q.shape[-2:]
    if (n, h) != (64, 256):
        return f"needs N=64 heads of H=256, got q {tuple(q.shape)}"
    if jnp.dtype(q.dtype) != jnp.dtype(jnp.bfloat16):
        return f"needs a bfloat16 q, got {q.dtype}"
    t = 1 if q.ndim == 3 else q.shape[1]
    if t > MAX_T:
        return f"handles at most T={MAX_T} new tokens per sequence, got T={t}"
    return None


def mfa_decode_attention(
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
    implementation: str | None = None,
    config: cfg_lib.TuningConfig | None = None,
    page_offsets: Int[Array, " 4"] | None = None,
    v_transposed: bool = False,
    quantize_out: bool = False,
):
    """MFA decode attention; returns out bf16 like q (and lse float32 [B, T, N], natural log).

    ``quantize_out``: out is instead `step3_jax.quant.QuantizedActivations` (values [B, T, N, H]
    e4m3, scales [B, T, N, 2]: one per head per 128 columns, standing for bf16; an o_proj's
    FP8 input): written by the kernel's epilogue from its f32 output where the grid is unsplit
    with the ring epilogue (the FP8 default at large B), else `quant.quantize_activations` of
    the bf16 output.

    Query t of sequence b sits at ``lengths[b] - T + t`` and sees slots ``s <=`` that position;
    slots at or beyond ``lengths[b]`` never influence the result (they may hold NaN). A query
    with no visible key returns zeros and lse = -inf.
    """
    lengths, block_table, page_offsets = map(as_array, (lengths, block_table, page_offsets))
    squeeze = q.ndim == 3
    q4 = q[:, None] if squeeze else q
    if page_offsets is not None:
        return _with_page_offsets(
            q, k, v, lengths, k_scale, v_scale, block_table, page_offsets,
            sm_scale=sm_scale, return_lse=return_lse, implementation=implementation,
            config=config, v_transposed=v_transposed, quantize_out=quantize_out,
        )  # fmt: skip
    _validate(q4, k, v, lengths, k_scale, v_scale, block_table, v_transposed=v_transposed)
    scale = _sm_scale(sm_scale, q4.shape[-1])
    impl = dispatch.choose("mfa_decode_attention", implementation, supported(q4, k, block_table))
    args = (q4, k, v, lengths, k_scale, v_scale, block_table, scale)
    if impl == "xla":
        out, lse = _xla_jit(*args, v_transposed)
    else:
        out, lse = _pallas(*args, config, v_transposed, quantize_out)
    return _finish(out, lse, squeeze, quantize_out, return_lse)


def _finish(out, lse, squeeze: bool, quantize_out: bool, return_lse: bool):
    """The caller's output form: `QuantizedActivations` with ``quantize_out`` (the kernel's
    FP8 values and scales as they are, else the bf16 output quantized), T dropped for a
    [B, N, H] q."""
    if isinstance(out, tuple):  # the kernel's FP8 values and [B, T, 2, N] scales
        out = QuantizedActivations(out[0], jnp.swapaxes(out[1], -1, -2), jnp.dtype(jnp.bfloat16))
    elif quantize_out:
        out = QuantizedActivations.quantize(out)
    if squeeze:
        out, lse = jax.tree.map(lambda a: a[:, 0], out), lse[:, 0]
    return (out, lse) if return_lse else out


def _with_page_offsets(q, k, v, lengths, k_scale, v_scale, table, offsets, **kw):
    """``page_offsets`` path (validated first, the pools and their offsets included): pallas
    passes them to the kernel; xla gathers each operand's pages (the reference) and runs the
    contiguous XLA path."""
    if table is None:
        raise ValueError("page_offsets needs a paged cache (block_table)")
    if offsets.shape != (4,) or not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise ValueError(f"page_offsets must be int32 [4], got {offsets.dtype} {offsets.shape}")
    q4 = q[:, None] if q.ndim == 3 else q
    vt, quantize_out = kw["v_transposed"], kw["quantize_out"]
    _validate(q4, k, v, lengths, k_scale, v_scale, table, True, vt, offsets)
    scale = _sm_scale(kw["sm_scale"], q4.shape[-1])
    impl = dispatch.choose("mfa_decode_attention", kw["implementation"], supported(q4, k, table))
    if impl == "pallas":
        args = (q4, k, v, lengths, k_scale, v_scale, table, scale, kw["config"], vt)
        out, lse = _pallas(*args, quantize_out, page_offsets=offsets.astype(jnp.int32))
        return _finish(out, lse, q.ndim == 3, quantize_out, kw["return_lse"])
    # The reference path: token-major V, each operand's pages gathered.
    ops = [k, jnp.swapaxes(v, 1, 2) if vt else v, k_scale, v_scale]
    b = table.shape[0]
    for i, a in enumerate(ops):
        if a is not None:  # [B, P, page, ...] -> [B, P * page, ...]
            pages = jnp.take(a, table + offsets[i], axis=0)
            ops[i] = pages.reshape(b, -1, *a.shape[2:])
    out, lse = _xla_jit(q4, *ops[:2], lengths, *ops[2:], None, scale)
    return _finish(out, lse, q.ndim == 3, quantize_out, kw["return_lse"])


@functools.partial(jax.jit, static_argnums=(7, 8))
def _xla_jit(q, k, v, lengths, k_scale, v_scale, block_table, sm_scale, v_transposed=False):
    return mfa_decode_xla(
        q,
        k,
        jnp.swapaxes(v, 1, 2) if v_transposed else v,  # token-major: [B, S, H] / [P, page, H]
        lengths,
        k_scale=k_scale,
        v_scale=v_scale,
        block_table=block_table,
        sm_scale=sm_scale,
    )


def _resolve_config(
    config,
    kv_dtype,
    num_ctas: int,
    max_len: int,
    page_size,
    num_sms=None,
    v_transposed=False,
    num_seqs=None,
    quantize_out=False,
):
    """Config for this call: tuned table (fitted to smem; the ragged work list where
    `config.use_ragged_work_list` says it pays) or the caller's (validated);
    ``v_transposed``: its FP8 P.V form (`TuningConfig.for_transposed_v`). ``num_seqs``: the
    batch B (``num_ctas`` is B * T), default ``num_ctas``.

    Returns (config, num_splits, output dtype). The output dtype is bf16 on an unsplit grid,
    float8_e4m3fn there with ``quantize_out`` and the ring epilogue (the epilogue writes the
    o_proj's FP8 input), float32 partials otherwise. num_splits: the config's, else
    ``config.choose_num_splits`` (the cost model where this device family's ``SPLIT_COSTS`` are
    fitted, the measured min-tokens rule elsewhere);
    1 with ``config.ragged`` (the work list replaces the split grid; partials stay f32).
    """
    out_f32 = jnp.float32
    kind = jax.devices()[0].device_kind
    if config is None:
        config = cfg_lib.get_config(kind, kv_dtype)
        if page_size is not None and page_size < config.block_s:
            config = dataclasses.replace(config, block_s=64)
        seqs = num_ctas if num_seqs is None else num_seqs
        if cfg_lib.use_ragged_work_list(kind, kv_dtype, seqs, max_len):
            config = dataclasses.replace(config, ragged=True)
        config = config.for_transposed_v() if v_transposed else config
        # Partials of a split-K run are f32: shrink the ring until it fits.
        step = 2 if config.wg_split == "seq" else 1
        while config.smem_bytes(kv_dtype, out_f32, v_transposed=v_transposed) > (
            cfg_lib.SMEM_LIMIT_BYTES
        ):
            stages = config.num_stages - step
            ring_epi = config.ring_epilogue and stages >= 4  # it needs 4 slots
            config = dataclasses.replace(config, num_stages=stages, ring_epilogue=ring_epi)
    elif v_transposed:
        config = config.for_transposed_v()
    splits = 1 if config.ragged else config.num_splits
    if splits is None:
        costs = cfg_lib.split_costs(kind)
        splits = cfg_lib.choose_num_splits(
            num_ctas, max_len, config.block_s, _num_sms(num_sms), costs
        )
    out_dtype = jnp.float32 if splits > 1 or config.ragged else jnp.bfloat16
    if quantize_out and out_dtype == jnp.bfloat16 and config.ring_epilogue:
        out_dtype = FP8
    config.validate_smem(kv_dtype, out_dtype, v_transposed)
    if page_size is not None and page_size % config.block_s:
        raise ValueError(f"page_size={page_size} must be a multiple of block_s={config.block_s}")
    return config, splits, out_dtype


def _kernel_shape(
    q, k, lengths, block_table, sm_scale, config, num_sms=None, v_transposed=False,
    quantize_out=False,
):  # fmt: skip
    """Static KernelShape for these (possibly abstract) inputs; validates the config.
    ``quantize_out``: the epilogue writes FP8 where the grid allows it (unsplit, with the
    ring epilogue); elsewhere the output stays bf16 / f32 partials."""
    from step3_jax.kernels.mfa_decode import mosaic_gpu  # GPU-only imports stay off the xla path

    b, t, n, h = q.shape
    if (n, h) != (mosaic_gpu.NUM_HEADS, mosaic_gpu.HEAD_DIM):
        raise ValueError(f"the pallas kernel needs N=64 heads of H=256, got q {q.shape}")
    paged = block_table is not None
    page_size = k.shape[1] if paged else None
    max_len = block_table.shape[1] * page_size if paged else k.shape[1]
    config, splits, out_dtype = _resolve_config(
        config, k.dtype, b * t, max_len, page_size, num_sms, v_transposed, num_seqs=b,
        quantize_out=quantize_out,
    )  # fmt: skip
    if not paged and max_len % config.block_s:
        raise ValueError(f"cache length S={max_len} must be a multiple of block_s={config.block_s}")
    return mosaic_gpu.KernelShape(
        batch=b,
        t=t,
        max_len=max_len,
        block_s=config.block_s,
        num_stages=config.num_stages,
        num_splits=splits,
        fp8=k.dtype == FP8,
        paged=paged,
        page_size=page_size or 0,
        sm_scale=sm_scale,
        out_dtype=jnp.dtype(out_dtype),
        v_load=config.v_load,
        wg_split=config.wg_split,
        q_in_kernel=config.q_quant == "kernel" and k.dtype == FP8,
        q_tma=config.q_tma and k.dtype == FP8,
        ring_epilogue=config.ring_epilogue,
        v_convert=config.v_convert,
        ragged_target=_ragged_target(config, num_sms) if config.ragged else 0,
        ragged_max_splits=config.ragged_max_splits if config.ragged else 0,
        ragged_sms=_num_sms(num_sms) if config.ragged else 0,
        v_transposed=v_transposed,
        longest_first=_longest_first(config, b * t, splits, num_sms),
    )


def _longest_first(config, num_ctas: int, splits: int, num_sms=None) -> bool:
    """The config's ``longest_first``, else `config.use_longest_first`; never with a split
    grid or the work list (an explicit True there is an error)."""
    if config.longest_first is None:
        return cfg_lib.use_longest_first(num_ctas, splits, _num_sms(num_sms), config.ragged)
    if config.longest_first and (splits > 1 or config.ragged):
        raise ValueError(
            f"longest_first=True needs an unsplit grid without the work list, got "
            f"num_splits={splits}, ragged={config.ragged}"
        )
    return config.longest_first


def _num_sms(num_sms=None) -> int:
    return num_sms or getattr(jax.devices()[0], "core_count", 132) or 132


def _ragged_target(config, num_sms=None) -> int:
    """Pieces a ragged call aims for: SMs x ``ragged_items_per_sm``."""
    return max(1, int(_num_sms(num_sms) * config.ragged_items_per_sm))


def _pallas(
    q, k, v, lengths, k_scale, v_scale, block_table, sm_scale, config, v_transposed,
    quantize_out=False, page_offsets=None,
):  # fmt: skip
    """(out, lse) of the kernel; out is ``(values, scales)`` where it writes FP8 (see
    `_kernel_shape`'s ``quantize_out``)."""
    ks = _kernel_shape(
        q, k, lengths, block_table, sm_scale, config, v_transposed=v_transposed,
        quantize_out=quantize_out,
    )  # fmt: skip
    ks = dataclasses.replace(ks, page_offsets=page_offsets is not None)
    lengths = lengths.astype(jnp.int32)
    return _pallas_jit(ks, q, k, v, lengths, k_scale, v_scale, block_table, page_offsets)


def lower_pallas_for_gpu(
    q,
    k,
    v,
    lengths,
    *,
    k_scale=None,
    v_scale=None,
    block_table=None,
    sm_scale=None,
    config=None,
    num_sms: int = 132,
    v_transposed: bool = False,
    quantize_out: bool = False,
):
    """Lower the Pallas path for CUDA on any host (CI check of the Mosaic GPU lowering).

    Arguments may be ``jax.ShapeDtypeStruct``s. Returns the ``jax.stages.Lowered``.
    """
    q4 = jax.ShapeDtypeStruct((q.shape[0], 1, *q.shape[1:]), q.dtype) if len(q.shape) == 3 else q
    scale = _sm_scale(sm_scale, q4.shape[-1])
    ks = _kernel_shape(
        q4, k, lengths, block_table, scale, config, num_sms, v_transposed, quantize_out
    )
    traced = _pallas_jit.trace(ks, q4, k, v, lengths, k_scale, v_scale, block_table)
    return traced.lower(lowering_platforms=("cuda",))


@functools.partial(jax.jit, static_argnums=(0,))
def _pallas_jit(ks, q, k, v, lengths, k_scale, v_scale, block_table, page_offsets=None):
    from step3_jax.kernels.mfa_decode import mosaic_gpu

    q_scale = None
    if ks.fp8 and not ks.q_in_kernel:
        # Per (b, t, head) row FP8 q: the row scale is folded into the score multiply.
        q, q_scale = quantize_kv(q)
    table = None if block_table is None else block_table.astype(jnp.int32)
    if not ks.ragged_target:
        order = None
        if ks.longest_first:
            order = ragged.longest_first(lengths, max_len=ks.max_len, block_s=ks.block_s)
        out, lse, *scales = mosaic_gpu.mfa_decode_mosaic(
            ks, lengths, table, q, q_scale, k, v, k_scale, v_scale, page_offsets, order=order
        )
        if ks.out_fp8:
            return (out[0], scales[0][0]), lse[0]
        return combine_splits(out, lse)
    work, start, count = ragged.plan_ragged_work(
        lengths,
        max_len=ks.max_len,
        block_s=ks.block_s,
        target=ks.ragged_target,
        max_splits=ks.ragged_max_splits,
        num_sms=ks.ragged_sms,
    )
    out, lse = mosaic_gpu.mfa_decode_mosaic(
        ks, lengths, table, q, q_scale, k, v, k_scale, v_scale, page_offsets, work=work
    )  # [C, 1, T, N, H], [C, 1, T, N]
    return ragged.combine_ragged(out[:, 0], lse[:, 0], start, count, ks.ragged_max_splits)
