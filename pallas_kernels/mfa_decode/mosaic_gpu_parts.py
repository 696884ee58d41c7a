"""Building blocks of the MFA decode kernel shared by both compute-warpgroup variants
(`mosaic_gpu` "head" split, `mosaic_gpu_seq` "seq" split): the static `KernelShape`, block
ranges, the q operand, the QK scores, the V operands and one online-softmax step. Design and
numerics: the `mosaic_gpu` module docstring."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from step3_jax.kernels.mfa_decode.ragged import num_items as ragged_num_items
from step3_jax.quant import FP8_MAX as E4M3_MAX

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NUM_HEADS = 64  # wgmma M: one warpgroup tile of 64 query heads
HEAD_DIM = 256
EPI_COLS = 64  # output columns per epilogue store


@dataclasses.dataclass(frozen=True)
class KernelShape:
    """Static shapes and options of one kernel instance."""

    batch: int
    t: int
    max_len: int  # cache capacity per sequence (S, or max_pages * page_size)
    block_s: int
    num_stages: int
    num_splits: int
    fp8: bool
    paged: bool
    page_size: int
    sm_scale: float
    # bf16 (unsplit), f32 (split-K / ragged partials) or float8_e4m3fn: the o_proj's input
    # format written by the epilogue (`quant.quantize_activations` of the f32 output: e4m3
    # values and one f32 scale per head per 128-column half, a third output [.., 2, 64]);
    # unsplit "seq" grids with the ring epilogue only (`out_fp8`).
    out_dtype: jnp.dtype
    v_load: str = "8bit"  # FP8 V tile register layout for the f16 conversion: "8bit" | "wgmma"
    wg_split: str = "head"  # what the 2 compute warpgroups split: head-dim halves or KV blocks
    q_in_kernel: bool = False  # FP8: quantize q inside the kernel (wg 0) instead of in XLA
    # Paged only: a [4] int32 input adds per-operand offsets (k, v, k_scale, v_scale) to the
    # block table's page ids, so the four may sit at different places of shared page pools
    # (the AFD arena: the cache is read in place, not sliced out).
    page_offsets: bool = False
    q_tma: bool = False  # q_in_kernel: bf16 q staged in shared memory by TMA (config.py)
    ring_epilogue: bool = False  # "seq": exchange + output staging in freed ring slots
    v_convert: str = "compute"  # FP8 "seq": "memory" = wg 2 converts V to f16 (config.py)
    # Ragged work list (ragged.py; 0 = off): the grid is (T, items) and CTA c runs work row c
    # (sequence, first block, number of blocks), writing partial c of out [items, 1, T, ...].
    ragged_target: int = 0
    ragged_max_splits: int = 0
    ragged_sms: int = 0  # SMs the plan balances over (its "already balanced" test)
    # FP8 cache only: V is stored transposed ([.., H, S] / pages [P, H, page]), so P.V runs as
    # an FP8 wgmma (V^T is K-major over tokens) on P quantized per row (`_softmax_step`).
    v_transposed: bool = False
    # Unsplit grid only: a [B] int32 input ``order``; grid slot b runs sequence order[b] (the
    # longest first, `ragged.longest_first`) and writes that sequence's own output rows.
    longest_first: bool = False

    @property
    def out_fp8(self) -> bool:
        return jnp.dtype(self.out_dtype) == jnp.float8_e4m3fn

    def num_items(self) -> int:
        """CTAs per query token along the grid's "split" axis (the split factor, or the
        ragged work list's static length)."""
        if not self.ragged_target:
            return self.num_splits
        return ragged_num_items(self.batch, self.ragged_target, self.ragged_max_splits)


