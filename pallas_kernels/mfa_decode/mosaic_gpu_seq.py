"""``wg_split="seq"`` compute warpgroups: the two warpgroups take alternate KV blocks.

In the default "head" split both compute warpgroups run QK and the online softmax on every block
(each then does P.V for one half of the head dim), so the softmax work is done twice. Here
warpgroup w handles blocks i = w, w+2, ... of the CTA's range alone: QK, softmax and P.V over all
256 columns (two 64 x 128 f32 accumulators; with an FP8 cache V is converted to f16 one 128-column
half at a time through the warpgroup's f16 tile). With ``v_convert="memory"`` the memory
warpgroup converts each whole V tile into f16 buffer i % 2 = w instead (``memory_convert_loop``)
and warpgroup w runs one N=256 P.V wgmma on it (one [64, 256] f32 accumulator). With a
transposed V cache (``v_transposed``) nothing is converted: P is quantized to e4m3 per row and
P.V runs as two N=128 FP8 wgmmas on the V^T tile as TMA delivered it, each into a fresh
accumulator added to the running pair (``mosaic_gpu_parts.pv_fp8``).
At the end warpgroup 1 passes its normalised output, max and sum to warpgroup 0 through shared
memory in [64, EPI_COLS] f32 chunks, and warpgroup 0 merges the two online-softmax states (the
split-K combine, inside the CTA) and writes the output. The ring has an even number of slots, so
slot i % num_stages always belongs to warpgroup i % 2 and each barrier is waited on by one
warpgroup only, phase after phase.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from step3_jax.kernels.mfa_decode import mosaic_gpu_parts as mg
from step3_jax.quant import FP8_MAX, MIN_SCALE

HALF = mg.HEAD_DIM // 2


def _vec(x):
    return plgpu.layout_cast(
        jnp.full((mg.NUM_HEADS,), x, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
    )


def _pv_halves(ks, smem, bars, slot, w, accs, p16, rescale, valid_rows):
    """acc_h = acc_h * rescale + P @ V[:, half h] for both halves of the head dim."""
    new = []
    for h in range(2):
        with jax.named_scope("v_cvt"):
            if ks.fp8:
                v_ref = mg._v_operand_fp8(ks, smem, bars, slot, h, valid_rows, buf=w, wait=h == 0)
            else:
                v_ref = mg._v_operand_bf16(ks, smem, bars, slot, h, valid_rows, wait=h == 0)
        acc = accs[h] * mg._row(rescale, accs[h].shape)

        def pv(acc_ref, v_ref=v_ref):
            plgpu.wgmma(acc_ref, p16, v_ref)

        with jax.named_scope("pv"):
            new.append(pl.run_state(pv)(plgpu.ACC.init(acc)))  # reading the ACC waits
    return tuple(new)


def memory_convert_loop(ks, smem, bars, issue, kv_end, first, my_n):
    """wg 2, ``v_convert="memory"``: V tile of block i (e4m3, ring slot i % num_stages) -> f16
    buffer i % 2 ([64, 256], rows at or past the visible end zeroed on the CTA's last block),
    then the ring refill. The first ``num_stages`` blocks are already issued.

    Order per block i: wait for V(i) and for buffer i % 2 to be free (its warpgroup's P.V of
    block i - 2), convert, signal ``v16full``; then refill the slot of block i - 1 (not i) with
    block i - 1 + num_stages once its warpgroup has released it (``consumed``: arrived after
    its softmax, K and the scales read; V was read here). Waiting for the block before keeps
    this warpgroup from stalling on the softmax of the block it just converted. No deadlock:
    every wait here is on a compute-warpgroup event that needs only copies already issued and
    conversions already done.
    """
    st = ks.num_stages
    if ks.q_tma:  # bf16 q is staged in buffer 0's memory: wg 0 must have quantized it
        plgpu.barrier_wait(bars["q"].at[0])

    def step(i, masked):
        slot, buf = lax.rem(i, st), lax.rem(i, 2)

        @pl.when(i >= 2)
        def _wait_free():
            plgpu.barrier_wait(bars["v16free"].at[buf])

        valid_rows = kv_end - (first + i) * ks.block_s if masked else None
        plgpu.barrier_wait(bars["v"].at[slot])
        _convert_v_tile(ks, smem, slot, buf, valid_rows)
        plgpu.barrier_arrive(bars["v16full"].at[buf])

        @pl.when((i >= 1) & (i - 1 + st < my_n))
        def _refill():
            prev = lax.rem(i - 1, st)
            with jax.named_scope("mem_wait"):
                plgpu.barrier_wait(bars["consumed"].at[prev])
            issue(i - 1 + st, prev)

    n_full = jnp.maximum(my_n - 1, 0)  # only the CTA's last block can need the row mask
    pl.loop(0, n_full)(functools.partial(step, masked=False))
    pl.loop(n_full, my_n)(functools.partial(step, masked=True))


CVT_COLS = 64  # f16 columns converted and stored at a time by the memory warpgroup


@jax.named_scope("v_cvt")
def _convert_v_tile(ks, smem, slot, buf, valid_rows):
    """e4m3 V tile of ring ``slot`` -> f16 ``v16[buf]`` (rows >= ``valid_rows`` zeroed when
    given), for the memory warpgroup's few registers: each 128-column half is loaded once (16
    registers a thread) and converted and stored CVT_COLS columns at a time (16 more), not
    the whole half at once (32 more)."""
    layout = plgpu.Layout.WGMMA_8BIT if ks.v_load == "8bit" else plgpu.Layout.WGMMA
    for h in range(2):
        v8 = plgpu.load(smem["v"].at[slot, :, pl.ds(h * HALF, HALF)], (), layout=layout)
        for c in range(0, HALF, CVT_COLS):
            v16 = v8[:, c : c + CVT_COLS].astype(jnp.float16)
            if valid_rows is not None:
                shape = (ks.block_s, CVT_COLS)
                rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
                v16 = jnp.where(rows < valid_rows, v16, jnp.float16(0))
            smem["v16"].at[buf, :, pl.ds(h * HALF + c, CVT_COLS)][...] = v16
    plgpu.commit_smem()  # fence + warpgroup barrier: the compute warpgroup's wgmma reads it


def _pv_from_buffer(smem, bars, w, acc, p16, rescale):
    """``v_convert="memory"``: acc = acc * rescale + P @ V16 with the f16 V tile that the
    memory warpgroup wrote into buffer w (one N=256 wgmma); then hand the buffer back."""
    with jax.named_scope("v_wait"):
        plgpu.barrier_wait(bars["v16full"].at[w])
    acc = acc * mg._row(rescale, acc.shape)

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, smem["v16"].at[w])

    with jax.named_scope("pv"):
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # reading the ACC waits for the wgmma
    plgpu.barrier_arrive(bars["v16free"].at[w])
    return acc


def compute_wg_seq(ks, refs, smem, bars, w, b, t, oi, kv_end, first, my_n):
    """Warpgroup w: blocks w, w+2, ... of this CTA's range, all 256 output columns."""
    plgpu.set_max_registers(mg.REGS[ks.v_convert][0], action="increase")
    q_row_scale = mg.q_operand(ks, refs, smem, bars, w, b, t)
    v_mem = ks.v_convert == "memory"
    one_acc = v_mem  # one N=256 P.V wgmma a block: one [64, 256] acc
    acc_cols = mg.HEAD_DIM if one_acc else HALF
    zero = plgpu.layout_cast(jnp.zeros((mg.NUM_HEADS, acc_cols), jnp.float32), plgpu.Layout.WGMMA)
    wg_iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, layout=plgpu.Layout.WGMMA)

    def step(j, carry, masked):
        accs, soft = carry
        i = 2 * j + w
        slot = lax.rem(i, ks.num_stages)
        tok0 = (first + i) * ks.block_s
        s = mg._scores(ks, smem, bars, slot, q_row_scale)
        valid = wg_iota((mg.NUM_HEADS, ks.block_s), 1) < kv_end - tok0 if masked else None
        valid_rows = kv_end - tok0 if masked else None
        v_col = None
        if ks.fp8:
            plgpu.barrier_wait(bars["vs"].at[slot])
            v_col = plgpu.load(smem["vs"].at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        p_op, rescale, soft = mg._softmax_step(ks, s, soft, valid, v_col)
        if ks.v_transposed:  # P is e4m3: P.V on FP8 tensor cores, V^T read in place
            accs = mg.pv_fp8(ks, smem, bars, slot, w, accs, p_op, rescale, valid_rows)
            plgpu.barrier_arrive(bars["consumed"].at[slot])
            return accs, soft
        if v_mem:  # K and the scales are read; V is the memory warpgroup's: free the slot now
            plgpu.barrier_arrive(bars["consumed"].at[slot])
            return _pv_from_buffer(smem, bars, w, accs, p_op, rescale), soft
        accs = _pv_halves(ks, smem, bars, slot, w, accs, p_op, rescale, valid_rows)
        plgpu.barrier_arrive(bars["consumed"].at[slot])
        return accs, soft

    # Blocks of this warpgroup: i = 2j + w < my_n; only the CTA's last block needs masks.
    n_mine = lax.div(jnp.maximum(my_n - w, 0) + 1, 2)
    n_full = lax.div(jnp.maximum(my_n - 1 - w, 0) + 1, 2)
    carry = (zero if one_acc else (zero, zero), (_vec(-jnp.inf), _vec(0.0), _vec(1.0)))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_mine, functools.partial(step, masked=True), carry)
    accs, (m, lsum, c) = carry
    if one_acc:  # the epilogue works on 128-column halves
        accs = (accs[:, :HALF], accs[:, HALF:])
    with jax.named_scope("epilogue"):
        if w == 1:
            _send(ks, smem, bars, accs, m, lsum, c)
        else:
            _merge_and_store(ks, refs, smem, bars, oi, t, accs, m, lsum, c)


