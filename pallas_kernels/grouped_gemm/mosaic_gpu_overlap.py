"""FP8 K loop that overlaps each K block's wgmma with the previous block's scale promotion.

The plain FP8 loop (``mosaic_gpu._k_step``) runs one 128-wide K block (one scale block) per
pipeline step: wgmma into a fresh f32 partial, wait for it (``wgmma.wait_group 0``), then
promote ``acc += partial * x_scale[row] * w_scale``. Inside a warpgroup the tensor core idles
while the promotion runs, and the promotion waits for every wgmma.

Here a pipeline step carries TWO K blocks (a, b) and the partial of block b stays in flight
across the step boundary (DeepGEMM-style ping-pong of two partial accumulators P0, P1):

  step s:  issue wgmma(P0 <- x_a @ w_a)            # P0 fresh (zero) every step
           wait_group(n_w)  -> step s-1's P1 done   # n_w = wgmma groups per K block
           acc += P1 * scale_b(s-1)                 # overlaps the P0 wgmma
           P1 <- 0; issue wgmma(P1 <- x_b @ w_b)
           wait_group(n_w)  -> P0 done
           acc += P0 * scale_a(s)                   # overlaps the P1 wgmma
  after the loop: wait_group(0); acc += P1 * scale_b(last)

Why two K blocks per step and not one: a register value cannot be indexed by a traced
``kb % 2``, and rotating two partials through the loop carry (P_prev <- P_new) makes the
back edge a register copy of an accumulator whose wgmma is still in flight, which forces
ptxas to serialize. With the pair, P1 keeps its registers across the back edge (its old value
dies in the promotion before it is zeroed) and P0 never crosses it.

SMEM reuse: the step-(s-1) slot is read by its P1 wgmma until the first wait of step s, so the
TMA pipeline must not refill it during step s: ``delay_release=1`` on every BlockSpec (the
slot of step s-1 is handed back at the end of step s). In the warp-specialized kernel the last
step of a tile releases nothing, so the memory warpgroup waits on a "drained" barrier
(arrived by each compute warpgroup after its final ``wait_group(0)``) before it starts the next
tile's prologue (see ``mosaic_gpu._body_ws``).

Registers per compute thread (f32): acc + P0 + P1 = 3 * block_m * block_n / 128 per weight
(64x128, one weight: 192; SwiGLU 64x64: 2 * 96 = 192), plus the row scales.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - very old jax
    plgpu = None


def _row_layout():
    return plgpu.Layout.WGMMA.reduce(1)


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _promote(acc, part, scale):
    """``acc + part * scale[:, None]`` (acc, part [bm, bn] f32 WGMMA layout; scale [bm])."""
    return acc + part * lax.broadcast_in_dim(scale, acc.shape, [0])


def specs(rows, cta_n: int, block_k: int, n_w: int, box, transforms, fp8_scales: bool = True):
    """BlockSpecs of one overlap step: x_a, x_b, w_a..., w_b..., (x scales [2, rows]).

    ``rows`` is the x block's row dim (``pl.Element``: the index map gives the row offset
    ``box`` itself). Every spec has ``delay_release=1`` (see the module docstring).
    """
    x = [
        plgpu.BlockSpec(
            (rows, block_k),
            lambda kb, h=h: (box, 2 * kb + h),
            transforms=transforms,
            delay_release=1,
        )
        for h in (0, 1)
    ]
    w = [
        plgpu.BlockSpec(
            (cta_n, block_k),
            lambda kb, h=h: (0, 2 * kb + h),
            transforms=transforms,
            delay_release=1,
        )
        for h in (0, 1)
        for _ in range(n_w)
    ]
    out = x + w
    if fp8_scales:
        # x_scale_t [KB, M]: rows 2kb and 2kb+1 are the scales of the step's two K blocks.
        out.append(plgpu.BlockSpec((2, rows), lambda kb: (kb, box), delay_release=1))
    return out


def split_refs(refs, n_w: int):
    """(x_a, x_b), (w_a tuple, w_b tuple), xs ref [2, rows] of one step's SMEM refs."""
    x_a, x_b = refs[0], refs[1]
    w_a, w_b = tuple(refs[2 : 2 + n_w]), tuple(refs[2 + n_w : 2 + 2 * n_w])
    return (x_a, x_b), (w_a, w_b), refs[2 + 2 * n_w]


def init_carry(shape, n_w: int):
    """Zero accumulators and zero row scales for the (empty) partial of "step -1"."""
    accs = tuple(_zeros(shape) for _ in range(n_w))
    scale = plgpu.layout_cast(jnp.zeros(shape[:1], jnp.float32), _row_layout())
    return accs, (scale,) * n_w


def step(xs_pair, ws_pair, scale_rows, w_scale_of, carry, p1_refs):
    """One overlap step (two K blocks) of one warpgroup; returns the next carry.

    xs_pair: x blocks (a, b), SMEM [bm, bk] e4m3 each. ws_pair: per K block a tuple of n_w
    K-major weight tiles [bn, bk] e4m3. scale_rows: (a, b) SMEM [bm] f32 row scales.
    w_scale_of(i, h): f32 scalar weight block scale of weight i, K block h of this step.
    carry: (accs, scales of P1) as from ``init_carry``. p1_refs: n_w ACC refs [bm, bn] that
    hold the previous step's block-b partials, wgmma possibly still in flight.
    """
    accs, prev_scales = carry
    n_w = len(accs)
    shape = accs[0].shape
    # Scalar GMEM scale loads first: their latency hides behind the wgmma that follows.
    w_sc = [[w_scale_of(i, h) for i in range(n_w)] for h in (0, 1)]
    row = [plgpu.load(r, (), layout=_row_layout()) for r in scale_rows]
    x_a, x_b = xs_pair
    w_a, w_b = ws_pair

    def with_p0(p0_refs):
        for p0, w in zip(p0_refs, w_a, strict=True):
            plgpu.wgmma(p0, x_a, plgpu.transpose_ref(w, (1, 0)))
        # <= n_w groups in flight: this step's block-a ones; the previous P1 is complete.
        prev = [plgpu.wgmma_accumulator_load(p, wait_n=n_w) for p in p1_refs]
        new = [_promote(a, p, s) for a, p, s in zip(accs, prev, prev_scales, strict=True)]
        for p1, w in zip(p1_refs, w_b, strict=True):
            p1[...] = _zeros(shape)
            plgpu.wgmma(p1, x_b, plgpu.transpose_ref(w, (1, 0)))
        cur = [plgpu.wgmma_accumulator_load(p, wait_n=n_w) for p in p0_refs]
        return tuple(
            _promote(a, p, row[0] * w_sc[0][i])
            for i, (a, p) in enumerate(zip(new, cur, strict=True))
        )

    accs = pl.run_scoped(with_p0, tuple(plgpu.ACC(shape, jnp.float32) for _ in range(n_w)))
    return accs, tuple(row[1] * w_sc[1][i] for i in range(n_w))


def finish(carry, p1_refs):
    """Waits for the last step's block-b wgmma and promotes its partial."""
    accs, scales = carry
    last = [plgpu.wgmma_accumulator_load(p, wait_n=0) for p in p1_refs]
    return tuple(_promote(a, p, s) for a, p, s in zip(accs, last, scales, strict=True))


def acc_types(shape, n_w: int):
    """The P1 accumulators, allocated outside the pipeline so they live across its steps."""
    return tuple(plgpu.ACC(shape, jnp.float32) for _ in range(n_w))
