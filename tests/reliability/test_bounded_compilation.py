"""Issue 15, recompile storms: sampling settings are traced, shapes are bucketed.

At b4ff9dc every new temperature / top_p / stop-token count recompiled the decode loop
(~1.8 s and +14.5 MB per call, a segfault after ~125 calls) and every batch size was its own
compilation (64 sizes -> 443 compiles). Here compiles are counted with JAX's own monitoring
events (one ``backend_compile`` event per XLA compilation, whatever triggered it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc

import jax
import numpy as np
import pytest
from rel_fixtures import build_model, tiny_config

import step3_jax as s3
from step3_jax import decode as decode_mod

psutil = pytest.importorskip("psutil")  # dev extra; absent from the offline GPU image
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def live_rss() -> int:
    """The process's RSS after a full collection and, on glibc, ``malloc_trim(0)``: freed
    blocks the allocator kept (up to ~85 MiB after a batch-64 call, measured) go back to the
    OS first, so the sample follows live memory rather than the last call's size."""
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def count_compiles():
    """Yields a one-element list holding the number of XLA compilations so far."""
    count = [0]

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _random_call(rng, model, max_batch, max_prompt, max_new):
    """One generate call with a random batch, prompt lengths and per-request sampling."""
    batch = int(rng.integers(1, max_batch + 1))
    vocab = model.config.vocab_size
    prompts = [
        rng.integers(0, vocab, int(rng.integers(1, max_prompt + 1))).tolist() for _ in range(batch)
    ]
    greedy = rng.random(batch) < 0.3
    kwargs = dict(
        temperature=np.where(greedy, 0.0, rng.uniform(0.1, 2.0, batch)).tolist(),
        top_k=rng.integers(0, vocab + 1, batch).tolist(),
        top_p=rng.uniform(0.05, 1.0, batch).tolist(),
        stop_tokens=rng.integers(0, vocab, int(rng.integers(0, 5))).tolist(),
        seed=int(rng.integers(0, 2**31)),
    )
    return s3.generate(model, prompts, max_new, **kwargs), (batch, max(map(len, prompts)))


def _bucket_key(batch, longest):
    return decode_mod._bucket(batch, 1), decode_mod._bucket(longest, 8)


def _warm_up(model, batches, prompt_lengths, max_new):
    keys = set()
    for b in batches:
        for t in prompt_lengths:
            s3.generate(model, [[1] * t] * b, max_new, temperature=0.7, stop_tokens=[3])
            keys.add(_bucket_key(b, t))
    return keys


def _run(model, calls, max_batch, max_prompt, max_new, seed):
    """Warm every bucket up, then ``calls`` random calls: returns (compiles during the
    random calls, RSS growth in bytes, number of buckets).

    RSS is sampled after every call (`live_rss`). Without the trim a sample swung by up to
    +85 MiB with what the allocator kept of the last call's buffers, and the growth (median
    of the last quarter of the samples minus the median of the first) measured 8-34 MiB on
    the 2-core dev machine and 52 MiB once in CI on `BIG_CFG`, seed 1 (66 MiB once on
    Step3Config.tiny(); unbucketed stop arrays: 19 compiles, 112 MiB). Trimmed, samples step
    by <= 8 MiB and the growth is 8.2 / 7.6 MiB (seeds 1 / 2), flat after ~50 calls; a
    deliberate 0.4 MiB-per-call leak measures 74 MiB (fails).
    """
    batches = [2**i for i in range(max_batch.bit_length())]
    prompts = sorted({min(decode_mod._bucket(t, 8), max_prompt) for t in range(1, max_prompt + 1)})
    with count_compiles() as warm_count:
        keys = _warm_up(model, batches, prompts, max_new)
    # Prefill, decode loop, cache zeros and the first-call helpers: a few programs per bucket.
    assert warm_count[0] <= 4 * len(keys) + 10
    rng = np.random.default_rng(seed)
    rss = []
    # Objects alive now (the warm-up's jaxprs, lowerings, executables) are not what a call
    # leaks: freezing them keeps each gc.collect() to this call's garbage (0.5 s -> ~0 s per
    # collection after the 42 warm-ups). An old object that dies later stays in RSS: that can
    # only raise the measured growth, never hide a leak.
    gc.collect()
    gc.freeze()
    try:
        with count_compiles() as count:
            for _ in range(calls):
                _, shape = _random_call(rng, model, max_batch, max_prompt, max_new)
                assert _bucket_key(*shape) in keys
                rss.append(live_rss())
    finally:
        gc.unfreeze()
    quarter = max(1, calls // 4)
    growth = np.median(rss[-quarter:]) - np.median(rss[:quarter])
    return count[0], growth, len(keys)


# A config no other test module builds, so this module's first call really compiles.
CFG = tiny_config(vocab_size=96)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=2)