def _ring_chunk(ks, smem, name: str, j: int, odd: bool):
    """Chunk j (of 4) of the ring-epilogue views ``x`` (f32 exchange) or ``o`` (output
    staging): chunks 0, 1 in the K ring, 2, 3 in the V ring, at slots 1, 3 (wg 1's, ``odd``)
    or 0, 2 (wg 0's). Every slot is free once the loops are over."""
    view = smem[name + ("k" if j < 2 else "v")]
    slot = 2 * (j % 2) + (1 if odd else 0)
    return view.at[slot * (view.shape[0] // ks.num_stages)]


def _send(ks, smem, bars, accs, m, lsum, c):
    """wg 1: normalised output chunks (and its max / sum) to wg 0 through shared memory."""
    pos = lsum > 0
    inv = jnp.where(pos, c / jnp.where(pos, lsum, 1.0), 0.0)
    smem["xm"][...] = m
    smem["xl"][...] = lsum
    per_half = HALF // mg.EPI_COLS
    if ks.ring_epilogue:  # all four chunks at once into wg 1's freed ring slots
        for j in range(2 * per_half):
            h, k = divmod(j, per_half)
            chunk = accs[h][:, k * mg.EPI_COLS : (k + 1) * mg.EPI_COLS]
            _ring_chunk(ks, smem, "x", j, odd=True)[...] = chunk * mg._row(inv, chunk.shape)
        plgpu.commit_smem()
        plgpu.barrier_arrive(bars["xfull"].at[0])
        return
    for j in range(2 * per_half):
        if j:
            plgpu.barrier_wait(bars["xfree"].at[0])
        h, k = divmod(j, per_half)
        chunk = accs[h][:, k * mg.EPI_COLS : (k + 1) * mg.EPI_COLS]
        smem["x"][...] = chunk * mg._row(inv, chunk.shape)
        plgpu.commit_smem()  # all 4 warps' writes land before the arrive
        plgpu.barrier_arrive(bars["xfull"].at[0])


def _merge_weights(smem, m0, l0, c0):
    """(w0, w1, lse) of the online-softmax merge of wg 0's state with wg 1's (in smem)."""
    m1 = plgpu.load(smem["xm"], (), layout=plgpu.Layout.WGMMA.reduce(1))
    l1 = plgpu.load(smem["xl"], (), layout=plgpu.Layout.WGMMA.reduce(1))
    m = jnp.maximum(m0, m1)
    m_s = jnp.where(m == -jnp.inf, 0.0, m)  # both empty: every weight below is 0
    e0, e1 = jnp.exp2(m0 - m_s), jnp.exp2(m1 - m_s)
    tot = e0 * l0 + e1 * l1
    pos = tot > 0
    inv = jnp.where(pos, 1.0 / jnp.where(pos, tot, 1.0), 0.0)
    lse = m_s * mg.LN2 + jnp.log(jnp.where(pos, tot, 1.0))
    # acc0 carries 1/c0; wg 1 sent acc1 / l1.
    return e0 * c0 * inv, e1 * l1 * inv, jnp.where(pos, lse, -jnp.inf)


def _merge_and_store_ring(ks, refs, smem, bars, oi, t, accs, m0, l0, c0):
    """``ring_epilogue``: one wait for all of wg 1's chunks, the four output chunks staged in
    wg 0's freed ring slots and their TMA stores in flight together."""
    per_half = HALF // mg.EPI_COLS
    plgpu.barrier_wait(bars["xfull"].at[0])
    w0, w1, lse = _merge_weights(smem, m0, l0, c0)
    smem["lse"][...] = lse
    for h in range(2):
        outs = []
        for k in range(per_half):
            j = h * per_half + k
            mine = accs[h][:, k * mg.EPI_COLS : (k + 1) * mg.EPI_COLS]
            view = _ring_chunk(ks, smem, "x", j, odd=True)
            other = plgpu.load(view, (), layout=plgpu.Layout.WGMMA)
            outs.append(mine * mg._row(w0, mine.shape) + other * mg._row(w1, mine.shape))
        if ks.out_fp8:  # one e4m3 scale block per head per half: quant.quantize_activations
            amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(o), axis=1) for o in outs])
            scale = jnp.maximum(amax * (1.0 / FP8_MAX), MIN_SCALE)
            smem["os"].at[h][...] = scale
            outs = [o * mg._row(1.0 / scale, o.shape) for o in outs]
        for k, out in enumerate(outs):
            _ring_chunk(ks, smem, "o", h * per_half + k, odd=False)[...] = out.astype(ks.out_dtype)
    plgpu.commit_smem()
    for j in range(2 * per_half):
        cols = pl.ds(j * mg.EPI_COLS, mg.EPI_COLS)
        plgpu.copy_smem_to_gmem(
            _ring_chunk(ks, smem, "o", j, odd=False), refs["out"].at[oi[0], oi[1], t, :, cols]
        )
    plgpu.copy_smem_to_gmem(smem["lse"], refs["lse"].at[oi[0], oi[1], t])
    if ks.out_fp8:
        plgpu.copy_smem_to_gmem(smem["os"], refs["oscale"].at[oi[0], oi[1], t])
    plgpu.wait_smem_to_gmem(0)


