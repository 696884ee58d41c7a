"""Ragged batches: split the KV work by visible tokens, not by sequence slots.

With the (split, sequence) grid every CTA of a sequence gets ``ceil(blocks / J)`` blocks, J
fixed from the cache capacity, so at B >= the SM count (J = 1) the call lasts as long as the
LONGEST sequence: B=128 with lengths uniform in [2K, 4K] took as long as all-4K (issue 16).
Here a small XLA pre-pass (``plan_ragged_work``, on device: lengths are device values) cuts
each sequence's visible blocks into ``J_b`` near-equal pieces so that the pieces number about
``target`` (SMs x items per SM), sorts them longest first (the hardware hands out CTAs in grid
order, so this is longest-processing-time-first list scheduling), and the kernel runs one CTA
per piece; ``combine_ragged`` merges each sequence's partials by their log-sum-exps.

Static bound on the number of pieces: with ``cap = max(ceil(total / target), ceil(max_b n_b /
max_splits), 1)`` blocks a piece, ``J_b = ceil(n_b / cap) <= n_b / cap + 1``, so
``sum_b J_b <= target + B`` and ``J_b <= max_splits``; the grid has
``min(target + B, max_splits * B)`` CTAs, the unused ones (``b = -1``) exit at once.
No split at all when the batch is already balanced (``num_sms``). Both functions are pure
jnp (traceable, CPU-testable); across the layers of one decode step the plan depends only on
``lengths``, so XLA can compute it once.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from step3_jax.kernels.mfa_decode.merge import combine_splits


def num_items(batch: int, target: int, max_splits: int) -> int:
    """Static number of work items (grid CTAs per query token) of a ragged call."""
    if min(batch, target, max_splits) < 1:
        raise ValueError(f"{batch=}, {target=}, {max_splits=} must all be >= 1")
    return min(target + batch, max_splits * batch)


def _cdiv(a, b):
    return (a + b - 1) // b


def plan_ragged_work(
    lengths: Int[Array, " B"],
    *,
    max_len: int,
    block_s: int,
    target: int,
    max_splits: int,
    num_sms: int = 0,
) -> tuple[Int[Array, "C 3"], Int[Array, " B"], Int[Array, " B"]]:
    """Work list of a ragged call.

    lengths: [B] int, valid tokens per sequence (incl. the new ones; clipped to [0, max_len]).
    Returns ``work`` [C, 3] int32 rows (sequence b or -1 for an unused row, first block, number
    of blocks), C = ``num_items(B, target, max_splits)``, and per sequence ``start`` [B] (row of
    its first piece) and ``count`` [B] (its pieces, 0 for an empty sequence; its rows are
    ``start .. start + count - 1``). The pieces of every sequence cover its blocks
    ``0 .. ceil(len / block_s) - 1`` exactly once, in order. ``num_sms`` > 0: no splitting
    when the longest sequence is within 10% + 1 block of ``total / num_sms`` (nothing to
    balance; splitting would only add partials and start-ups).
    """
    b = lengths.shape[0]
    c = num_items(b, target, max_splits)
    n = _cdiv(jnp.clip(lengths.astype(jnp.int32), 0, max_len), block_s)  # [B] visible blocks
    tot, nmax = jnp.sum(n), jnp.max(n)
    cap = jnp.maximum(jnp.maximum(_cdiv(tot, target), _cdiv(nmax, max_splits)), 1)
    # Already balanced (the longest sequence within 10% + 1 block of an even share per SM,
    # e.g. a full batch of B >= SMs): one piece a sequence, no partials to merge.
    if num_sms:
        cap = jnp.where(10 * nmax * num_sms <= 11 * tot + 10 * num_sms, jnp.maximum(nmax, 1), cap)
    count = _cdiv(n, cap)  # pieces per sequence, <= max_splits
    piece = _cdiv(n, jnp.maximum(count, 1))  # its largest piece
    # Longest pieces first, ties by index (a stable descending sort), without a sort or a
    # scatter kernel: sequence b' goes before b iff it wins this comparison, and b's first row
    # is the number of pieces of all that go before it ([B, B] and [C, B] compare-and-sum
    # fusions; B is at most a few hundred).
    idx = jnp.arange(b, dtype=jnp.int32)
    before = (piece[:, None] > piece[None, :]) | (
        (piece[:, None] == piece[None, :]) & (idx[:, None] < idx[None, :])
    )  # [b', b]
    start = jnp.sum(jnp.where(before, count[:, None], 0), axis=0)  # [B]
    rows = jnp.arange(c, dtype=jnp.int32)[:, None]
    mine = (start[None, :] <= rows) & (rows < (start + count)[None, :])  # [C, B], <= 1 a row
    live = jnp.any(mine, axis=1)
    seq = jnp.sum(jnp.where(mine, idx[None, :], 0), axis=1)
    j = rows[:, 0] - start[seq]
    n_s, k_s = n[seq], jnp.maximum(count[seq], 1)
    first = (j * n_s) // k_s  # near-equal pieces: sizes differ by at most one block
    size = ((j + 1) * n_s) // k_s - first
    work = jnp.stack(
        [jnp.where(live, seq, -1), jnp.where(live, first, 0), jnp.where(live, size, 0)], axis=1
    ).astype(jnp.int32)
    return work, start.astype(jnp.int32), count.astype(jnp.int32)


def combine_ragged(
    out: Float[Array, "C T N H"],
    lse: Float[Array, "C T N"],
    start: Int[Array, " B"],
    count: Int[Array, " B"],
    max_splits: int,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Merge each sequence's piece partials (rows ``start .. start + count - 1`` of out / lse,
    each normalised over its own keys) into bf16 out [B, T, N, H] and lse [B, T, N]. Rows not
    listed are never read into the result (they may hold garbage); a sequence with no piece
    gives zeros and -inf."""
    j = jnp.arange(max_splits, dtype=jnp.int32)[:, None]
    valid = j < count[None, :]  # [J, B]
    idx = jnp.clip(jnp.where(valid, start[None, :] + j, 0), 0, out.shape[0] - 1)
    o = jnp.where(valid[:, :, None, None, None], out[idx], 0.0)
    m = jnp.where(valid[:, :, None, None], lse[idx], -jnp.inf)
    return combine_splits(o, m)


def longest_first(lengths: Int[Array, " B"], *, max_len: int, block_s: int) -> Int[Array, " B"]:
    """The sequences by visible blocks, most first, ties by index: ``order[i]`` is the
    sequence grid slot i runs (`config.use_longest_first`). A [B, B] compare-and-sum rank and
    its inverse as a second compare-and-sum: two small fusions, no sort or scatter kernel."""
    b = lengths.shape[0]
    n = _cdiv(jnp.clip(lengths.astype(jnp.int32), 0, max_len), block_s)
    idx = jnp.arange(b, dtype=jnp.int32)
    before = (n[:, None] > n[None, :]) | (
        (n[:, None] == n[None, :]) & (idx[:, None] < idx[None, :])
    )
    rank = jnp.sum(before, axis=0, dtype=jnp.int32)  # [B]: slot of sequence b
    return jnp.sum(jnp.where(rank[None, :] == idx[:, None], idx[None, :], 0), axis=1).astype(
        jnp.int32
    )
