"""`Engine` invariants on the tiny float32 model: every request's greedy output equals decoding
it alone with `generate`, whatever it shares the batch with, with chunked prefill, queueing and
a page pool too small for everyone; no compilation once warm; per-request sampling, stops,
cancellation, streaming (sync and async)."""

from __future__ import annotations

import asyncio
import math

import jax
import numpy as np
import pytest
from helpers import CFG, CharTokenizer, build_model, compiles

from step3_jax.decode import generate
from step3_jax.engine import Engine, EngineStopped, ModelExecutor, QueueFull, SamplingParams
from step3_jax.engine.sampling import filter_rows, sample_rows
from step3_jax.sampling import filter_logits

MAX_LEN, PAGE, CHUNK = 48, 4, 8


@pytest.fixture(scope="module")
def model():
    return build_model()


def prompts(n, seed=0, lo=1, hi=17):  # <= 16 tokens: `generate` pads to 8 or 16
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, CFG.vocab_size, rng.integers(lo, hi))) for _ in range(n)]


def make_engine(model, num_pages=None, **kw):
    ex = ModelExecutor(
        model, max_batch=3, max_len=MAX_LEN, page_size=PAGE, prefill_chunk=CHUNK,
        prefill_rows=2, num_pages=num_pages,
    )  # fmt: skip
    return Engine(ex, **kw)


def alone(model, prompt, n):
    return generate(model, [prompt], n, max_cache_len=64).tokens[0]


def test_greedy_equals_alone_and_no_recompiles(model):
    """7 requests of ragged lengths (some over several prefill chunks) through 3 slots and a
    pool of 12 pages (so some wait for memory): each equals its own `generate`. A second wave
    of different requests compiles nothing."""
    eng = make_engine(model, num_pages=13)
    programs = eng.executor.compile_count()
    wave1, new1 = prompts(7, seed=1), [5, 9, 3, 12, 7, 10, 4]
    out = eng.generate(wave1, [SamplingParams(max_tokens=n) for n in new1])
    assert eng.executor.compile_count() == programs + 2  # the decode and the prefill step
    assert eng.stats["admissions_deferred"] > 0
    for req, p, n in zip(out, wave1, new1, strict=True):
        assert req.finish_reason == "length" and req.output == alone(model, p, n)
    before = compiles()
    wave2 = prompts(5, seed=2)
    out = eng.generate(wave2, SamplingParams(max_tokens=6))
    assert compiles() == before, "a new request shape recompiled the engine"
    for req, p in zip(out, wave2, strict=True):
        assert req.output == alone(model, p, 6)
    assert eng.executor.allocator.num_free == 12  # every page returned


def test_sampling_is_per_request(model):
    """A seeded sampled request gives the same tokens alone and in a crowd; top_k=1 is greedy."""
    eng = make_engine(model)
    p = prompts(3, seed=3)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=11)
    solo = eng.generate([p[0]], sampled)[0].output
    crowd = eng.generate(p, [SamplingParams(max_tokens=5), sampled, sampled])
    assert crowd[1].output != crowd[2].output or p[1] == p[2]  # prompts differ
    again = eng.generate([p[1], p[0]], [SamplingParams(max_tokens=3), sampled])
    assert again[1].output == solo
    top1 = SamplingParams(max_tokens=8, temperature=2.0, top_k=1)
    assert eng.generate([p[0]], top1)[0].output == alone(model, p[0], 8)


def test_stops_and_cancellation(model):
    eng = make_engine(model, tokenizer=CharTokenizer())
    p = prompts(1, seed=4)[0]
    ref = alone(model, p, 12)
    text = CharTokenizer().decode(ref)
    # A stop token: finish before it, token not in the output.
    r = eng.generate([p], SamplingParams(max_tokens=12, stop_token_ids=(ref[4],)))[0]
    cut = ref.index(ref[4])
    assert (r.output, r.finish_reason) == (ref[:cut], "stop")
    # A stop string spanning two tokens: the text ends right before it.
    stop = text[6:8]
    r = eng.generate([p], SamplingParams(max_tokens=12, stop=(stop,)))[0]
    assert r.finish_reason == "stop" and r.text == text[: text.index(stop)]
    # Cancel mid-decode: the request ends "cancelled" and its pages come back.
    free = eng.executor.allocator.num_free
    stream = eng.submit(p, SamplingParams(max_tokens=30))
    for _ in range(4):
        eng.step()
    stream.cancel()
    eng.run_until_done()
    deltas = list(stream)
    assert deltas[-1].finish_reason == "cancelled"
    assert 0 < len(stream.request.output) < 30
    assert eng.executor.allocator.num_free == free