def _merge_and_store(ks, refs, smem, bars, oi, t, accs, m0, l0, c0):
    """wg 0: merge its state with wg 1's (online-softmax combine) and write out and lse."""
    if ks.ring_epilogue:
        return _merge_and_store_ring(ks, refs, smem, bars, oi, t, accs, m0, l0, c0)
    per_half = HALF // mg.EPI_COLS
    o_smem = smem["o"].at[0]
    for j in range(2 * per_half):
        plgpu.barrier_wait(bars["xfull"].at[0])
        if j == 0:
            w0, w1, smem["lse"][...] = _merge_weights(smem, m0, l0, c0)
        other = plgpu.load(smem["x"], (), layout=plgpu.Layout.WGMMA)
        plgpu.commit_smem()  # every warp has read the chunk before wg 1 may overwrite it
        if j < 2 * per_half - 1:
            plgpu.barrier_arrive(bars["xfree"].at[0])
        h, k = divmod(j, per_half)
        mine = accs[h][:, k * mg.EPI_COLS : (k + 1) * mg.EPI_COLS]
        out = mine * mg._row(w0, mine.shape) + other * mg._row(w1, mine.shape)
        if j:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous chunk left o_smem
        o_smem[...] = out.astype(ks.out_dtype)
        plgpu.commit_smem()
        cols = pl.ds(j * mg.EPI_COLS, mg.EPI_COLS)
        plgpu.copy_smem_to_gmem(o_smem, refs["out"].at[oi[0], oi[1], t, :, cols])
        if j == 0:
            plgpu.copy_smem_to_gmem(smem["lse"], refs["lse"].at[oi[0], oi[1], t])
    plgpu.wait_smem_to_gmem(0)