def _transforms(dtype, minor: int | None = None) -> tuple:
    """128-byte swizzle with the matching tile: what TMA and wgmma both want. ``minor``: the
    tile's minor dim when its rows are narrower than 128 bytes (the transposed FP8 V tile
    [256, 64] and the FP8 P tile [64, 64] at block_s=64: a 64-byte swizzle)."""
    size = jnp.dtype(dtype).itemsize
    swizzle = 128 if minor is None else min(128, minor * size)
    return (plgpu.TilingTransform((8, swizzle // size)), plgpu.SwizzleTransform(swizzle))


def _row(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _col(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _block_range(ks: KernelShape, length, t, split):
    """(visible end, first block, number of blocks) for this CTA's split."""
    kv_end = jnp.clip(length - ks.t + 1 + t, 0, ks.max_len)
    n_blocks = lax.div(kv_end + (ks.block_s - 1), ks.block_s)
    per_split = lax.div(n_blocks + (ks.num_splits - 1), ks.num_splits)
    first = split * per_split
    my_n = jnp.clip(n_blocks - first, 0, per_split)
    return kv_end, first, my_n


def _item_range(ks: KernelShape, length, t, first, n):
    """Ragged: (visible end, first block, number of blocks) of work row (first, n) for query
    t; the row was cut from the LAST query's visible blocks, so earlier queries may see fewer
    (the causal tail of T > 1) or none of it."""
    kv_end = jnp.clip(length - ks.t + 1 + t, 0, ks.max_len)
    n_vis = lax.div(kv_end + (ks.block_s - 1), ks.block_s)
    return kv_end, first, jnp.clip(n_vis - first, 0, n)


def _kv_index(ks: KernelShape, table_ref, b, blk):
    """Index (leading dims + token slice) of block ``blk`` of sequence b in the K/V cache."""
    tok = blk * ks.block_s
    if not ks.paged:
        return b, pl.ds(tok, ks.block_s)
    page = table_ref[b, lax.div(tok, ks.page_size)]
    return page, pl.ds(lax.rem(tok, ks.page_size), ks.block_s)


# Registers per thread (setmaxnreg) of (compute, memory) warpgroups. setmaxnreg only moves
# registers between the CTA's warpgroups: the CTA launches with 168 a thread (64K / 384
# threads, rounded down to a multiple of 8), so 2 * compute + memory must stay <= 3 * 168 =
# 504, or the compute warpgroups' increase waits forever. With v_convert="memory" the memory
# warpgroup holds an e4m3 [64, 128] half-tile (16 registers) and a [64, 64] f16 chunk (16) at
# a time, and the compute warpgroups no longer convert anything.
REGS = {"compute": (232, 40), "memory": (224, 56)}


def _quantize_q(ks, refs, smem, bars, b, t):
    """wg 0: q [64, 256] bf16 straight from GMEM -> per-row e4m3 + scale in shared memory.

    Same format as ``step3_jax.quant.quantize_kv`` (scale = amax / 448, values rounded to
    nearest even), but without three small XLA kernels in front of the attention kernel.
    """
    if ks.q_tma:  # staged in shared memory by the memory warpgroup's TMA
        plgpu.barrier_wait(bars["q16"].at[0])
        qv = plgpu.load(smem["q16"], (), layout=plgpu.Layout.WGMMA)
    else:  # optimized=False: the vectorised tiled path only serves shared memory.
        qv = plgpu.load(refs["q"].at[b, t], (), layout=plgpu.Layout.WGMMA, optimized=False)
    qv = qv.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(qv), axis=1) * (1.0 / 448.0), 1e-12)
    smem["q"][...] = (qv / _row(scale, qv.shape)).astype(jnp.float8_e4m3fn)
    smem["qs"][...] = scale
    plgpu.commit_smem()  # all of wg 0 wrote, visible to the async proxy (wgmma)
    plgpu.barrier_arrive(bars["q"].at[0])


@jax.named_scope("q_prep")
def q_operand(ks, refs, smem, bars, w, b, t):
    """Wait until q (and its FP8 row scales) is in shared memory; returns the score row scale
    (q scale * sm_scale * log2 e) for an FP8 cache, else None."""
    if ks.q_in_kernel and w == 0:
        _quantize_q(ks, refs, smem, bars, b, t)
    else:
        plgpu.barrier_wait(bars["q"].at[0])
        if ks.fp8 and not ks.q_in_kernel:
            plgpu.barrier_wait(bars["q"].at[1])
    if not ks.fp8:
        return None
    q_row_scale = plgpu.load(smem["qs"], (), layout=plgpu.Layout.WGMMA.reduce(1))
    return q_row_scale * (ks.sm_scale * LOG2E)


@jax.named_scope("qk")
def _scores(ks, smem, bars, slot, q_row_scale):
    """f32 scores [64, block_s] in log2 units (sm_scale * log2e and all FP8 scales folded in)."""
    plgpu.barrier_wait(bars["k"].at[slot])

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, smem["q"], plgpu.transpose_ref(smem["k"].at[slot], (1, 0)))
        return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((NUM_HEADS, ks.block_s), jnp.float32))
    shape = (NUM_HEADS, ks.block_s)
    if not ks.fp8:
        return s * (ks.sm_scale * LOG2E)
    plgpu.barrier_wait(bars["ks"].at[slot])
    k_col = plgpu.load(smem["ks"].at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
    return s * _row(q_row_scale, shape) * _col(k_col, shape)


def _v_operand_fp8(ks, smem, bars, slot, h, valid_rows, buf=None, wait=True, dst=None, commit=True):
    """Convert half h (128 columns) of the FP8 V tile to f16 into f16 tile ``buf`` (default h;
    one per warpgroup), rows at or past ``valid_rows`` zeroed when it is given.

    With ``v_load="8bit"`` the tile is read with 32-bit shared loads (4 e4m3 values a thread)
    in the 8-bit wgmma register layout; the f16 copy is only ever read back through shared
    memory by the wgmma, so its register layout is free.
    """
    half = HEAD_DIM // 2
    buf = h if buf is None else buf
    dst = smem["v16"].at[buf] if dst is None else dst
    if wait:
        plgpu.barrier_wait(bars["v"].at[slot])
    layout = plgpu.Layout.WGMMA_8BIT if ks.v_load == "8bit" else plgpu.Layout.WGMMA
    v8 = plgpu.load(smem["v"].at[slot, :, pl.ds(h * half, half)], (), layout=layout)
    v16 = v8.astype(jnp.float16)
    if valid_rows is not None:
        rows = plgpu.broadcasted_iota(jnp.int32, (ks.block_s, half), 0, layout=layout)
        v16 = jnp.where(rows < valid_rows, v16, jnp.float16(0))
    dst[...] = v16
    if commit:  # fence + warpgroup barrier: the wgmma reads what all 4 warps wrote
        plgpu.commit_smem()
    return dst


def _v_operand_bf16(ks, smem, bars, slot, h, valid_rows, wait=True):
    """Half h of the bf16 V tile, read in place; on a masked block rows past the end are zeroed
    in shared memory (only the warpgroup that owns half h of this slot touches it)."""
    half = HEAD_DIM // 2
    if wait:
        plgpu.barrier_wait(bars["v"].at[slot])
    v_ref = smem["v"].at[slot, :, pl.ds(h * half, half)]
    if valid_rows is not None:

        @pl.when(valid_rows < ks.block_s)
        def _zero_tail():
            v = plgpu.load(v_ref, (), layout=plgpu.Layout.WGMMA)
            rows = plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=plgpu.Layout.WGMMA)
            v_ref[...] = jnp.where(rows < valid_rows, v, jnp.zeros((), v.dtype))
            plgpu.commit_smem()

    return v_ref


@jax.named_scope("softmax")
def _softmax_step(ks, s, carry, valid, v_col):
    """Online-softmax update. Returns (P operand, acc rescale factor per row, new carry)."""
    m, lsum, c = carry
    shape = s.shape
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    # Every block this CTA visits holds >= 1 visible key for all its rows, so m_new is finite.
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - _row(m_new, shape))
    l_new = lsum * alpha + p.sum(axis=1)
    if not ks.fp8:
        return p.astype(jnp.bfloat16), alpha, (m_new, l_new, c)
    pv = p * _col(v_col, shape)
    if valid is not None:  # masked v_scale slots may be NaN: 0 * NaN = NaN
        pv = jnp.where(valid, pv, 0.0)
    # P' = P * v_scale / c with c = max_s(P * v_scale) / top: each row's largest entry maps to
    # top, 1 for the f16 operand (well inside its range) and 448 (e4m3's largest finite) for
    # the FP8 one, which is then P quantized per row exactly like q and the cache.
    # c never drops below the previous blocks' (rescaled to the new max): a block whose best
    # score is ~110+ log2 units under the running max would otherwise give a subnormal c and
    # 1 / c = inf (NaN in P', inf in the rescale); its entries just round to 0 instead.
    top = E4M3_MAX if ks.v_transposed else 1.0
    c_cand = jnp.maximum(pv.max(axis=1) * (1.0 / top), alpha * c)
    c_new = jnp.where(c_cand > 0, c_cand, c)
    p_dtype = jnp.float8_e4m3fn if ks.v_transposed else jnp.float16
    p_op = (pv * _row(1.0 / c_new, shape)).astype(p_dtype)
    return p_op, alpha * (c / c_new), (m_new, l_new, c_new)


