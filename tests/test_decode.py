"""Decode invariants, compilation counts, sampling and input validation of `step3_jax.decode`.

The model is the tiny config in float32 (dense MoE oracle, seeded random weights). Cached and
uncached forwards are two float32 evaluations of the same function that only differ in
summation order, so each is within the reference tolerance of the exact result (see
test_reference_model.py: u * sqrt(256) * 29 ~ 2.8e-5 normwise) and they agree within twice it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from flax import nnx

import step3_jax as s3
from step3_jax import decode as decode_mod
from step3_jax.model import cache_positions
from step3_jax.policy import KernelPolicy
from step3_jax.sampling import SamplingConfig, filter_logits, sample
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.model import Step3VLModel

CFG = s3.Step3Config.tiny()
TOL = 2 * 2.0**-24 * np.sqrt(256) * (7 * CFG.num_layers + 1)  # two float32 evaluations
# Ragged prompts whose padded length (8) and cache length (64) are shared by every generate
# call below, singles included, so the suite compiles each program once (XLA CPU compiles of
# the tiny model take seconds; they dominate this file's run time).
PROMPTS = [[5, 17, 300], [42, 7, 99, 250, 11, 3], [1, 2, 3, 4, 5, 6, 7, 8]]
NEW = 8
DECODE_CACHE_LEN = 32


def build_model(seed: int = 7, cfg: s3.Step3Config = CFG) -> s3.Step3Model:
    abstract = nnx.eval_shape(
        lambda: s3.Step3Model(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            policy=KernelPolicy.reference(),
        )
    )
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, ref.random_params(state, seed)))


@pytest.fixture(scope="module")
def model() -> s3.Step3Model:
    return build_model()


_forward = nnx.jit(lambda m, tokens: m(tokens))


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


# ----------------------------------------------------------------------------- invariants
def test_cache_matches_no_cache_forward(model):
    """Prefill 5 tokens into the cache, then decode the rest one at a time; every step's logits
    equal the uncached forward of the whole sequence at that position."""
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 16)).astype(np.int32)
    full = np.asarray(_forward(model, jnp.asarray(tokens)))
    cache = s3.KVCache.for_config(CFG, 3, DECODE_CACHE_LEN, dtype=jnp.float32)
    logits, cache = nnx.jit(lambda m, t, c: m(t, cache=c))(model, jnp.asarray(tokens[:, :5]), cache)
    assert _rel(logits, full[:, :5]) < TOL
    step = s3.make_decode_step(model)
    for t in range(5, 16):
        logits, cache = step(jnp.asarray(tokens[:, t]), cache)
        assert _rel(logits, full[:, t]) < TOL, f"position {t}"
    np.testing.assert_array_equal(np.asarray(cache.lengths), [16, 16, 16])


def test_greedy_equals_argmax_of_teacher_forced_forward(model):
    result = s3.generate(model, PROMPTS, NEW)
    assert result.finish_reasons == ["length"] * 3
    # One teacher-forced forward for the batch: right-padding is harmless (causal model).
    seqs = np.zeros((3, 16), np.int32)
    for i, (prompt, generated) in enumerate(zip(PROMPTS, result.tokens, strict=True)):
        assert len(generated) == NEW
        seqs[i, : len(prompt) + NEW] = prompt + generated
    all_logits = np.asarray(_forward(model, jnp.asarray(seqs)))
    for i, (prompt, generated) in enumerate(zip(PROMPTS, result.tokens, strict=True)):
        logits = all_logits[i]
        # logits at t predict token t + 1
        predicted = logits[len(prompt) - 1 : len(prompt) + NEW - 1]
        np.testing.assert_array_equal(predicted.argmax(-1), generated)
        # well posed: no near-tie between the top two logits that float32 could flip
        top2 = np.sort(predicted, -1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > TOL * np.abs(logits).max())


def test_ragged_batch_equals_per_sequence_runs(model):
    batch = s3.generate(model, PROMPTS, NEW)
    for i, prompt in enumerate(PROMPTS):
        single = s3.generate(model, [prompt], NEW)
        assert single.tokens[0] == batch.tokens[i], f"prompt {i}"


def test_decode_step_compiles_once_for_n_steps(model):
    step = s3.make_decode_step(model)
    cache = s3.KVCache.for_config(CFG, 3, DECODE_CACHE_LEN, dtype=jnp.float32)
    tokens = jnp.asarray([3, 4, 5], jnp.int32)
    before = decode_mod._forward_cached._cache_size()
    for _ in range(6):
        logits, cache = step(tokens, cache)
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    first_round = decode_mod._forward_cached._cache_size()
    assert first_round - before <= 1  # 0 if another test already compiled this shape
    for _ in range(6):
        logits, cache = step(tokens, cache)
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    assert decode_mod._forward_cached._cache_size() == first_round
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 12, 12])


def test_generate_reuses_the_compiled_loop(model):
    s3.generate(model, PROMPTS, NEW)
    sizes = (decode_mod._prefill._cache_size(), decode_mod._decode_loop._cache_size())
    # Another max_new_tokens in the same bucket and other prompts of the same padded length.
    out = s3.generate(model, [[9, 8, 7, 6], [1, 2], [3]], 13)
    assert [len(t) for t in out.tokens] == [13] * 3 and out.decode_steps == 12
    assert (decode_mod._prefill._cache_size(), decode_mod._decode_loop._cache_size()) == sizes


def test_stop_tokens(model):
    free = s3.generate(model, PROMPTS, NEW)
    stop = free.tokens[1][3]
    cut = free.tokens[1].index(stop)
    out = s3.generate(model, PROMPTS, NEW, stop_tokens=[stop])
    assert out.tokens[1] == free.tokens[1][:cut] and out.finish_reasons[1] == "stop"
    for i in (0, 2):  # the other sequences stop only if they produce that token too
        expect = free.tokens[i][: free.tokens[i].index(stop)] if stop in free.tokens[i] else None
        assert out.tokens[i] == (free.tokens[i] if expect is None else expect)
        assert out.finish_reasons[i] == ("length" if expect is None else "stop")


def test_all_sequences_stopping_ends_the_loop_early(model):
    free = s3.generate(model, [PROMPTS[0]], NEW)
    out = s3.generate(model, [PROMPTS[0]], NEW, stop_tokens=[free.tokens[0][0]])
    assert out.tokens == [[]] and out.finish_reasons == ["stop"]
    assert out.decode_steps == 0


def test_fp8_cache_runs(model):
    """Runs end to end with an FP8 KV cache (numerics are tests/test_quant*.py's business)."""
    cache = s3.KVCache.for_config(CFG, 3, DECODE_CACHE_LEN, dtype=jnp.float8_e4m3fn)
    assert cache.is_fp8 and cache.k.dtype == jnp.float8_e4m3fn
    out = s3.generate(model, PROMPTS, NEW, cache_dtype=jnp.float8_e4m3fn)
    assert [len(t) for t in out.tokens] == [NEW] * 3
    assert all(0 <= t < CFG.vocab_size for seq in out.tokens for t in seq)
    # The transposed-V layout (FP8 P.V kernel) holds the same bytes: the same greedy tokens
    # (its logits differ by float32 summation order only: tests/engine/test_paged_cache.py).
    out_t = s3.generate(model, PROMPTS, NEW, cache_dtype=jnp.float8_e4m3fn, v_transposed=True)
    assert out_t.tokens == out.tokens
    with pytest.raises(ValueError, match="v_transposed=True needs an FP8"):
        s3.generate(model, PROMPTS, NEW, v_transposed=True)
    # decode_step takes a transposed cache too (V^T tiles; S = 128 != H).
    step = s3.make_decode_step(model)
    logits = {}
    for vt in (False, True):
        cache = s3.KVCache.for_config(CFG, 3, 128, jnp.float8_e4m3fn, v_transposed=vt)
        for tok in (5, 17, 300):
            out, cache = step(jnp.full((3,), tok, jnp.int32), cache)
        logits[vt] = np.asarray(out)
    np.testing.assert_allclose(logits[True], logits[False], atol=TOL * np.abs(logits[False]).max())


# ----------------------------------------------------------------------------- sampling
def _logits(seed: int, batch: int = 4, vocab: int = 50) -> jax.Array:
    return jnp.asarray(3 * np.random.default_rng(seed).standard_normal((batch, vocab)), jnp.float32)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_filter_top_k_keeps_exactly_the_k_largest(k):
    logits = _logits(0)
    kept = np.isfinite(np.asarray(filter_logits(logits, k, 1.0)))
    expect = np.zeros_like(kept)
    np.put_along_axis(expect, np.argsort(-np.asarray(logits), -1)[:, :k], True, -1)
    np.testing.assert_array_equal(kept, expect)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_filter_top_p_keeps_the_smallest_nucleus(p):
    logits = np.asarray(_logits(1), np.float64)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), 0, p)))
    probs = ref.softmax(logits)
    for row in range(len(logits)):
        order = np.argsort(-probs[row])
        n = int(kept[row].sum())
        assert kept[row][order[:n]].all()  # a prefix of the sorted tokens
        assert probs[row][order[:n]].sum() >= p - 1e-6  # reaches p ...
        assert probs[row][order[: n - 1]].sum() < p + 1e-6  # ... and is the smallest such set


