"""Mosaic GPU (Hopper) grouped GEMM: FP8 x FP8 with 128x128 block scales, or bf16 x bf16.

One persistent kernel (``grid = #SMs``) walks a flat list of work items ``(row tile, n tile)``.
Row tiles come from a small table built before the launch (``_tile_table``: on the host for
static group sizes, else a few XLA fusions): tile t covers rows ``[row0_t, row0_t + rows_t)``
of ONE group ``g_t``, starting at the group's own first row, so a group of 16 tokens is one
tile and its expert weights are streamed exactly once per n tile (with ``block_m``-aligned
tiles such a group would often straddle two tiles and be streamed twice). The loop order is
m-minor: work items ``lin`` and ``lin+1`` share a weight tile when they are row tiles of the
same group, so concurrently running SMs hit L2.

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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU is importable on CPU-only installs too (lowering works without a GPU).
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - very old jax
    plgpu = None

from step3_jax.kernels.grouped_gemm.activations import KERNEL_ACTIVATIONS, check_epilogue
from step3_jax.kernels.grouped_gemm.config import SCALE_BLOCK, TuningConfig
from step3_jax.kernels.grouped_gemm.dense_group import DenseGroup

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
    compute_wgs: int = 1
    wg_dim: str = "n"
    # The dense group (`DenseGroup`): its rows [dense_row0, dense_row0 + dense_rows) of x,
    # its weights' N and K; dense_rows == 0: none.
    dense_row0: int = 0
    dense_rows: int = 0
    dense_n: int = 0
    dense_k: int = 0
    # The one-weight epilogue: a per-column f32 bias [N] added to the accumulator, then
    # `activations.KERNEL_ACTIVATIONS`' function (None: none), before the bf16 store.
    bias: bool = False
    activation: str | None = None

    def dense_tiles(self, box_m: int, cta_n: int) -> tuple[int, int]:
        """(row tiles, work items) of the dense group: its items come first in the work list
        (compute-heavy tiles start while the routed tiles stream their weights)."""
        if not self.dense_rows:
            return 0, 0
        m_tiles = -(-self.dense_rows // box_m)
        return m_tiles, m_tiles * (self.dense_n // cta_n)


def running_sum(xp, v):
    """Inclusive prefix sum of a short 1-D int vector as one masked reduction over a [G, G]
    triangle (``jnp.cumsum`` is a reduce-window kernel of its own on the GPU). ``xp``: numpy
    (host) or jax.numpy."""
    i = xp.arange(v.shape[0])
    return xp.sum(xp.where(i[None, :] <= i[:, None], v[None, :], 0), axis=1).astype(np.int32)


def tile_groups(xp, n_g, t):
    """``(g, j, tile_end)`` for tiles ``t`` of groups holding ``n_g`` tiles each, laid out one
    group after another: tile t is tile j of group g (g clipped to the last group past the
    end); ``tile_end`` the running tile count. The group is ``searchsorted(tile_end, t,
    side="right")`` as one compare-and-sum (its default method is a while loop of ~6 small
    kernels a call on the GPU)."""
    tile_end = running_sum(xp, n_g)
    g = xp.sum(tile_end[None, :] <= t[:, None], axis=1).astype(np.int32)
    g = xp.minimum(g, n_g.shape[0] - 1)
    return g, t - (tile_end[g] - n_g[g]), tile_end


def _tile_table(
    group_sizes,
    m: int,
    block_m: int,
    max_tiles: int,
    zero_tail: bool,
    group_offsets=(0,),
    limit: int | None = None,
):
    """Row-tile table ``[5 + n_w, max_tiles]`` int32: group, first row, rows, TMA box row,
    count, then per weight operand i its weight index ``group + group_offsets[i]`` (the tile's
    expert in that weight array, which may be a larger pool holding other experts, e.g. an
    AFD arena).

    Tile j of group g covers rows ``[row0, row0 + rows)`` inside the TMA box
    ``[box, box + block_m)``. Boxes start on multiples of 8 (the SMEM tiling of the operand
    is 8 rows; Mosaic's layout inference rejects an unaligned dynamic start), so a group
    starting at row r gets ``cdiv(size + r % 8, block_m)`` tiles. Group tiles come first in
    group order; with ``zero_tail`` the rows past ``sum(group_sizes)`` get extra tiles with
    group -1 (written as zeros, never computed). ``count`` (row 4, column 0) is the number of
    live tiles.

    NumPy ``group_sizes`` and int offsets (a dense GEMM: one group of M rows) build the table
    on the host, a constant of the program. Traced sizes build it with compare-and-reduce
    ops only: no scan (``searchsorted``'s default is a while loop of ~6 small kernels a call),
    no cumsum kernel; ~4 small fusions on the GPU.

    ``limit`` (default m): the groups and the zero tail end there (rows ``[limit, m)`` belong
    to a dense group with a work list of its own); boxes may still reach up to row m.
    """
    limit = m if limit is None else limit
    host = isinstance(group_sizes, np.ndarray) and all(
        isinstance(o, (int, np.integer)) for o in group_offsets
    )
    xp = np if host else jnp
    sizes = xp.maximum(group_sizes.astype(np.int32), 0)
    start = running_sum(xp, sizes) - sizes
    sizes = xp.clip(sizes, 0, xp.maximum(limit - start, 0))  # never past the limit
    align = start % 8
    n_g = xp.where(sizes > 0, (sizes + align + block_m - 1) // block_m, 0)
    t = xp.arange(max_tiles, dtype=np.int32)
    g, j, tile_end = tile_groups(xp, n_g, t)
    n_group_tiles = tile_end[-1]
    total_rows = xp.sum(sizes)
    box = start[g] - align[g] + j * block_m
    row0 = xp.maximum(start[g], box)
    rows = xp.clip(xp.minimum(start[g] + sizes[g], box + block_m) - row0, 0, block_m)
    is_group = t < n_group_tiles
    # Zero-fill tiles for rows [total_rows, m), after the group tiles.
    tail_row0 = total_rows + (t - n_group_tiles) * block_m
    n_tail = (limit - total_rows + block_m - 1) // block_m if zero_tail else 0
    tail_rows = xp.clip(limit - tail_row0, 0, block_m) if zero_tail else xp.zeros_like(t)
    # Keep the box inside x (m is a multiple of 8 and >= block_m, so this stays aligned).
    box = xp.clip(box, 0, m - block_m)
    count = xp.where(t == 0, n_group_tiles + n_tail, 0)
    return xp.stack(
        [
            xp.where(is_group, g, -1),
            xp.where(is_group, row0, tail_row0),
            xp.where(is_group, rows, tail_rows),
            xp.where(is_group, box, 0),
            count,
            *(xp.where(is_group, g + off, 0) for off in group_offsets),
        ]
    ).astype(np.int32)


def _store_rows(o_smem, o_gmem, smem_start, gmem_row, rows, col0, top: int, block_n: int):
    """TMA-store ``rows`` (dynamic, 0..block_m) rows of ``o_smem`` from ``smem_start``.

    TMA boxes must be static, so we issue a ladder of power-of-two row counts (block_m,
    block_m/2, ..., 1), each taken iff its bit is set in ``rows``.
    """
    done = jnp.int32(0)
    size = 1 << int(math.log2(top))
    while size >= 1:

        @pl.when((rows & size) != 0)
        def _(size=size, done=done):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(smem_start + done, size)],
                o_gmem.at[pl.ds(gmem_row + done, size), pl.ds(col0, block_n)],
            )

        done = done + (rows & size)
        size //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@dataclasses.dataclass(frozen=True)
class _Refs:
    """The kernel's GMEM operands after ``tiles`` and ``x``, and its scratch."""

    w: tuple  # routed weights [P, N, K], one per projection
    xs: object  # x_scale transposed [KB, M] f32 (FP8) or None
    ws: tuple  # routed weight scales [G, NB, KB] f32 (FP8) or ()
    dw: tuple  # the dense group's weights [N_d, K_d] or ()
    dws: tuple  # their block scales [N_d/128, K_d/128] f32 (FP8) or ()
    bias: object  # [N] f32 or None
    out: object  # [M, N] bf16
    scratch: tuple


def _split_refs(st: _Static, refs) -> _Refs:
    n_w = 2 if st.swiglu else 1
    take = lambda k: (refs[:k], refs[k:])
    w, refs = take(n_w)
    xs, ws = None, ()
    if st.fp8:
        (xs,), refs = take(1)
        ws, refs = take(n_w)
    dw, dws = (), ()
    if st.dense_rows:
        dw, refs = take(n_w)
        if st.fp8:
            dws, refs = take(n_w)
    bias = None
    if st.bias:
        (bias,), refs = take(1)
    return _Refs(w, xs, ws, dw, dws, bias, refs[0], tuple(refs[1:]))


@dataclasses.dataclass(frozen=True)
class _Item:
    """One work item: a row tile of one group times one ``cta_n``-wide column tile.

    ``g`` is the routed group (-1: a zero-fill tile past the groups; None: the dense group).
    Rows ``[row0, row0 + rows)`` of x lie inside the TMA box ``[box, box + box_m)``.
    ``w_views``: each weight's [cta_n, K] slice of this column tile; ``k_steps``: K steps
    of the pipeline; ``w_scale(i, nb, kb)``: weight i's block scale (FP8)."""

    g: object
    row0: object
    rows: object
    box: object
    ni: object
    w_views: tuple
    k_steps: int
    w_scale: object


def _for_each_item(st: _Static, tiles_gmem, r: _Refs, box_m: int, cta_n: int, run) -> None:
    """The persistent loop: this SM's share of the work items, ``run(item)`` on each.

    The dense group's items come first (static count: ``st.dense_tiles``), then the routed
    row tiles of the table times ``N / cta_n`` column tiles, m-minor (work items ``lin`` and
    ``lin + 1`` share a weight tile when they are row tiles of the same group)."""
    n_tiles = tiles_gmem[4, 0]
    dense_m, dense_items = st.dense_tiles(box_m, cta_n)
    n_w = len(r.w)

    @plgpu.nd_loop((dense_items + n_tiles * (st.n // cta_n),), collective_axes="sm")
    def _work(info):
        lin = info.index[0]
        if dense_items:

            @pl.when(lin < dense_items)
            def _dense():
                mi, ni = lax.rem(lin, dense_m), lax.div(lin, dense_m)
                row0 = st.dense_row0 + mi * box_m
                box = (jnp.minimum(row0, st.m - box_m) // 8) * 8  # 8-row aligned for Mosaic
                rows = jnp.minimum(box_m, st.dense_row0 + st.dense_rows - row0)
                views = tuple(w.at[pl.ds(ni * cta_n, cta_n), :] for w in r.dw)
                scale = lambda i, nb, kb: r.dws[i][nb, kb]
                run(_Item(None, row0, rows, box, ni, views, st.dense_k // st.block_k, scale))

        # Without a dense group every item is routed: no branch around them.
        routed = pl.when(lin >= dense_items) if dense_items else (lambda f: f())

        @routed
        def _routed():
            t = lin - dense_items
            mi, ni = lax.rem(t, n_tiles), lax.div(t, n_tiles)
            box = (tiles_gmem[3, mi] // 8) * 8  # written so the compiler sees the alignment
            wis = [tiles_gmem[5 + i, mi] for i in range(n_w)]
            g = tiles_gmem[0, mi]
            views = tuple(
                w.at[wi, pl.ds(ni * cta_n, cta_n), :] for w, wi in zip(r.w, wis, strict=True)
            )
            scale = lambda i, nb, kb: r.ws[i][g, nb, kb]
            row0, rows = tiles_gmem[1, mi], tiles_gmem[2, mi]
            run(_Item(g, row0, rows, box, ni, views, st.k // st.block_k, scale))


def _when_computed(item: _Item):
    """Decorator running its function for tiles that compute (not the zero-fill tiles)."""
    return (lambda f: f()) if item.g is None else pl.when(item.g >= 0)


def _specs_and_args(st: _Static, x_gmem, xs_gmem, item: _Item, cta_m: int, cta_n: int):
    """BlockSpecs and GMEM operands of one item's K pipeline."""
    tr = _transforms(st)
    box = item.box
    # Rows start at the tile's (8-aligned) box, not on a block_m grid: an Element block dim
    # takes the row offset itself from the index map (a pre-sliced GMEM ref fails Mosaic's
    # layout inference).
    rows = pl.Element(cta_m)
    specs = [plgpu.BlockSpec((rows, st.block_k), lambda kb: (box, kb), transforms=tr)]
    w_spec = plgpu.BlockSpec((cta_n, st.block_k), lambda kb: (0, kb), transforms=tr)
    specs += [w_spec] * len(item.w_views)
    args = [x_gmem, *item.w_views]
    if st.fp8:
        specs.append(plgpu.BlockSpec((1, rows), lambda kb: (kb, box)))
        args.append(xs_gmem)
    return specs, args


def _transforms(st: _Static):
    # One SMEM row of a K step is 128 bytes (128 e4m3 or 64 bf16): 128-byte swizzle.
    elems = 128 // (1 if st.fp8 else 2)
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _k_step(st: _Static, x_smem, w_smems, xs_smem, accs, w_scale_of):
    """One K step of one warpgroup: accs[i] += scaled(x_smem @ w_smems[i]^T).

    FP8: the step's wgmma result goes to a fresh f32 accumulator which is multiplied by the
    row scales (``xs_smem``: [block_m] f32) times the weight block scale ``w_scale_of(i)``
    (a scalar: the tile lies inside one 128-wide scale block) and added to ``accs[i]``.
    bf16: wgmma accumulates straight into ``accs[i]``.
    """
    shape = accs[0].shape
    if st.fp8:
        # Issue the scalar weight-scale loads (GMEM, L2-resident) before the wgmma so their
        # latency hides behind the tensor-core work instead of following the wait.
        w_scales = [w_scale_of(i) for i in range(len(w_smems))]
        xs = plgpu.load(xs_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
    new = []
    for i, (w_smem, acc) in enumerate(zip(w_smems, accs, strict=True)):
        w_t = plgpu.transpose_ref(w_smem, (1, 0))  # [bk, bn] view of the K-major tile
        if st.fp8:

            def mma(acc_ref, w_t=w_t):
                plgpu.wgmma(acc_ref, x_smem, w_t)
                return acc_ref[...]

            part = pl.run_scoped(mma, plgpu.ACC(shape, jnp.float32))
            scale = xs * w_scales[i]
            new.append(acc + part * lax.broadcast_in_dim(scale, shape, [0]))
        else:

            def mma_acc(acc_ref, w_t=w_t):
                plgpu.wgmma(acc_ref, x_smem, w_t)

            new.append(pl.run_state(mma_acc)(plgpu.ACC.init(acc)))
    return tuple(new)


def _epilogue_value(st: _Static, accs, bias_gmem=None, col0=None):
    """The f32 tile to store: SwiGLU of the two accumulators, or the one accumulator plus
    the bias of columns ``[col0, col0 + block_n)`` (read straight from GMEM into the
    accumulator's column layout) through the activation."""
    if st.swiglu:
        gate, up = accs
        return gate * jax.nn.sigmoid(gate) * up
    y = accs[0]
    if st.bias:
        cols = bias_gmem.at[pl.ds(col0, st.block_n)]
        # A GMEM load has no "optimized" (vectorized SMEM-style) form; block_n floats a tile.
        b = plgpu.load(cols, (), layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
        y = y + lax.broadcast_in_dim(b, y.shape, [1])
    if st.activation is not None:
        y = KERNEL_ACTIVATIONS[st.activation](y)
    return y


def _body(st: _Static, block_n: int, tiles_gmem, x_gmem, *refs):
    """One-warpgroup kernel. GMEM refs: tiles [5 + n_w, T] i32, x [M, K], w... [P, N, K] (P >= G),
    (x_scale_t [KB, M] f32, w_scale... [G, NB, KB] f32 when FP8), the dense group's weights
    (and scales), out [M, N] bf16; SMEM scratch o_smem [block_m, block_n] bf16."""
    r = _split_refs(st, refs)
    (o_smem,) = r.scratch
    n_w = len(r.w)

    def run(item: _Item):
        col0 = item.ni * block_n
        nb = col0 // SCALE_BLOCK

        @_when_computed(item)
        def _compute():
            def step(idxs, x_smem, *rest):
                (kb,) = idxs
                xs = rest[n_w].at[0] if st.fp8 else None
                w_scale = lambda i: item.w_scale(i, nb, kb)
                return _k_step(st, x_smem, rest[:n_w], xs, rest[-1], w_scale)

            specs, args = _specs_and_args(st, x_gmem, r.xs, item, st.block_m, block_n)
            accs = plgpu.emit_pipeline(
                step,
                grid=(item.k_steps,),
                in_specs=specs,
                max_concurrent_steps=st.steps,
                init_carry=tuple(_zeros((st.block_m, block_n)) for _ in range(n_w)),
            )(*args)
            o_smem[...] = _epilogue_value(st, accs, r.bias, col0).astype(o_smem.dtype)
            plgpu.commit_smem()
            row0, box = item.row0, item.box
            _store_rows(o_smem, r.out, row0 - box, row0, item.rows, col0, st.block_m, block_n)

        if item.g is not None:

            @pl.when(item.g < 0)
            def _zero_fill():
                o_smem[...] = jnp.zeros((st.block_m, block_n), o_smem.dtype)
                plgpu.commit_smem()
                _store_rows(o_smem, r.out, 0, item.row0, item.rows, col0, st.block_m, block_n)

    _for_each_item(st, tiles_gmem, r, st.block_m, block_n, run)


def _body_ws(st: _Static, block_n: int, tiles_gmem, x_gmem, *refs):
    """Warp-specialized kernel: warpgroups 0 and 1 compute, warpgroup 2 issues the TMA loads.

    The CTA tile is (2*block_m) x block_n (``wg_dim == "m"``: each compute warpgroup owns
    block_m rows) or block_m x (2*block_n) (``"n"``: each owns block_n columns). Same GMEM
    refs as ``_body``; SMEM scratch o_smem [2, block_m, block_n] bf16 (one per warpgroup).
    The routed and dense-group pipelines have the same block shapes, so they share one allocation.
    """
    r = _split_refs(st, refs)
    (o_smem2,) = r.scratch
    n_w = len(r.w)
    by_m = st.wg_dim == "m"
    cta_m, cta_n = (2 * st.block_m, block_n) if by_m else (st.block_m, 2 * block_n)
    wg = lax.axis_index("wg")

    def pipeline(body, ctx, item: _Item):
        specs, _ = _specs_and_args(st, x_gmem, r.xs, item, cta_m, cta_n)
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(item.k_steps,),
            memory_registers=40,
            in_specs=specs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=st.steps,
            compute_context=ctx,
        )

    ignore = lambda *_, **__: None
    zero = jnp.int32(0)
    probe_views = tuple(w.at[0, pl.ds(0, cta_n), :] for w in r.w)
    probe = _Item(zero, zero, zero, zero, zero, probe_views, st.k // st.block_k, None)
    _, alloc_args = _specs_and_args(st, x_gmem, r.xs, probe, cta_m, cta_n)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, probe).get_allocations(*alloc_args),
        collective_axes="wg",
    )
    def _scope(allocs):
        def run(item: _Item):
            col0 = item.ni * cta_n + (0 if by_m else wg * block_n)
            nb = col0 // SCALE_BLOCK
            o_smem = o_smem2.at[wg]
            # This warpgroup's rows of the tile, relative to the box: [lo, hi).
            base = wg * st.block_m if by_m else 0
            lo = jnp.maximum(item.row0 - item.box, base)
            hi = jnp.minimum(item.row0 - item.box + item.rows, base + st.block_m)
            my_rows = jnp.maximum(hi - lo, 0)

            def body(idxs, x_smem, *rest):
                (kb,) = idxs
                rows_ = pl.ds(wg * st.block_m, st.block_m)
                cols_ = pl.ds(wg * block_n, block_n)
                x_part = x_smem.at[rows_] if by_m else x_smem
                w_parts = rest[:n_w] if by_m else [w.at[cols_] for w in rest[:n_w]]
                xs = None
                if st.fp8:
                    xs = rest[n_w].at[0, rows_] if by_m else rest[n_w].at[0]
                w_scale = lambda i: item.w_scale(i, nb, kb)
                return _k_step(st, x_part, w_parts, xs, rest[-1], w_scale)

            def ctx(eval_pipeline):
                accs = eval_pipeline(tuple(_zeros((st.block_m, block_n)) for _ in range(n_w)))
                o_smem[...] = _epilogue_value(st, accs, r.bias, col0).astype(o_smem.dtype)
                plgpu.commit_smem()
                row = item.box + lo
                _store_rows(o_smem, r.out, lo - base, row, my_rows, col0, st.block_m, block_n)

            @_when_computed(item)
            def _compute():
                _, args = _specs_and_args(st, x_gmem, r.xs, item, cta_m, cta_n)
                pipeline(body, ctx, item)(*args, allocations=allocs)

            if item.g is not None:

                @pl.when((item.g < 0) & (wg < 2))
                def _zero_fill():
                    o_smem[...] = jnp.zeros((st.block_m, block_n), o_smem.dtype)
                    plgpu.commit_smem()
                    z_rows = jnp.clip(item.rows - base, 0, st.block_m) if by_m else item.rows
                    row = item.row0 + base
                    _store_rows(o_smem, r.out, 0, row, z_rows, col0, st.block_m, block_n)

        _for_each_item(st, tiles_gmem, r, cta_m, cta_n, run)


# Pipeline buffers must fit in Hopper's SMEM (232,448 bytes per CTA) next to the output
# staging tile(s) and barriers: measured, 6 steps of the 2-warpgroup SwiGLU tile (41,216
# bytes a step) asked for 264,288 bytes and was refused (docs/LOG.md, topic grouped_gemm).
_SMEM_BYTES = 232448
_SMEM_SLACK = 2048  # barriers and alignment


def _fit_steps(steps: int, box_m: int, cta_n: int, n_w: int, fp8: bool, out_bytes: int) -> int:
    """``steps`` lowered until the K pipeline's SMEM buffers fit (at least 2)."""
    item = 1 if fp8 else 2
    bk = SCALE_BLOCK if fp8 else 64
    per_step = (box_m + n_w * cta_n) * bk * item + (4 * box_m if fp8 else 0)
    return max(2, min(steps, (_SMEM_BYTES - _SMEM_SLACK - out_bytes) // per_step))


def _cta_shape(config: TuningConfig, block_n: int) -> tuple[int, int]:
    """(rows of the x TMA box, columns of the CTA tile) of a config."""
    ws = config.num_compute_wgs == 2
    box_m = config.block_m * (2 if ws and config.wg_dim == "m" else 1)
    cta_n = block_n * (2 if ws and config.wg_dim == "n" else 1)
    return box_m, cta_n


def _make_static(
    x,
    weights,
    num_groups: int,
    fp8: bool,
    config: TuningConfig,
    zero_tail: bool,
    dense: DenseGroup | None = None,
    bias: bool = False,
    activation: str | None = None,
) -> _Static:
    m, k = x.shape
    g, n = num_groups, weights[0].shape[1]
    swiglu = len(weights) == 2
    block_n = config.swiglu_block_n if swiglu else config.block_n
    box_m, cta_n = _cta_shape(config, block_n)
    n_out = config.num_compute_wgs  # one output staging tile per compute warpgroup
    steps = _fit_steps(
        config.max_concurrent_steps,
        box_m,
        cta_n,
        len(weights),
        fp8,
        out_bytes=n_out * config.block_m * block_n * 2,
    )
    return _Static(
        m=m,
        n=n,
        k=k,
        groups=g,
        block_m=config.block_m,
        block_n=block_n,
        block_k=SCALE_BLOCK if fp8 else 64,
        max_tiles=-(-m // box_m) + 2 * g + (-(-m // box_m) if zero_tail else 0),
        fp8=fp8,
        swiglu=swiglu,
        zero_tail=zero_tail,
        steps=steps,
        compute_wgs=config.num_compute_wgs,
        wg_dim=config.wg_dim,
        dense_row0=dense.row0 if dense else 0,
        dense_rows=dense.rows if dense else 0,
        dense_n=dense.n if dense else 0,
        dense_k=dense.k if dense else 0,
        bias=bias,
        activation=activation,
    )


def _make_kernel(st: _Static, config: TuningConfig):
    """The ``plgpu.kernel`` callable for a static instance."""
    common = dict(
        out_type=jax.ShapeDtypeStruct((st.m, st.n), jnp.bfloat16),
        grid=(_num_sms(config),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
            # the activation epilogue's exp and rsqrt as SFU instructions (`activations`)
            approx_math=st.activation is not None,
        ),
    )
    if st.compute_wgs == 2:
        return plgpu.kernel(
            functools.partial(_body_ws, st, st.block_n),
            scratch_types=[plgpu.SMEM((2, st.block_m, st.block_n), jnp.bfloat16)],
            num_threads=3,
            thread_name="wg",
            **common,
        )
    return plgpu.kernel(
        functools.partial(_body, st, st.block_n),
        scratch_types=[plgpu.SMEM((st.block_m, st.block_n), jnp.bfloat16)],
        **common,
    )


def grouped_gemm_mgpu(
    x,
    weights,
    group_sizes,
    *,
    x_scale=None,
    w_scales=None,
    config: TuningConfig,
    zero_tail: bool = True,
    group_offset=0,
    dense: DenseGroup | None = None,
    bias=None,
    activation: str | None = None,
):
    """Grouped GEMM on Hopper; ``weights`` is ``(w,)`` or ``(w_gate, w_up)`` for SwiGLU.

    x [M, K] (bf16 or e4m3), w [P, N, K] (same dtype family), group_sizes [G] int32: group g
    uses matrix ``group_offset + g`` of each weight (an int or traced int32 scalar, or one per
    weight; P >= G, the caller keeps ``group_offset + G <= P``), x_scale [M, K/128] f32 and
    w_scales ([G, N/128, K/128] f32,) * len(weights) for FP8 (indexed by g, not by the
    offset). Returns [M, N] bf16. Rows past sum(group_sizes) are zero iff ``zero_tail``
    (otherwise unspecified: ``moe_ffn`` masks them anyway and skips the write traffic).
    ``dense``: one more group with weights of its own over a static row range after the
    routed rows (`DenseGroup`; its row0 a multiple of 8, its N a multiple of the CTA tile
    width, its K of 128); the routed groups and the zero tail then end at its row0.
    ``bias`` ([N], any float; one for every group) and ``activation`` (a key of
    `activations.ACTIVATIONS`): the one-weight epilogue, ``activation(x @ w^T + bias)`` in
    f32 before the bf16 store (not with SwiGLU or a dense group).
    """
    if not available():
        raise NotImplementedError("this jax has no usable jax.experimental.pallas.mosaic_gpu")
    m = x.shape[0]
    n = weights[0].shape[1]
    block_n = config.swiglu_block_n if len(weights) == 2 else config.block_n
    box_m, cta_n = _cta_shape(config, block_n)
    if n % cta_n:
        raise ValueError(f"N={n} must be a multiple of the CTA tile width {cta_n}")
    if dense is not None and (dense.row0 % 8 or dense.n % cta_n or dense.k % SCALE_BLOCK):
        raise ValueError(
            f"dense group: row0={dense.row0} must be a multiple of 8, N_d={dense.n} of the CTA "
            f"tile width {cta_n} and K_d={dense.k} of {SCALE_BLOCK}"
        )
    m_ok = max(box_m, -(-m // 8) * 8)
    if m != m_ok:  # TMA boxes are box_m rows on multiples of 8 inside x: pad odd/tiny M
        pad = ((0, m_ok - m), (0, 0))
        out = grouped_gemm_mgpu(
            jnp.pad(x, pad),
            weights,
            group_sizes,
            x_scale=None if x_scale is None else jnp.pad(x_scale, pad),
            w_scales=w_scales,
            config=config,
            zero_tail=zero_tail,
            group_offset=group_offset,
            dense=dense,
            bias=bias,
            activation=activation,
        )
        return out[:m]
    check_epilogue(weights, bias, activation, dense)
    fp8 = x_scale is not None
    st = _make_static(
        x, weights, group_sizes.shape[0], fp8, config, zero_tail, dense, bias is not None,
        activation,
    )  # fmt: skip
    offsets = group_offset if isinstance(group_offset, tuple) else (group_offset,) * len(weights)
    if len(offsets) != len(weights):
        raise ValueError(f"group_offset: one per weight ({len(weights)}), got {len(offsets)}")
    limit = None if dense is None else dense.row0
    table = _tile_table(group_sizes, m, box_m, st.max_tiles, zero_tail, offsets, limit)
    operands = [table, x, *weights]
    if fp8:
        operands += [x_scale.astype(jnp.float32).T, *(s.astype(jnp.float32) for s in w_scales)]
    if dense is not None:
        operands += [*dense.weights, *(s.astype(jnp.float32) for s in dense.w_scales)]
    if bias is not None:
        operands.append(bias.astype(jnp.float32))
    return _make_kernel(st, config)(*operands)