def test_refusals(model):
    eng = make_engine(model, num_pages=5, max_queue=2)  # 4 pages = 16 tokens at most
    with pytest.raises(ValueError, match="exceeds the engine's max_len=48"):
        eng.submit([1] * 40, SamplingParams(max_tokens=9))
    with pytest.raises(ValueError, match="= 20 needs 5 pages of 4 tokens: more than the whole"):
        eng.submit([1] * 10, SamplingParams(max_tokens=10))  # fits max_len, not the pool
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=512\)"):
        eng.submit([1, 512])
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.submit([])
    with pytest.raises(ValueError, match="top_p must be a number in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.submit([1], SamplingParams(stop=("x",)))
    eng.submit([1], SamplingParams(max_tokens=4))
    eng.submit([2], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFull):
        eng.submit([3], SamplingParams(max_tokens=4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens="3"), "max_tokens must be an integer >= 1, got '3'"),
        (dict(max_tokens=2.5), "max_tokens must be an integer >= 1"),
        (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
        (dict(temperature="0.5"), "temperature must be a finite number >= 0"),
        (dict(top_k=2.5), "top_k must be an integer >= 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(seed="abc"), "seed must be an integer or None"),
        (dict(stop_token_ids=5), "stop_token_ids must be a sequence of token ids"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids must be integer ids >= 0, got \[-1\]"),
        (dict(stop=["ok", ""]), "stop must be a string or a sequence of non-empty strings"),
    ],
)
def test_sampling_params_are_checked_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_a_stop_string_is_one_stop():
    """As in OpenAI's API, ``stop="END"`` is one stop string, not the letters E, N and D."""
    assert SamplingParams(stop="END").stop == ("END",)


def test_submit_checks_sampling_against_the_vocabulary(model):
    """top_k = 2**40 once overflowed int32 inside the engine thread and killed it."""
    eng = make_engine(model)
    vocab = CFG.vocab_size
    with pytest.raises(ValueError, match=f"top_k must be an integer >= 0 .*<= vocab_size={vocab}"):
        eng.submit([1, 2], SamplingParams(temperature=1.0, top_k=2**40))
    with pytest.raises(ValueError, match="stop_token_ids must be integer ids in \\[0, vocab_size"):
        eng.submit([1, 2], SamplingParams(stop_token_ids=[vocab]))
    with pytest.raises(TypeError, match="params must be a SamplingParams, got dict"):
        eng.submit([1, 2], {"max_tokens": 2})
    assert eng.num_waiting == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_submit_after_the_engine_thread_failed_raises(model, monkeypatch):
    """A dead engine thread cancels what it held; a later submit raises instead of queueing a
    request nothing will ever serve (its stream used to block forever)."""
    eng = make_engine(model)

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(eng, "_prefill", boom)
    eng.start()
    first = eng.submit([1, 2], SamplingParams(max_tokens=2))
    assert list(first)[-1].finish_reason == "cancelled"
    eng._thread.join(timeout=30)
    assert isinstance(eng.error, RuntimeError)
    with pytest.raises(EngineStopped, match="the engine thread failed: RuntimeError"):
        eng.submit([3, 4], SamplingParams(max_tokens=2))


@pytest.mark.parametrize(
    "prompts_, params, match",
    [
        ([1, 2, 3], None, r"prompts\[0\]: prompt must be a flat sequence of token ids, got shape"),
        ([[1, 2], [[3, 4]]], None, r"prompts\[1\]: prompt must be a flat sequence"),
        ([[1, 2], [3, 4]], [SamplingParams()], "params must give one entry per prompt: 1 for 2"),
        ([[1, 2], [3, 4]], [SamplingParams(), SamplingParams(top_k=10**6)], r"prompts\[1\]: top_k"),
    ],
)
def test_generate_queues_nothing_from_a_bad_call(model, prompts_, params, match):
    """A flat list is not N one-token prompts; a failure part-way leaves no request behind
    to run in the next call."""
    eng = make_engine(model)
    with pytest.raises(ValueError, match=match):
        eng.generate(prompts_, params)
    assert eng.num_waiting == 0 and eng.num_running == 0 and not eng.streams
    (ok,) = eng.generate([[5, 6]], SamplingParams(max_tokens=2))
    assert ok.finish_reason == "length" and ok.prompt == [5, 6]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch=0), "max_batch must be an integer >= 1, got 0"),
        (dict(page_size=2.5), "page_size must be an integer >= 1, got 2.5"),
        (dict(prefill_chunk=True), "prefill_chunk must be an integer >= 1, got True"),
        (dict(max_len=10**6), "max_len=1000000 exceeds max_position_embeddings"),
    ],
)
def test_executor_sizes_are_checked_before_allocating(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelExecutor(model, **{"max_batch": 2, "max_len": 16, **kwargs})


def test_streams_sync_and_async(model):
    eng = make_engine(model, tokenizer=CharTokenizer())
    p = prompts(2, seed=5)
    eng.start()
    try:
        s = eng.submit(p[0], SamplingParams(max_tokens=7))
        deltas = list(s)
        assert [t for d in deltas for t in d.token_ids] == alone(model, p[0], 7)
        assert "".join(d.text for d in deltas) == s.request.text and deltas[-1].finish_reason

        async def consume():
            loop = asyncio.get_running_loop()
            streams = [eng.submit(q, SamplingParams(max_tokens=6), loop=loop) for q in p]

            async def drain(st):
                return [t async for d in st for t in d.token_ids]

            return await asyncio.gather(*(drain(st) for st in streams))

        got = asyncio.run(consume())
        assert got == [alone(model, q, 6) for q in p]
    finally:
        eng.shutdown()
    assert eng.error is None


def test_sample_rows_matches_scalar_sampler():
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.standard_normal((4, 64)) * 3, jax.numpy.float32)
    top_k, top_p = np.array([0, 5, 0, 3]), np.array([1.0, 1.0, 0.7, 0.5], np.float32)
    got = np.asarray(filter_rows(logits, top_k, top_p))
    for b in range(4):
        want = np.asarray(filter_logits(logits[b : b + 1], int(top_k[b]), float(top_p[b])))
        np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(want[0]))
    temp = np.array([0.0, 1.0, 0.5, 1.0], np.float32)
    toks = np.asarray(sample_rows(logits, temp, top_k, top_p, np.arange(4), np.zeros(4, int)))
    assert toks[0] == np.argmax(logits[0])
    assert all(np.isfinite(got[b, toks[b]]) for b in range(4))  # drawn from the kept set
