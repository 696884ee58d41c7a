"""Mosaic GPU (Hopper) grouped GEMM: FP8 x FP8 with 128x128 block scales, or bf16 x bf16.

One persistent kernel (``grid = #SMs``) walks a flat list of work items ``(row tile, n tile)``.
Row tiles come from a small table built with XLA before the launch (``_tile_table``): tile t
covers rows ``[row0_t, row0_t + rows_t)`` of ONE group ``g_t``, starting at the group's own
first row, so a group of 16 tokens is one tile and its expert weights are streamed exactly
once per n tile (with ``block_m``-aligned tiles such a group would often straddle two tiles and
be streamed twice). The loop order is m-minor: work items ``lin`` and ``lin+1`` share a weight
tile when they are row tiles of the same group, so concurrently running SMs hit L2.

Per tile, a TMA pipeline streams K in steps of ``bk`` (128 for FP8: one scale block):
  x tile  [block_m, bk]  (rows of the tile; K-major)
  w tile  [block_n, bk]  (expert g's rows of N; K-major, fed to wgmma transposed: 8-bit wgmma
                          needs both operands K-major, which is why weights are stored [N, K])
  x scale [1, block_m]   (x_scale transposed to [KB, M] so a K step's scales are contiguous)
FP8: each K step's wgmma result (f32) is multiplied by x_scale[row, kb] * w_scale[g, nb, kb]
and added to a register accumulator (the per-block "promotion" of DeepGEMM); bf16 accumulates
across K inside the wgmma accumulator. The epilogue writes bf16 rows of the tile with a ladder
of power-of-two TMA stores (TMA boxes are static; the row count is only known at run time).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU is importable on CPU-only installs too (lowering works without a GPU).
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - very old jax
    plgpu = None

from pallas_kernels.grouped_gemm.config import SCALE_BLOCK, TuningConfig

H100_SMS = 132


def available() -> bool:
    """Whether this jax ships the Mosaic GPU Pallas API this module needs."""
    need = ("kernel", "emit_pipeline", "wgmma", "nd_loop", "transpose_ref", "layout_cast", "load")
    return plgpu is not None and all(hasattr(plgpu, n) for n in need)


def _num_sms(config: TuningConfig) -> int:
    if config.num_sms is not None:
        return config.num_sms
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(dev.core_count)
    except (RuntimeError, AttributeError):
        pass
    return H100_SMS


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static facts of one kernel instance (shapes, tiles, mode)."""

    m: int
    n: int
    k: int
    groups: int
    block_m: int
    block_n: int
    block_k: int
    max_tiles: int
    fp8: bool
    swiglu: bool
    zero_tail: bool
    steps: int


