"""Mosaic GPU (Hopper) Pallas kernel for MFA decode attention: 64 heads, one shared K/V head.

Grid: (T, num_splits, B); one CTA per (query token t, split j, sequence b). Warpgroups:

* wg 2, memory: TMA-copies q (and its FP8 row scales) once, then K/V tiles of ``block_s``
  tokens (and their per-token scales) into a ring of ``num_stages`` slots.
* wg 0 and 1, compute, split by ``wg_split``:
  "head" (this file): each computes the full score tile S = q K^T [64, block_s] and the online
  softmax, then P.V for ITS half of the head dim (128 columns), so each accumulator is
  64 x 128 f32 and nothing is combined across warpgroups at the end;
  "seq" (``mosaic_gpu_seq.py``, the FP8 default): alternate KV blocks, merged at the end.

FP8 cache (per-token scales, ``step3_jax.quant.quantize_kv`` format):
* QK runs as an FP8 wgmma: q is quantized per (b, t, head) row (in XLA, or by wg 0 with
  ``q_in_kernel``); K is already
  FP8 and K-major ([block_s, H], H fastest), as 8-bit wgmma requires. The q row scale, k_scale
  column scale, sm_scale and log2(e) are folded into one multiply of the f32 scores.
* P.V cannot be an FP8 wgmma on a token-major cache: V [block_s, H] is not K-major over s (a
  transposed V cache, ``v_transposed``, makes it one: ``mosaic_gpu_parts.pv_fp8``). V is
  converted e4m3 -> f16 in registers (one cvt per two values) into a per-warpgroup f16 tile;
  P is fed as f16. v_scale is folded into P's columns; to keep P * v_scale inside f16's range
  each row is renormalised by c = max(max_s(P * v_scale), the previous c rescaled) (so P' <= 1)
  and the accumulator carries c between blocks: acc_rep = acc_true / c, rescaled by
  alpha * c_old / c_new each block, like the softmax max.
Masking: scores of slots >= the query's visible end are set to -inf, and V rows there are zeroed
(in the f16 conversion for FP8, in shared memory on the last partial block for bf16), because
0 * NaN = NaN inside a matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from step3_jax.kernels.mfa_decode.mosaic_gpu_parts import (  # noqa: F401 - re-exported
    EPI_COLS,
    HEAD_DIM,
    LN2,
    LOG2E,
    NUM_HEADS,
    REGS,
    KernelShape,
    _block_range,
    _col,
    _item_range,
    _kv_index,
    _quantize_q,
    _row,
    _scores,
    _softmax_step,
    _transforms,
    _v_operand_bf16,
    _v_operand_fp8,
    q_operand,
)
from step3_jax.kernels.mfa_decode.mosaic_gpu_seq import compute_wg_seq, memory_convert_loop


def _memory_wg(ks, refs, smem, bars, b, t, first, my_n, kv_end):
    """Issue the q copy and the K/V ring; waits on `consumed` before refilling a slot.
    With ``v_convert="memory"`` it also converts every V tile to f16 (mosaic_gpu_seq.py)."""
    plgpu.set_max_registers(REGS[ks.v_convert][1], action="decrease")
    if ks.q_tma:
        plgpu.copy_gmem_to_smem(refs["q"].at[b, t], smem["q16"], bars["q16"].at[0])
    if not ks.q_in_kernel:
        plgpu.copy_gmem_to_smem(refs["q"].at[b, t], smem["q"], bars["q"].at[0])
        if ks.fp8:
            plgpu.copy_gmem_to_smem(refs["qs"].at[b, t], smem["qs"], bars["q"].at[1])

    names = ("k", "v", "ks", "vs") if ks.fp8 else ("k", "v")

    def issue(i, slot):
        page, rows = _kv_index(ks, refs.get("table"), b, first + i)
        for j, name in enumerate(names):
            lead = page + refs["poff"][j] if ks.page_offsets else page
            dst = smem[name].at[slot]
            # Transposed V: all 256 rows of the page, this block's token columns.
            src = refs[name].at[lead, :, rows] if name == "v" and ks.v_transposed else None
            src = refs[name].at[lead, rows] if src is None else src
            plgpu.copy_gmem_to_smem(src, dst, bars[name].at[slot])

    for i in range(ks.num_stages):
        pl.when(i < my_n)(functools.partial(issue, i, i))
    if ks.v_convert == "memory":
        memory_convert_loop(ks, smem, bars, issue, kv_end, first, my_n)
        return

    @pl.loop(ks.num_stages, my_n)
    def _refill(i):
        slot = lax.rem(i, ks.num_stages)
        with jax.named_scope("mem_wait"):
            plgpu.barrier_wait(bars["consumed"].at[slot])
        issue(i, slot)


def _compute_wg(ks, refs, smem, bars, w, b, t, oi, kv_end, first, my_n):
    """Warpgroup w: scores + softmax for all 64 heads, P.V for head-dim columns of half w."""
    plgpu.set_max_registers(REGS[ks.v_convert][0], action="increase")
    half = HEAD_DIM // 2
    q_row_scale = q_operand(ks, refs, smem, bars, w, b, t)
    vec = lambda x: plgpu.layout_cast(
        jnp.full((NUM_HEADS,), x, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
    )
    acc = plgpu.layout_cast(jnp.zeros((NUM_HEADS, half), jnp.float32), plgpu.Layout.WGMMA)
    wg_iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, layout=plgpu.Layout.WGMMA)

    def step(i, carry, masked):
        acc, soft = carry
        slot = lax.rem(i, ks.num_stages)
        tok0 = (first + i) * ks.block_s
        s = _scores(ks, smem, bars, slot, q_row_scale)
        # Only the CTA's last block can reach past the visible end: the others skip all masks.
        valid = wg_iota((NUM_HEADS, ks.block_s), 1) < kv_end - tok0 if masked else None
        valid_rows = kv_end - tok0 if masked else None
        v_col = None
        if ks.fp8:
            plgpu.barrier_wait(bars["vs"].at[slot])
            v_col = plgpu.load(smem["vs"].at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        p16, rescale, soft = _softmax_step(ks, s, soft, valid, v_col)
        if ks.fp8:
            v_ref = _v_operand_fp8(ks, smem, bars, slot, w, valid_rows)
        else:
            v_ref = _v_operand_bf16(ks, smem, bars, slot, w, valid_rows)
        acc = acc * _row(rescale, acc.shape)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_ref)

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # reading the ACC waits for the wgmma
        plgpu.barrier_arrive(bars["consumed"].at[slot])
        return acc, soft

    carry = (acc, (vec(-jnp.inf), vec(0.0), vec(1.0)))
    n_full = jnp.maximum(my_n - 1, 0)
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, my_n, functools.partial(step, masked=True), carry)
    acc, (m, lsum, c) = carry
    _epilogue(ks, refs, smem, w, oi, t, acc, m, lsum, c)


def _epilogue(ks, refs, smem, w, oi, t, acc, m, lsum, c):
    """Normalise, write this half of out (and lse from wg 0); empty rows give 0 and -inf.
    ``oi``: this CTA's (split, sequence) index pair of out and lse.

    The half is written in EPI_COLS-wide chunks through one reused smem tile, which keeps the
    f32 split-K partial output small enough to leave the TMA ring its depth.
    """
    half = HEAD_DIM // 2
    pos = lsum > 0
    inv = jnp.where(pos, c / jnp.where(pos, lsum, 1.0), 0.0)
    out = acc * _row(inv, acc.shape)
    if w == 0:
        lse = m * LN2 + jnp.log(jnp.where(pos, lsum, 1.0))
        smem["lse"][...] = jnp.where(pos, lse, -jnp.inf)
    o_smem = smem["o"].at[w]
    for j in range(half // EPI_COLS):
        if j:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk left smem
        o_smem[...] = out[:, j * EPI_COLS : (j + 1) * EPI_COLS].astype(ks.out_dtype)
        plgpu.commit_smem()
        cols = pl.ds(w * half + j * EPI_COLS, EPI_COLS)
        plgpu.copy_smem_to_gmem(o_smem, refs["out"].at[oi[0], oi[1], t, :, cols])
        if w == 0 and j == 0:
            plgpu.copy_smem_to_gmem(smem["lse"], refs["lse"].at[oi[0], oi[1], t])
    plgpu.wait_smem_to_gmem(0)


def smem_o_spec(ks: KernelShape):
    """Output staging tile(s): [n, 64, EPI_COLS] of out_dtype (n = 1 for "seq", else 2)."""
    n = 1 if ks.wg_split == "seq" else 2
    return plgpu.SMEM((n, NUM_HEADS, EPI_COLS), ks.out_dtype, transforms=_transforms(ks.out_dtype))


def _scratch(ks: KernelShape, kv_dtype) -> tuple[dict, dict]:
    q_dtype = kv_dtype  # FP8 cache: FP8 q for the FP8 wgmma; bf16 cache: bf16 q
    st, bs = ks.num_stages, ks.block_s
    seq = ks.wg_split == "seq"
    ring = plgpu.SMEM((st, bs, HEAD_DIM), kv_dtype, transforms=_transforms(kv_dtype))
    ring_v = ring
    if ks.v_transposed:  # V^T tiles [256, block_s]: rows of block_s bytes
        ring_v = plgpu.SMEM((st, HEAD_DIM, bs), kv_dtype, transforms=_transforms(kv_dtype, bs))
    smem = {
        "q": plgpu.SMEM((NUM_HEADS, HEAD_DIM), q_dtype, transforms=_transforms(q_dtype)),
        "k": ring,
        "v": ring_v,
        "o": smem_o_spec(ks),
        "lse": plgpu.SMEM((NUM_HEADS,), jnp.float32),
    }
    if ks.ring_epilogue:
        # Views of each ring as [st, 64, 64] f32 (exchange) and [st, r, 64, 64] out_dtype
        # (output staging; r fills a slot): entry s starts where ring slot s does.
        # FP8 out: [64, 64] e4m3 tiles have 64-byte rows (a 64-byte swizzle, like the P tile).
        del smem["o"]
        r = bs * HEAD_DIM * jnp.dtype(kv_dtype).itemsize // (NUM_HEADS * EPI_COLS * 4)
        r_out = r * 4 // jnp.dtype(ks.out_dtype).itemsize
        o_tf = _transforms(ks.out_dtype, EPI_COLS if ks.out_fp8 else None)
        xv = plgpu.SMEM(
            (st * r, NUM_HEADS, EPI_COLS), jnp.float32, transforms=_transforms(jnp.float32)
        )
        ov = plgpu.SMEM((st * r_out, NUM_HEADS, EPI_COLS), ks.out_dtype, transforms=o_tf)
        if ks.out_fp8:  # per (128-column half, head) scales of the FP8 output
            smem["os"] = plgpu.SMEM((2, NUM_HEADS), jnp.float32)
        smem["k"] = plgpu.RefUnion(ring, xv, ov)
        smem["v"] = plgpu.RefUnion(ring_v, xv, ov)  # same bytes a slot either way
    bars = {
        "q": plgpu.Barrier(num_barriers=2),
        "k": plgpu.Barrier(num_barriers=st),
        "v": plgpu.Barrier(num_barriers=st),
        # "head": both compute warpgroups release a slot before the memory warpgroup refills
        # it; "seq": a slot belongs to one warpgroup (num_stages is even).
        "consumed": plgpu.Barrier(num_arrivals=1 if seq else 2, num_barriers=st),
    }
    if seq:  # wg 1 hands its normalised output to wg 0 in [64, EPI_COLS] f32 chunks
        if not ks.ring_epilogue:
            smem["x"] = plgpu.SMEM(
                (NUM_HEADS, EPI_COLS), jnp.float32, transforms=_transforms(jnp.float32)
            )
        smem["xm"] = plgpu.SMEM((NUM_HEADS,), jnp.float32)
        smem["xl"] = plgpu.SMEM((NUM_HEADS,), jnp.float32)
        bars["xfull"] = plgpu.Barrier(num_barriers=1)
        bars["xfree"] = plgpu.Barrier(num_barriers=1)
    if ks.fp8:
        _scratch_fp8(ks, smem, bars)
    return smem, bars


def _scratch_fp8(ks: KernelShape, smem: dict, bars: dict) -> None:
    """FP8 cache only (in place): q row scales, the K/V scale rings, the f16 V tile(s), the
    bf16 q staging (q_tma) and their barriers."""
    half, st, bs = HEAD_DIM // 2, ks.num_stages, ks.block_s
    smem["qs"] = plgpu.SMEM((NUM_HEADS,), jnp.float32)
    smem["ks"] = plgpu.SMEM((st, bs), jnp.float32)
    smem["vs"] = plgpu.SMEM((st, bs), jnp.float32)
    q16 = plgpu.SMEM((NUM_HEADS, HEAD_DIM), jnp.bfloat16, transforms=_transforms(jnp.bfloat16))
    if ks.v_transposed:  # FP8 P.V: no converted V; one e4m3 P tile per compute warpgroup
        fp8 = jnp.float8_e4m3fn
        smem["p8"] = plgpu.SMEM((2, NUM_HEADS, bs), fp8, transforms=_transforms(fp8, bs))
        if ks.q_tma:  # bf16 q staging of its own (there is no f16 V tile to lend it)
            smem["q16"] = q16
            bars["q16"] = plgpu.Barrier(num_barriers=1)
    else:
        # "compute": two 128-column halves (one per warpgroup) of one converted tile;
        # "memory": one whole converted tile per compute warpgroup (block i -> buffer i % 2).
        v16_shape = (2, bs, HEAD_DIM) if ks.v_convert == "memory" else (2, bs, half)
        smem["v16"] = plgpu.SMEM(v16_shape, jnp.float16, transforms=_transforms(jnp.float16))
        if ks.v_convert == "memory":  # wg 2 -> wg w: "buffer w holds block i"; and back
            bars["v16full"] = plgpu.Barrier(num_barriers=2)
            bars["v16free"] = plgpu.Barrier(num_barriers=2)
        if ks.q_tma:  # bf16 q [64, 256] (32 KiB = the f16 V tile at block_s=64) before any V
            smem["v16"] = plgpu.RefUnion(smem["v16"], q16)
            bars["q16"] = plgpu.Barrier(num_barriers=1)
    bars["ks"] = plgpu.Barrier(num_barriers=st)
    bars["vs"] = plgpu.Barrier(num_barriers=st)


def _unpack_unions(ks: KernelShape, smem: dict) -> None:
    """Replace the allocated ``RefUnion``s of ``_scratch`` by their views (in place)."""
    if ks.ring_epilogue:
        smem["k"], smem["xk"], smem["ok"] = smem["k"]
        smem["v"], smem["xv"], smem["ov"] = smem["v"]
    if ks.fp8 and ks.q_tma and not ks.v_transposed:
        smem["v16"], smem["q16"] = smem["v16"]


def _input_names(ks: KernelShape) -> list[str]:
    names = ["lengths"] + (["work"] if ks.ragged_target else [])
    names += ["order"] if ks.longest_first else []
    names += (["table"] if ks.paged else []) + (["poff"] if ks.page_offsets else [])
    names += ["q"]
    names += ["qs"] if ks.fp8 and not ks.q_in_kernel else []
    names += ["k", "v"] + (["ks", "vs"] if ks.fp8 else [])
    return names + ["out", "lse"] + (["oscale"] if ks.out_fp8 else [])


def _kernel(ks: KernelShape, kv_dtype, *all_refs):
    refs = dict(zip(_input_names(ks), all_refs, strict=True))
    smem_spec, bar_spec = _scratch(ks, kv_dtype)
    s_keys, b_keys = list(smem_spec), list(bar_spec)

    def body(*allocs):
        smem = dict(zip(s_keys, allocs[: len(s_keys)], strict=True))
        bars = dict(zip(b_keys, allocs[len(s_keys) :], strict=True))
        _unpack_unions(ks, smem)
        t, split, b = lax.axis_index("t"), lax.axis_index("split"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        live = True
        if ks.ragged_target:  # split = work row; b (grid size 1) = 0: out[split, 0, t]
            oi, seq = (split, b), refs["work"][split, 0]
            live, b = seq >= 0, jnp.maximum(seq, 0)
            row = (refs["work"][split, 1], refs["work"][split, 2])
            kv_end, first, my_n = _item_range(ks, refs["lengths"][b], t, *row)
        else:
            if ks.longest_first:  # grid slot b runs the b-th longest sequence
                b = refs["order"][b]
            oi = (split, b)
            kv_end, first, my_n = _block_range(ks, refs["lengths"][b], t, split)
        compute = compute_wg_seq if ks.wg_split == "seq" else _compute_wg

        @pl.when(live)  # unused work rows (ragged) do nothing, not even the q load
        def _run():
            pl.when(wg == 2)(lambda: _memory_wg(ks, refs, smem, bars, b, t, first, my_n, kv_end))
            for w in range(2):  # static w: smem slices along the swizzled dim stay static
                run = functools.partial(
                    compute, ks, refs, smem, bars, w, b, t, oi, kv_end, first, my_n
                )
                pl.when(wg == w)(run)

    pl.run_scoped(body, *smem_spec.values(), *bar_spec.values(), collective_axes="wg")


# Mosaic GPU's in-kernel profiler (off by default): ``benchmarks/profile_mfa_decode.py`` sets
# events per warpgroup and a directory; every call then writes a Chrome trace of the named
# regions (``jax.named_scope``) of each warpgroup. Read at trace time: clear jit caches after
# changing it.
PROFILE = {"space": 0, "dir": ""}


def _compiler_params():
    # Lane semantics explicitly: the default changed between jax 0.10 and 0.11.
    prof = {}
    if PROFILE["space"]:
        prof = dict(profile_space=PROFILE["space"], profile_dir=PROFILE["dir"])
    return plgpu.CompilerParams(
        approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane, **prof
    )


def mfa_decode_mosaic(
    ks: KernelShape,
    lengths,
    table,
    q,
    q_scale,
    k,
    v,
    k_scale,
    v_scale,
    page_offsets=None,
    work=None,
    order=None,
):
    """Runs the kernel; returns (out [splits, B, T, 64, 256] out_dtype, lse [splits, B, T, 64])
    and, with ``ks.out_fp8``, the output scales [1, B, T, 2, 64].
    ``page_offsets`` ([4] int32, paged only, iff ``ks.page_offsets``): added to the page ids
    of k, v, k_scale, v_scale. ``work`` ([C, 3] int32, iff ``ks.ragged_target``): the ragged
    work list; out and lse are then [C, 1, T, 64(, 256)]. ``order`` ([B] int32, a permutation,
    iff ``ks.longest_first``): the sequence each grid slot runs."""
    ragged = bool(ks.ragged_target)
    if ks.out_fp8 and (ragged or ks.num_splits != 1 or not ks.ring_epilogue):
        raise ValueError("an FP8 output needs an unsplit grid with the ring epilogue")
    shape = (ks.num_items(), 1 if ragged else ks.batch, ks.t, NUM_HEADS)
    out_type = (
        jax.ShapeDtypeStruct((*shape, HEAD_DIM), ks.out_dtype),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    if ks.out_fp8:  # [1, B, T, 2, 64]: the scale of head n's 128-column half h at [h, n]
        out_type += (jax.ShapeDtypeStruct((*shape[:-1], 2, NUM_HEADS), jnp.float32),)
    call = plgpu.kernel(
        functools.partial(_kernel, ks, k.dtype),
        out_type=out_type,
        grid=(ks.t, ks.num_items(), 1 if ragged else ks.batch),
        grid_names=("t", "split", "b"),
        num_threads=3,
        thread_name="wg",
        compiler_params=_compiler_params(),
    )
    if ragged != (work is not None):
        raise ValueError("a work list (ragged.plan_ragged_work) goes with ks.ragged_target > 0")
    if ks.longest_first != (order is not None) or (ks.longest_first and ragged):
        raise ValueError("an order (ragged.longest_first) goes with ks.longest_first, unsplit")
    args = [lengths] + ([work] if ragged else []) + ([order] if ks.longest_first else [])
    args += [table] if ks.paged else []
    args += [page_offsets] if ks.page_offsets else []
    args += [q]
    args += [q_scale] if ks.fp8 and not ks.q_in_kernel else []
    args += [k, v] + ([k_scale, v_scale] if ks.fp8 else [])
    return call(*args)