def test_sampling_never_leaves_the_kept_set():
    logits = _logits(2, batch=2)
    config = SamplingConfig(temperature=1.5, top_k=6, top_p=0.8)
    allowed = np.isfinite(np.asarray(filter_logits(logits / 1.5, 6, 0.8)))
    # Rows of a batch are sampled independently: 2000 copies of a row are 2000 draws.
    for b in range(2):
        draws = np.asarray(sample(jnp.tile(logits[b], (2000, 1)), jax.random.key(b), config))
        assert allowed[b][draws].all()
        assert len(np.unique(draws)) > 1  # it does sample


def test_sampling_frequencies_follow_the_softmax():
    logits = _logits(3, batch=1, vocab=6)
    config = SamplingConfig(temperature=1.0)
    draws = np.asarray(sample(jnp.tile(logits, (20000, 1)), jax.random.key(1), config))
    freq = np.bincount(draws, minlength=6) / len(draws)
    probs = ref.softmax(np.asarray(logits[0], np.float64))
    # binomial standard error sqrt(p(1-p)/n) <= 0.0036 at n = 20000: 5 sigma
    np.testing.assert_allclose(freq, probs, atol=5 * 0.0036)


def test_temperature_zero_is_argmax():
    logits = _logits(4)
    expect = np.argmax(np.asarray(logits), -1)
    for seed in range(3):
        got = sample(logits, jax.random.key(seed), SamplingConfig(temperature=0.0, top_k=3))
        np.testing.assert_array_equal(np.asarray(got), expect)
    one = sample(logits, jax.random.key(0), SamplingConfig(temperature=2.0, top_k=1))
    np.testing.assert_array_equal(np.asarray(one), expect)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "tokens, match",
    [
        (np.array([1, 2, 3], np.int32), "tokens"),  # rank 1
        (np.ones((1, 2, 3), np.int32), "tokens"),  # rank 3
        (np.array([[1.0, 2.0]], np.float32), "tokens"),  # float dtype
        (np.array([[1, CFG.vocab_size]], np.int32), "tokens.*vocab_size"),  # out of vocab
        (np.array([[-1, 2]], np.int32), "tokens"),
        (np.zeros((1, 0), np.int32), "tokens"),  # empty
    ],
    ids=["rank1", "rank3", "float", "vocab", "negative", "empty"],
)
def test_model_rejects_bad_tokens(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model(jnp.asarray(tokens))


def _vl_model():
    vis = Step3VisionConfig.tiny(text_hidden_size=CFG.hidden_size)
    return Step3VLModel.create(
        CFG, vis, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32
    )


@pytest.mark.parametrize("vl", [False, True], ids=["text", "vl"])
def test_cached_forward_rejects_a_cache_it_would_corrupt(model, vl):
    """Eager cached forwards used to write past max_len (12 + 12 tokens into a 16-token cache:
    lengths 24, wrong logits) or at negative positions without an error, and a cache of
    another head_dim failed deep inside jax. Both models share one check."""
    m = _vl_model() if vl else model
    tokens = jnp.asarray([[5, 17, 300, 42, 7, 99]], jnp.int32)
    cache = s3.KVCache.for_config(CFG, 1, 8, dtype=jnp.float32)
    half_full = cache.replace(lengths=jnp.asarray([6], jnp.int32))
    with pytest.raises(ValueError, match="positions reach 11 but the cache holds max_len=8"):
        m(tokens, cache=half_full)
    with pytest.raises(ValueError, match=r"positions must be >= 0, got values in \[-3, 2\]"):
        m(tokens, cache=cache, positions=jnp.arange(6)[None] - 3)
    wrong_h = s3.KVCache.create(CFG.num_layers, 1, 8, 2 * CFG.head_dim, jnp.float32)
    with pytest.raises(ValueError, match=rf"cache does not fit.*H={CFG.head_dim}"):
        m(tokens, cache=wrong_h)
    with pytest.raises(ValueError, match=r"cache does not fit.*B=2 \(the tokens' batch\)"):
        m(jnp.concatenate([tokens, tokens]), cache=cache)


def test_cached_forward_may_fill_the_cache_exactly():
    """The bound is max_len itself: positions 2..7 of an 8-token cache are accepted (the
    check alone: an eager forward of the whole model took ~30 s of CI)."""
    tokens = jnp.asarray([[5, 17, 300, 42, 7, 99]], jnp.int32)
    cache = s3.KVCache.for_config(CFG, 1, 8, dtype=jnp.float32)
    cache = cache.replace(lengths=jnp.asarray([2], jnp.int32))
    positions = cache_positions(CFG, tokens, cache, None)
    np.testing.assert_array_equal(np.asarray(positions), [[2, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[1, 2, CFG.vocab_size]], "prompts.*vocab_size"),
        ([[1, -3]], "prompts"),
        ([[1, 2], []], r"prompts\[1\]"),
        ([], "prompts"),
        (np.ones((2, 2, 2), np.int32), "prompts"),  # rank 3
        ([[1.5, 2.0]], "prompts"),  # float ids must not be silently truncated
        (np.array([[1.0, 2.0]], np.float32), "prompts"),
    ],
    ids=["vocab", "negative", "empty-row", "empty", "rank3", "float-list", "float-array"],
)
def test_generate_rejects_bad_prompts(model, prompts, match):
    with pytest.raises(ValueError, match=match):
        s3.generate(model, prompts, 2)