def test_random_sampling_settings_share_one_compilation_fast(model):
    """Fast version (default run): one bucket (batch 3-4, prompts 1-8), 40 random calls with
    random temperature / top-k / top-p per request and 0-4 stop tokens: no compile after the
    first call, whose compile time is reported apart from its decode time."""
    first = s3.generate(model, [[1, 2]] * 3, 4, temperature=0.5, stop_tokens=[7])
    assert first.compile_seconds > 0.1 and first.decode_seconds < first.compile_seconds
    rss0 = live_rss()
    rng = np.random.default_rng(0)
    with count_compiles() as count:
        for _ in range(40):
            batch = int(rng.integers(3, 5))
            prompts = [rng.integers(0, 96, int(rng.integers(1, 9))).tolist() for _ in range(batch)]
            out = s3.generate(
                model,
                prompts,
                4,
                temperature=rng.uniform(0.0, 2.0, batch).tolist(),
                top_k=rng.integers(0, 97, batch).tolist(),
                top_p=rng.uniform(0.05, 1.0, batch).tolist(),
                stop_tokens=rng.integers(0, 96, int(rng.integers(0, 5))).tolist(),
                seed=int(rng.integers(0, 2**31)),
            )
            assert out.compile_seconds == 0.0
    assert count[0] == 0
    assert live_rss() - rss0 < 50 * 2**20


# The 200-call test's model. Its compile count and RSS depend on the buckets (batch 1-64, prompt
# 1-200), not the widths: Step3Config.tiny() spent 80% of the test in prefill FLOPs (~1.7 s per
# batch-64 x 256-token call on 2 cores, vs ~0.13 s here) and the same ~2 s per compile. Its own
# vocabulary so no other module shares its jit cache entries; max_position_embeddings 512 holds
# the largest bucket (256 prompt + 16 steps -> 512 slots). A leaked batch-64 KV cache is 8 MiB.
BIG_CFG = tiny_config(vocab_size=80)


@pytest.mark.slow
def test_200_random_calls_compile_once_per_bucket_and_memory_stays_flat():
    """The issue's target: 200 calls, batch 1-64, prompt 1-200 (42 buckets), on a two-layer
    model with an MoE layer (`BIG_CFG`)."""
    big = build_model(BIG_CFG, seed=2)
    compiles, growth, buckets = _run(big, 200, 64, 200, 4, seed=1)
    assert buckets == 7 * 6
    assert compiles == 0
    assert growth < 50 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB"


def test_mixed_batch_rows_follow_their_own_settings(model):
    """A greedy row in a batch with sampled rows equals that prompt decoded greedily (in the
    same bucket, so no extra compile); the sampled rows change with the seed."""
    prompts = [[5, 9, 2], [7, 1], [3, 3, 3, 4]]
    alone = s3.generate(model, [prompts[1]] * 3, 4)
    kw = dict(temperature=[1.5, 0.0, 1.0], top_k=[0, 0, 5], top_p=[0.9, 1.0, 1.0])
    runs = [s3.generate(model, prompts, 4, seed=seed, **kw) for seed in (0, 11, 12)]
    for run in runs:
        assert run.tokens[1] == alone.tokens[0]
    sampled = {(tuple(r.tokens[0]), tuple(r.tokens[2])) for r in runs}
    assert len(sampled) > 1