def _tile_table(group_sizes, m: int, block_m: int, max_tiles: int, zero_tail: bool):
    """Row-tile table ``[5, max_tiles]`` int32: group, first row, rows, TMA box row, count.

    Tile j of group g covers rows ``[row0, row0 + rows)`` inside the TMA box
    ``[box, box + block_m)``. Boxes start on multiples of 8 (the SMEM tiling of the operand
    is 8 rows; Mosaic's layout inference rejects an unaligned dynamic start), so a group
    starting at row r gets ``cdiv(size + r % 8, block_m)`` tiles. Group tiles come first in
    group order; with ``zero_tail`` the rows past ``sum(group_sizes)`` get extra tiles with
    group -1 (written as zeros, never computed). ``count`` (row 4, column 0) is the number of
    live tiles.
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    start = jnp.cumsum(sizes) - sizes
    sizes = jnp.clip(sizes, 0, jnp.maximum(m - start, 0))  # never past row M
    align = start % 8
    n_g = jnp.where(sizes > 0, (sizes + align + block_m - 1) // block_m, 0)
    tile_end = jnp.cumsum(n_g)
    n_group_tiles = tile_end[-1]
    total_rows = jnp.sum(sizes)
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), sizes.shape[0] - 1)
    j = t - (tile_end[g] - n_g[g])
    box = start[g] - align[g] + j * block_m
    row0 = jnp.maximum(start[g], box)
    rows = jnp.clip(jnp.minimum(start[g] + sizes[g], box + block_m) - row0, 0, block_m)
    is_group = t < n_group_tiles
    # Zero-fill tiles for rows [total_rows, m), after the group tiles.
    tail_row0 = total_rows + (t - n_group_tiles) * block_m
    n_tail = (m - total_rows + block_m - 1) // block_m if zero_tail else 0
    tail_rows = jnp.clip(m - tail_row0, 0, block_m) if zero_tail else jnp.zeros_like(t)
    # Keep the box inside x (m is a multiple of 8 and >= block_m, so this stays aligned).
    box = jnp.clip(box, 0, m - block_m)
    count = jnp.zeros_like(t).at[0].set(n_group_tiles + n_tail)
    return jnp.stack(
        [
            jnp.where(is_group, g, -1),
            jnp.where(is_group, row0, tail_row0),
            jnp.where(is_group, rows, tail_rows),
            jnp.where(is_group, box, 0),
            count,
        ]
    ).astype(jnp.int32)


def _store_rows(o_smem, o_gmem, smem_start, gmem_row, rows, col0, st: _Static, block_n):
    """TMA-store ``rows`` (dynamic, 0..block_m) rows of ``o_smem`` from ``smem_start``.

    TMA boxes must be static, so we issue a ladder of power-of-two row counts (block_m,
    block_m/2, ..., 1), each taken iff its bit is set in ``rows``.
    """
    done = jnp.int32(0)
    size = 1 << int(math.log2(st.block_m))
    while size >= 1:
        if size <= st.m:

            @pl.when((rows & size) != 0)
            def _(size=size, done=done):
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(smem_start + done, size)],
                    o_gmem.at[pl.ds(gmem_row + done, size), pl.ds(col0, block_n)],
                )

        done = done + (rows & size)
        size //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _k_pipeline(st: _Static, refs, g, ni, load_row0, block_n):
    """Runs the K loop for one tile and returns the f32 accumulator(s) in registers."""
    x_gmem, w_gmems, xs_gmem, ws_gmems = refs
    swizzle = 128
    elems = swizzle // (1 if st.fp8 else 2)
    tr = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    nb = (ni * block_n) // SCALE_BLOCK
    acc_shape = (st.block_m, block_n)
    n_w = len(w_gmems)

    def zeros():
        return plgpu.layout_cast(jnp.zeros(acc_shape, jnp.float32), plgpu.Layout.WGMMA)

    def step(idxs, x_smem, *rest):
        (kb,) = idxs
        w_smems = rest[:n_w]
        xs_smem = rest[n_w] if st.fp8 else None
        accs = rest[-1]
        if st.fp8:
            # Row scales of this K block, broadcast along the tile's columns.
            xs = plgpu.load(xs_smem.at[0], (), layout=plgpu.Layout.WGMMA.reduce(1))
        new = []
        for i, (w_smem, acc) in enumerate(zip(w_smems, accs, strict=True)):
            if st.fp8:

                def mma(acc_ref, w_smem=w_smem):
                    plgpu.wgmma(acc_ref, x_smem, plgpu.transpose_ref(w_smem, (1, 0)))
                    return acc_ref[...]

                part = pl.run_scoped(mma, plgpu.ACC(acc_shape, jnp.float32))
                s = xs * ws_gmems[i][g, nb, kb]
                new.append(acc + part * lax.broadcast_in_dim(s, acc_shape, [0]))
            else:

                def mma_acc(acc_ref, w_smem=w_smem):
                    plgpu.wgmma(acc_ref, x_smem, plgpu.transpose_ref(w_smem, (1, 0)))

                new.append(pl.run_state(mma_acc)(plgpu.ACC.init(acc)))
        return tuple(new)

    # Rows start anywhere (the tile's own first row): an Element block dim takes the row
    # offset itself from the index map (a pre-sliced GMEM ref fails layout inference).
    rows = pl.Element(st.block_m)
    in_specs = [plgpu.BlockSpec((rows, st.block_k), lambda kb: (load_row0, kb), transforms=tr)]
    in_specs += [
        plgpu.BlockSpec((block_n, st.block_k), lambda kb: (0, kb), transforms=tr)
        for _ in range(n_w)
    ]
    args = [x_gmem]
    args += [w.at[g, pl.ds(ni * block_n, block_n), :] for w in w_gmems]
    if st.fp8:
        in_specs.append(plgpu.BlockSpec((1, rows), lambda kb: (kb, load_row0)))
        args.append(xs_gmem)
    pipe = plgpu.emit_pipeline(
        step,
        grid=(st.k // st.block_k,),
        in_specs=in_specs,
        max_concurrent_steps=st.steps,
        init_carry=tuple(zeros() for _ in range(n_w)),
    )
    return pipe(*args)


def _body(st: _Static, block_n: int, tiles_gmem, x_gmem, *refs):
    """Kernel body. Refs (GMEM): tiles [4, T] i32, x [M, K], w... [G, N, K], (x_scale_t
    [KB, M] f32, w_scale... [G, NB, KB] f32 when FP8), out [M, N] bf16; then SMEM scratch."""
    n_w = 2 if st.swiglu else 1
    w_gmems = refs[:n_w]
    rest = refs[n_w:]
    if st.fp8:
        xs_gmem, ws_gmems, rest = rest[0], rest[1 : 1 + n_w], rest[1 + n_w :]
    else:
        xs_gmem, ws_gmems = None, ()
    o_gmem, o_smem = rest
    grid_n = st.n // block_n
    n_tiles = tiles_gmem[4, 0]

    @plgpu.nd_loop((n_tiles * grid_n,), collective_axes="sm")
    def _work(info):
        lin = info.index[0]
        mi = lax.rem(lin, n_tiles)
        ni = lax.div(lin, n_tiles)
        g = tiles_gmem[0, mi]
        row0 = tiles_gmem[1, mi]
        rows = tiles_gmem[2, mi]
        # Written as (box // 8) * 8 so the compiler can see the alignment (see _tile_table).
        load_row0 = (tiles_gmem[3, mi] // 8) * 8
        col0 = ni * block_n

        @pl.when(g >= 0)
        def _compute():
            accs = _k_pipeline(st, (x_gmem, w_gmems, xs_gmem, ws_gmems), g, ni, load_row0, block_n)
            if st.swiglu:
                gate, up = accs
                out = gate * jax.nn.sigmoid(gate) * up
            else:
                (out,) = accs
            o_smem[...] = out.astype(o_smem.dtype)
            plgpu.commit_smem()
            _store_rows(o_smem, o_gmem, row0 - load_row0, row0, rows, col0, st, block_n)

        @pl.when(g < 0)
        def _zero_fill():
            o_smem[...] = jnp.zeros((st.block_m, block_n), o_smem.dtype)
            plgpu.commit_smem()
            _store_rows(o_smem, o_gmem, 0, row0, rows, col0, st, block_n)


def grouped_gemm_mgpu(
    x,
    weights,
    group_sizes,
    *,
    x_scale=None,
    w_scales=None,
    config: TuningConfig,
    zero_tail: bool = True,
):
    """Grouped GEMM on Hopper; ``weights`` is ``(w,)`` or ``(w_gate, w_up)`` for SwiGLU.

    x [M, K] (bf16 or e4m3), w [G, N, K] (same dtype family), group_sizes [G] int32,
    x_scale [M, K/128] f32 and w_scales ([G, N/128, K/128] f32,)*len(weights) for FP8.
    Returns [M, N] bf16. Rows past sum(group_sizes) are zero iff ``zero_tail`` (otherwise
    unspecified: callers such as ``moe_ffn`` mask them anyway and skip the write traffic).
    """
    if not available():
        raise NotImplementedError("this jax has no usable jax.experimental.pallas.mosaic_gpu")
    m, k = x.shape
    g, n, _ = weights[0].shape
    fp8 = x_scale is not None
    swiglu = len(weights) == 2
    block_n = config.swiglu_block_n if swiglu else config.block_n
    block_m = config.block_m
    m_ok = max(block_m, -(-m // 8) * 8)
    if m != m_ok:  # TMA boxes are block_m rows on multiples of 8 inside x: pad odd/tiny M
        pad = m_ok - m
        out = grouped_gemm_mgpu(
            jnp.pad(x, ((0, pad), (0, 0))),
            weights,
            group_sizes,
            x_scale=None if x_scale is None else jnp.pad(x_scale, ((0, pad), (0, 0))),
            w_scales=w_scales,
            config=config,
            zero_tail=zero_tail,
        )
        return out[:m]
    max_tiles = -(-m // block_m) + 2 * g + (-(-m // block_m) if zero_tail else 0)
    st = _Static(
        m=m,
        n=n,
        k=k,
        groups=g,
        block_m=block_m,
        block_n=block_n,
        block_k=SCALE_BLOCK if fp8 else 64,
        max_tiles=max_tiles,
        fp8=fp8,
        swiglu=swiglu,
        zero_tail=zero_tail,
        steps=config.max_concurrent_steps,
    )
    tiles = _tile_table(group_sizes, m, block_m, max_tiles, zero_tail)
    operands = [tiles, x, *weights]
    if fp8:
        operands += [x_scale.astype(jnp.float32).T, *(s.astype(jnp.float32) for s in w_scales)]
    kernel = plgpu.kernel(
        functools.partial(_body, st, block_n),
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        scratch_types=[plgpu.SMEM((block_m, block_n), jnp.bfloat16)],
        grid=(_num_sms(config),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(*operands)
