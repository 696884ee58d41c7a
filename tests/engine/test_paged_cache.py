"""`PagedKVCache` against the contiguous `KVCache`, and the host `PageAllocator`.

Hostile layout: pages handed out in a shuffled order, every page not owned by a sequence
(the null page included) filled with NaN, ragged lengths. Any read of a slot that is not the
sequence's own shows up as NaN.

Tolerances: the float32 model runs the same ops on the same values in both caches (the paged
one gathers pages first; the extra masked slots add exact zeros), so logits agree to float32
summation-order noise: the suite's 2 * u * sqrt(256) * (7L + 1) (tests/test_decode.py). At the
attention level, bf16 paths round q, K, V and P to bf16 (u = 2^-8) in both implementations,
which differ only in where scales and P are rounded: we allow 4 ulps of the output scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CFG, build_model

import step3_jax as s3
from step3_jax.cache import v_from_tiles
from step3_jax.engine import ModelExecutor, PageAllocator, PagedKVCache, PoolExhausted
from step3_jax.engine.paged_cache import NULL_PAGE
from step3_jax.quant import QuantizedActivations

TOL_F32 = 2 * 2.0**-24 * np.sqrt(256) * (7 * CFG.num_layers + 1)
PAGE = 4


def shuffled_tables(lengths, max_pages, num_pages, seed=0):
    """Block tables with each sequence's pages drawn from a shuffled pool (null elsewhere)."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(np.arange(1, num_pages)))
    table = np.full((len(lengths), max_pages), NULL_PAGE, np.int32)
    for b, n in enumerate(lengths):
        k = -(-n // PAGE)
        table[b, :k] = [free.pop() for _ in range(k)]
    return table


def nan_paged(table, num_layers, num_pages, head, dtype, v_transposed=False):
    cache = PagedKVCache.create(
        num_layers, table.shape[0], num_pages, PAGE, table.shape[1], head, dtype, v_transposed
    )
    nan = lambda a: jnp.full(a.shape, jnp.nan, a.dtype)
    cache = jax.tree.map(nan, cache.replace(block_table=None, lengths=None))
    return cache.replace(
        block_table=jnp.asarray(table), lengths=jnp.zeros((table.shape[0],), jnp.int32)
    )


_fwd = nnx.jit(lambda m, t, p, c: m(t, cache=c, positions=p))


@pytest.mark.parametrize(
    "cache_dtype,v_transposed",
    [(jnp.float32, False), (jnp.float8_e4m3fn, False), (jnp.float8_e4m3fn, True)],
)
def test_model_logits_equal_contiguous_cache(cache_dtype, v_transposed):
    """Prefill ragged prompts (right-padded) then decode 6 steps: paged == contiguous (an FP8
    cache quantizes each token the same way in both, so the same tolerance holds; the
    transposed-V pages hold the same bytes as the contiguous token-major cache)."""
    model = build_model()
    lengths, new, max_len = np.array([3, 9, 6]), 6, 16
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, CFG.vocab_size, (3, max_len)).astype(np.int32)
    table = shuffled_tables(lengths + new, max_len // PAGE, 16)
    paged = nan_paged(table, CFG.num_layers, 16, CFG.head_dim, cache_dtype, v_transposed)
    contig = s3.KVCache.for_config(CFG, 3, max_len, cache_dtype)
    pos = np.broadcast_to(np.arange(9, dtype=np.int32), (3, 9))
    lp, paged = _fwd(model, tokens[:, :9], pos, paged)
    lc, contig = _fwd(model, tokens[:, :9], pos, contig)
    for b, n in enumerate(lengths):  # padding positions of shorter rows are not compared
        np.testing.assert_allclose(lp[b, :n], lc[b, :n], atol=TOL_F32 * np.abs(lc).max())
    for i in range(new):
        p = (lengths + i)[:, None].astype(np.int32)
        tok = tokens[np.arange(3), lengths + i][:, None]
        lp, paged = _fwd(model, tok, p, paged)
        lc, contig = _fwd(model, tok, p, contig)
        assert np.isfinite(np.asarray(lp)).all()
        np.testing.assert_allclose(lp, lc, atol=TOL_F32 * np.abs(lc).max())
    np.testing.assert_array_equal(paged.lengths, lengths + new)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
@pytest.mark.parametrize("t", [1, 4, 12])  # 1, 4: the kernel API's paged path; 12: gathered
def test_attend_matches_contiguous(dtype, t):
    b, n, h, max_len, num_pages = 3, 8, 64, 32, 40
    lengths = np.array([5, 17, 30])
    rng = np.random.default_rng(t)
    table = shuffled_tables(lengths, max_len // PAGE, num_pages, seed=t)
    paged = nan_paged(table, 2, num_pages, h, dtype)
    contig = s3.KVCache.create(2, b, max_len, h, dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, max_len, h)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
    pos_all = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
    # Write only each sequence's own tokens into the paged cache (the rest stays NaN).
    for i, m in enumerate(lengths):
        rows = paged.replace(block_table=paged.block_table[i : i + 1])
        rows = rows.write(1, k[i : i + 1, :m], v[i : i + 1, :m], pos_all[i : i + 1, :m])
        paged = rows.replace(block_table=paged.block_table)
    contig = contig.write(1, k, v, pos_all)
    positions = jnp.asarray(lengths[:, None] - t + np.arange(t), jnp.int32)
    got = np.asarray(paged.attend(1, q, positions), np.float32)
    want = np.asarray(contig.attend(1, q, positions, "xla"), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=4 * 2.0**-8 * np.abs(want).max())


def test_writes_never_leave_own_pages():
    """Positions past a row's pages or past the table land in the null page only."""
    table = np.array([[3, 0], [1, 2]], np.int32)  # row 0 owns page 3 only
    cache = PagedKVCache.create(1, 2, 5, PAGE, 2, 8, jnp.float32)
    cache = cache.replace(block_table=jnp.asarray(table))
    before = np.asarray(cache.k)
    kv = jnp.ones((2, 12, 8), jnp.float32)
    pos = jnp.asarray(np.stack([np.arange(12), np.arange(12)]) + np.array([[0], [100]]))
    after = np.asarray(cache.write(0, kv, kv, pos).k)
    changed = np.flatnonzero((after != before).any(axis=(0, 2, 3)))
    np.testing.assert_array_equal(changed, [NULL_PAGE, 3])  # row 1 wrote nothing real


def test_allocator_exhaustion_is_clean():
    alloc = PageAllocator(6)
    a = alloc.allocate(3)
    assert NULL_PAGE not in a and len(set(a)) == 3
    with pytest.raises(PoolExhausted, match="need 3 pages, 2 of 5 free"):
        alloc.allocate(3)
    assert alloc.num_free == 2  # nothing taken by the failed call
    b = alloc.allocate(2)
    assert not set(a) & set(b)
    alloc.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(a[:1])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([NULL_PAGE])
    assert alloc.num_free == 3
    with pytest.raises(ValueError, match="num_pages must be >= 2"):
        PageAllocator(1)


def test_transposed_v_cache_is_the_same_cache():
    """`KVCache(v_transposed=True)` holds exactly the token-major cache's bytes as V^T tiles,
    and the model's logits through it match the token-major cache's to float32 summation-order
    noise (the XLA path transposes the view back; XLA may then fuse or order the sums
    differently: the module's TOL_F32); bad requests are clear errors."""
    model = build_model()
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    fp8 = jnp.float8_e4m3fn
    plain = s3.KVCache.for_config(CFG, 2, 64, fp8)
    trans = s3.KVCache.for_config(CFG, 2, 64, fp8, v_transposed=True)
    assert trans.v.shape == (CFG.num_layers, 2, 1, CFG.head_dim, 64) and trans.v_transposed
    pos = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
    lp, plain = _fwd(model, tokens[:, :8], pos, plain)
    lt, trans = _fwd(model, tokens[:, :8], pos, trans)
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=TOL_F32 * np.abs(b).max())
    close(lt, lp)
    for i in range(8, 12):
        p = np.full((2, 1), i, np.int32)
        lp, plain = _fwd(model, tokens[:, i : i + 1], p, plain)
        lt, trans = _fwd(model, tokens[:, i : i + 1], p, trans)
        close(lt, lp)
    # Layer 0's K/V come from the embeddings alone: the same bytes in both layouts (deeper
    # layers' inputs already carry the summation-order noise above).
    np.testing.assert_array_equal(
        np.asarray(v_from_tiles(trans.v[0]), np.float32), np.asarray(plain.v[0], np.float32)
    )
    _, v_t = trans.dequantized_layer(0, jnp.float32)
    _, v_p = plain.dequantized_layer(0, jnp.float32)
    np.testing.assert_array_equal(np.asarray(v_t), np.asarray(v_p))
    with pytest.raises(ValueError, match="v_transposed=True needs an FP8"):
        s3.KVCache.create(2, 2, 64, 8, jnp.bfloat16, v_transposed=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        s3.KVCache.create(2, 2, 48, 8, fp8, v_transposed=True)
    with pytest.raises(ValueError, match="v_transposed=True needs an FP8"):
        PagedKVCache.create(2, 2, 8, PAGE, 4, 8, jnp.float32, v_transposed=True)
    ex = ModelExecutor(model, max_batch=2, max_len=16, page_size=PAGE, cache_dtype=fp8,
                       v_transposed=True)  # fmt: skip
    assert ex.cache.v_transposed and ex.cache.v.shape[2:] == (CFG.head_dim, PAGE)


@pytest.mark.parametrize("t", [1, 12])  # 1: the kernel API's paged path; 12: gathered
def test_attend_quantize_out_is_the_activation_format(t):
    """``quantize_out`` (what the layer asks for under `KernelPolicy.o_quant`'s default) on
    the paged cache: off the GPU kernel's epilogue, o is the bf16 output quantized per token
    per 128 columns, bitwise `QuantizedActivations.quantize` of the plain call."""
    b, n, h, max_len, num_pages = 2, 4, 256, 32, 20
    lengths = np.array([9, 30])
    rng = np.random.default_rng(40 + t)
    table = shuffled_tables(lengths, max_len // PAGE, num_pages, seed=t)
    paged = nan_paged(table, 1, num_pages, h, jnp.float8_e4m3fn)
    k, v = (jnp.asarray(rng.standard_normal((b, max_len, h)), jnp.bfloat16) for _ in range(2))
    pos_all = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
    for i, m in enumerate(lengths):
        rows = paged.replace(block_table=paged.block_table[i : i + 1])
        rows = rows.write(0, k[i : i + 1, :m], v[i : i + 1, :m], pos_all[i : i + 1, :m])
        paged = rows.replace(block_table=paged.block_table)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
    positions = jnp.asarray(lengths[:, None] - t + np.arange(t), jnp.int32)
    got = paged.attend(0, q, positions, quantize_out=True)
    want = QuantizedActivations.quantize(paged.attend(0, q, positions))
    assert isinstance(got, QuantizedActivations) and got.shape == (b, t, n, h)
    assert got.scales.shape == (b, t, n, h // 128)
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
    np.testing.assert_array_equal(
        np.asarray(got.values, np.float32), np.asarray(want.values, np.float32)
    )