@jax.named_scope("pv_fp8")
def pv_fp8(ks, smem, bars, slot, w, accs, p8, rescale, valid_rows):
    """``v_transposed``: acc_h = acc_h * rescale + P8 @ V[:, half h] for both 128-column
    halves, with V^T [256, block_s] e4m3 read in place from ring ``slot`` (K-major over tokens:
    an FP8 wgmma operand as it lands) and P8 [64, block_s] e4m3 staged in warpgroup w's shared
    tile. On a masked block the V^T columns at or past ``valid_rows`` are zeroed first
    (0 * NaN = NaN inside the wgmma); the slot is this warpgroup's alone ("seq" split).

    Two-level accumulation: each block's product goes into a fresh accumulator and is added to
    the running f32 one on the CUDA cores. Hopper's FP8 MMA keeps only ~13 mantissa bits of
    its D input, so feeding the running sum back in would truncate it toward zero once a
    block (about -1% bias after 256 blocks). Halves keep the fresh tile at 64 registers."""
    plgpu.barrier_wait(bars["v"].at[slot])
    vt = smem["v"].at[slot]
    if valid_rows is not None:

        @pl.when(valid_rows < ks.block_s)
        def _zero_tail():
            layout = plgpu.Layout.WGMMA_8BIT
            for r in range(0, HEAD_DIM, NUM_HEADS):  # 64 rows at a time: few registers
                rows = vt.at[pl.ds(r, NUM_HEADS)]
                x = plgpu.load(rows, (), layout=layout).astype(jnp.float16)  # e4m3 exact
                cols = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=layout)
                rows[...] = jnp.where(cols < valid_rows, x, jnp.float16(0)).astype(vt.dtype)

    p_ref = smem["p8"].at[w]
    p_ref[...] = p8
    plgpu.commit_smem()  # fence + warpgroup barrier: the wgmma reads what all 4 warps wrote
    half = HEAD_DIM // 2
    new = []
    for h in range(2):

        def pv(acc_ref, h=h):
            v_half = plgpu.transpose_ref(vt.at[pl.ds(h * half, half)], (1, 0))
            plgpu.wgmma(acc_ref, p_ref, v_half)
            return acc_ref[...]  # reading the ACC waits for the wgmma

        part = pl.run_scoped(pv, plgpu.ACC((NUM_HEADS, half), jnp.float32))
        new.append(accs[h] * _row(rescale, accs[h].shape) + part)
    return tuple(new)