def test_generate_rejects_bad_lengths(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        s3.generate(model, [[1, 2]], 0)
    with pytest.raises(ValueError, match="max_cache_len"):
        s3.generate(model, [[1, 2, 3]], 10, max_cache_len=8)  # cache overflow
    too_long = [list(range(CFG.max_position_embeddings + 1))]
    with pytest.raises(ValueError, match="prompt"):
        s3.generate(model, [[t % CFG.vocab_size for t in too_long[0]]], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s3.generate(model, [[1, 2]], CFG.max_position_embeddings)


def test_generate_fills_a_context_limit_that_is_not_a_power_of_two():
    """max_position_embeddings=40: 35 prompt tokens (padded to 64) + 5 new = 40 fits exactly.
    Power-of-two buckets used to overshoot the limit and raise."""
    cfg = dataclasses.replace(CFG, max_position_embeddings=40)
    limited = build_model(cfg=cfg)
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, CFG.vocab_size, 35)]
    out = s3.generate(limited, [prompt], 5)
    assert len(out.tokens[0]) == 5
    logits = np.asarray(_forward(limited, jnp.asarray([prompt + out.tokens[0]], jnp.int32)))[0]
    np.testing.assert_array_equal(logits[34:39].argmax(-1), out.tokens[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        s3.generate(limited, [prompt], 6)


def test_decode_step_rejects_bad_inputs(model):
    step = s3.make_decode_step(model)
    cache = s3.KVCache.for_config(CFG, 3, DECODE_CACHE_LEN, dtype=jnp.float32)
    with pytest.raises(ValueError, match="tokens"):
        step(jnp.ones((3, 2), jnp.int32), cache)  # [B, 2]: one token per step only
    with pytest.raises(ValueError, match="tokens"):
        step(jnp.ones((3,), jnp.float32), cache)
    with pytest.raises(ValueError, match="tokens.*vocab_size"):
        step(jnp.asarray([1, 2, CFG.vocab_size], jnp.int32), cache)
    with pytest.raises(ValueError, match="batch"):
        step(jnp.ones((2,), jnp.int32), cache)
    full = cache.replace(lengths=jnp.asarray([5, DECODE_CACHE_LEN, 0], jnp.int32))
    with pytest.raises(ValueError, match="cache is full"):
        step(jnp.asarray([1, 2, 3], jnp.int32), full)
    with pytest.raises(ValueError, match="max_len"):
        s3.KVCache.for_config(CFG, 1, CFG.max_position_embeddings + 1)
