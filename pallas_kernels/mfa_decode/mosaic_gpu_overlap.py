"""``pv_overlap=True`` compute warpgroups (FP8 cache, ``wg_split="seq"``): software-pipelined.

Same work split as ``mosaic_gpu_seq.py`` (warpgroup w takes KV blocks w, w+2, ... of the CTA's
range; the two online-softmax states are merged at the end), but inside a warpgroup the tensor
core and the CUDA cores work at the same time, in the FlashAttention-3 order:

    QK(0); softmax(0)
    for j in 1 .. n-1:
        issue QK(j)                           # tensor core: scores of block j
        convert V(j-1) e4m3 -> f16, both halves   # CUDA cores, meanwhile
        acc *= rescale(j-1); issue P(j-1) V(j-1)  # two wgmmas (one per 128-column half)
        wait until QK(j) is done (2 groups may stay in flight); softmax(j)   # meanwhile P.V
        wait for P(j-1) V(j-1); release block j-1's ring slot
    acc *= rescale(n-1); P(n-1) V(n-1)

The serial version waits for every wgmma before it does anything else. Here each warpgroup
keeps a whole f16 V tile ([block_s, 256], both halves: P.V of the two halves is issued back to
back) and that memory is reused for the output (wg 0) and exchange (wg 1) tiles after the
loop, so the shared-memory total stays within Hopper's 227 KiB with a 4-slot ring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mfa_decode import mosaic_gpu as mg
from pallas_kernels.mfa_decode import mosaic_gpu_seq as seq

HALF = mg.HEAD_DIM // 2


def _wgmma_zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


class _Blocks:
    """Per-block pieces of one compute warpgroup (w) of the pipelined loop."""

    def __init__(self, ks, smem, bars, w, kv_end, first, q_row_scale, refs_acc):
        self.ks, self.smem, self.bars, self.w = ks, smem, bars, w
        self.kv_end, self.first, self.q_row_scale = kv_end, first, q_row_scale
        (self.acc_refs, self.s_ref) = refs_acc
        self.iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, layout=plgpu.Layout.WGMMA)

    def slot_tok0(self, j):
        i = 2 * j + self.w
        return lax.rem(i, self.ks.num_stages), (self.first + i) * self.ks.block_s

    @jax.named_scope("qk_issue")
    def issue_qk(self, j):
        slot, _ = self.slot_tok0(j)
        plgpu.barrier_wait(self.bars["k"].at[slot])
        self.s_ref[...] = _wgmma_zeros((mg.NUM_HEADS, self.ks.block_s))
        k_t = plgpu.transpose_ref(self.smem["k"].at[slot], (1, 0))
        plgpu.wgmma(self.s_ref, self.smem["q"], k_t)

    def softmax(self, j, soft, wait_n: int, masked: bool):
        """Scores of block j (waits until at most ``wait_n`` wgmma groups are in flight)
        -> (P f16, accumulator rescale, new softmax state)."""
        ks, smem, bars = self.ks, self.smem, self.bars
        slot, tok0 = self.slot_tok0(j)
        with jax.named_scope("qk_wait"):
            s = plgpu.wgmma_accumulator_load(self.s_ref, wait_n=wait_n)
        shape = s.shape
        plgpu.barrier_wait(bars["ks"].at[slot])
        k_col = plgpu.load(smem["ks"].at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        s = s * mg._row(self.q_row_scale, shape) * mg._col(k_col, shape)
        valid = self.iota(shape, 1) < self.kv_end - tok0 if masked else None
        plgpu.barrier_wait(bars["vs"].at[slot])
        v_col = plgpu.load(smem["vs"].at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        with jax.named_scope("softmax"):
            return mg._softmax_step(ks, s, soft, valid, v_col)

    def issue_pv(self, j, p16, rescale, masked: bool):
        """Convert V of block j (both halves), rescale the accumulators, issue P.V."""
        ks, smem, bars = self.ks, self.smem, self.bars
        slot, tok0 = self.slot_tok0(j)
        valid_rows = self.kv_end - tok0 if masked else None
        v16 = smem["v16w"][self.w]
        plgpu.barrier_wait(bars["v"].at[slot])
        with jax.named_scope("v_cvt"):
            dsts = [
                mg._v_operand_fp8(
                    ks, smem, bars, slot, h, valid_rows, wait=False, dst=v16.at[h], commit=h == 1
                )  # fmt: skip
                for h in range(2)
            ]
        self._rescale_and_issue(p16, rescale, dsts)

    @jax.named_scope("pv_issue")
    def _rescale_and_issue(self, p16, rescale, dsts):
        for acc_ref in self.acc_refs:  # finished: the previous P.V was waited for
            acc = plgpu.wgmma_accumulator_load(acc_ref, wait_n=None)
            acc_ref[...] = acc * mg._row(rescale, acc.shape)
        for acc_ref, dst in zip(self.acc_refs, dsts, strict=True):
            plgpu.wgmma(acc_ref, p16, dst)

    def release(self, j):
        slot, _ = self.slot_tok0(j)
        plgpu.barrier_arrive(self.bars["consumed"].at[slot])


def _pipelined(ks, smem, bars, w, kv_end, first, n_mine, q_row_scale, soft0):
    """Runs this warpgroup's n_mine >= 1 blocks; returns (acc halves, softmax state)."""

    def run(acc0_ref, acc1_ref, s_ref):
        blk = _Blocks(ks, smem, bars, w, kv_end, first, q_row_scale, ((acc0_ref, acc1_ref), s_ref))
        blk.issue_qk(0)
        carry = blk.softmax(0, soft0, wait_n=0, masked=True)

        def step(j, carry, masked):
            p16, rescale, soft = carry
            blk.issue_qk(j)
            blk.issue_pv(j - 1, p16, rescale, masked=False)
            carry = blk.softmax(j, soft, wait_n=2, masked=masked)  # P.V(j-1) stays in flight
            with jax.named_scope("pv_wait"):
                plgpu.wgmma_wait(0)
            blk.release(j - 1)
            return carry

        # Only this warpgroup's last block can reach past the visible end.
        last = jnp.maximum(n_mine - 1, 1)
        carry = lax.fori_loop(1, last, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(last, n_mine, functools.partial(step, masked=True), carry)
        p16, rescale, soft = carry
        blk.issue_pv(n_mine - 1, p16, rescale, masked=True)
        accs = (acc0_ref[...], acc1_ref[...])  # reading waits for the last P.V
        blk.release(n_mine - 1)
        return accs, soft

    acc = plgpu.ACC((mg.NUM_HEADS, HALF), jnp.float32)  # run_scoped accumulators start at 0
    s_acc = plgpu.ACC((mg.NUM_HEADS, ks.block_s), jnp.float32)
    return pl.run_scoped(run, acc, acc, s_acc)


def compute_wg_overlap(ks, refs, smem, bars, w, b, t, split, kv_end, first, my_n):
    """Warpgroup w: blocks w, w+2, ... of this CTA's range, pipelined; then merge (seq)."""
    plgpu.set_max_registers(232, action="increase")
    q_row_scale = mg.q_operand(ks, refs, smem, bars, w, b, t)
    n_mine = lax.div(jnp.maximum(my_n - w, 0) + 1, 2)
    zero = _wgmma_zeros((mg.NUM_HEADS, HALF))
    empty = ((zero, zero), (seq._vec(-jnp.inf), seq._vec(0.0), seq._vec(1.0)))

    def nonempty(_, state):  # state == empty on entry (a carry, not a captured constant)
        return _pipelined(ks, smem, bars, w, kv_end, first, n_mine, q_row_scale, state[1])

    # A loop of 0 or 1 trips: the state leaves it whether or not this warpgroup has a block.
    accs, (m, lsum, c) = lax.fori_loop(0, jnp.minimum(n_mine, 1), nonempty, empty)
    with jax.named_scope("epilogue"):
        if w == 1:
            seq._send(ks, smem, bars, accs, m, lsum, c)
        else:
            seq._merge_and_store(ks, refs, smem, bars, b, t, split, accs, m, lsum, c)
