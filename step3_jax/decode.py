"""Prefill + on-device decode loop, and a jitted single decode step for research loops.

`generate` pads a batch of prompts of different lengths to one bucketed length, prefills them
in one call, then runs ALL decode steps inside one jitted `lax.while_loop` (no Python round trip
per token). Every shape that reaches a compiled program is bucketed (powers of two): the
batch (1, 2, 4, ... `MAX_BATCH`, padding rows are masked out), the prompt length (>= 8), the
cache length, the step count (>= 16) and the number of stop tokens (>= 4, padded with -1).
Sampling settings are traced ``[B]`` arrays (`step3_jax.sampling.SamplingParams`), so
requests with different temperature / top-k / top-p, even mixed in one batch, share one
compilation per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from step3_jax.cache import KVCache
from step3_jax.config import is_int
from step3_jax.model import check_cache
from step3_jax.sampling import (
    SamplingParams,
    check_max_tokens,
    check_seed,
    check_token_ids,
    sample,
    sampling_params,
)

PAD_OUTPUT = -1  # written after a sequence has stopped
MAX_BATCH = 4096  # prompts per generate call; larger workloads are split by the caller
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_clock = {"seconds": 0.0}  # process-wide: tracing + lowering + XLA compile time


def _on_compile_event(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_clock["seconds"] += duration


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _forward_cached(graphdef, state, tokens, positions, cache):
    model = nnx.merge(graphdef, state)
    return model(tokens, cache=cache, positions=positions)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, prompt_lengths, cache, key, sampling: SamplingParams):
    """Prompt forward + the first sampled token: ``(first [B] int32, cache)``."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = model(tokens, cache=cache, positions=positions)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    # Padding tokens wrote K/V past each prompt; lengths says they are not there, and the first
    # decode step overwrites slot prompt_length before anything reads it.
    return sample(last, key, sampling), cache.replace(lengths=prompt_lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps"), donate_argnames=("cache",))
def _decode_loop(
    graphdef, state, cache, first, active, key, num_steps, stop_tokens, sampling, max_steps
):
    """``active [B]`` is False for the rows that only pad the batch to its bucket."""
    model = nnx.merge(graphdef, state)
    batch = first.shape[0]
    out = jnp.full((batch, max_steps), PAD_OUTPUT, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_tokens) | ~active

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < num_steps) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, done, out, key = carry
        logits, cache = model(tok[:, None], cache=cache)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, PAD_OUTPUT, sample(logits[:, 0], sub, sampling))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        done = done | jnp.isin(nxt, stop_tokens)
        return step + 1, jnp.maximum(nxt, 0), cache, done, out, key

    init = (jnp.int32(1), first, cache, done, out, key)
    steps, _, cache, _, out, _ = jax.lax.while_loop(cond, body, init)
    return out, steps, cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    finish_reasons: list[str]  # "stop" or "length"
    prefill_seconds: float  # prompt forward + first token, compilation excluded
    decode_seconds: float  # the decode loop, compilation excluded
    decode_steps: int  # decode-loop iterations run (excluding the prefill's token)
    compile_seconds: float = 0.0  # tracing + compiling during this call (0 once warm)

    @property
    def decode_tokens_per_second(self) -> float:
        """Batch tokens produced per second by the decode loop (prefill excluded)."""
        return len(self.tokens) * self.decode_steps / max(self.decode_seconds, 1e-9)


def check_prompt(prompt, vocab_size: int, name: str = "prompt", hint: str = "") -> np.ndarray:
    """One prompt as a 1-D array: a flat, non-empty sequence of integer token ids in
    ``[0, vocab_size)``. Errors name it (``name``) and end with ``hint`` (how to nest)."""
    if isinstance(prompt, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of token ids, got text: encode it first")
    try:
        row = np.asarray(prompt)
    except ValueError as e:  # ragged nesting
        raise ValueError(f"{name} must be a flat sequence of token ids ({e})") from None
    if row.ndim != 1:
        raise ValueError(
            f"{name} must be a flat sequence of token ids, got shape {row.shape} {hint}".rstrip()
        )
    if row.size == 0:
        raise ValueError(f"{name} is empty; it needs at least one token")
    # Float ids would be silently truncated by the int cast: reject them.
    if not np.issubdtype(row.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {row.dtype}")
    lo, hi = row.min(), row.max()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} token ids must lie in [0, vocab_size={vocab_size}), got [{lo}, {hi}]"
        )
    return row


def _prepare_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [B_bucket, T_bucket] int32, lengths [B] int32)``; padding rows are 1 token.
    Every other nesting than a batch of flat prompts is refused, never flattened."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if np.ndim(prompts) != 2:
            raise ValueError(f"prompts as an array must be [B, T], got shape {np.shape(prompts)}")
        prompts = list(np.asarray(prompts))  # rows keep the array's dtype for the checks
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty sequence of token-id sequences")
    if len(prompts) > MAX_BATCH:
        raise ValueError(f"{len(prompts)} prompts exceed MAX_BATCH={MAX_BATCH}: split the batch")
    hint = "(one prompt is [[1, 2, 3]], not [1, 2, 3] nor [[[1, 2, 3]]])"
    rows = [check_prompt(p, vocab_size, f"prompts[{i}]", hint) for i, p in enumerate(prompts)]
    lengths = np.array([r.size for r in rows], np.int32)
    padded = np.zeros((_bucket(len(rows), 1), _bucket(lengths.max(), 8)), np.int32)
    for i, r in enumerate(rows):
        padded[i, : r.size] = r
    return padded, lengths


def _check_args(cfg, max_new_tokens, stop_tokens, seed, max_cache_len) -> list[int]:
    check_max_tokens(max_new_tokens)
    check_seed(seed)
    if max_cache_len is not None and (not is_int(max_cache_len) or max_cache_len < 1):
        raise ValueError(f"max_cache_len must be an integer >= 1, got {max_cache_len!r}")
    return check_token_ids(stop_tokens, "stop_tokens", cfg.vocab_size)


def _cache_len(tokens, lengths, max_new_tokens, max_cache_len, limit) -> tuple[int, np.ndarray]:
    needed = int(lengths.max()) + int(max_new_tokens)
    # From buckets only (padded prompt + step bucket), so a bucket maps to one cache shape.
    # Power-of-two buckets may overshoot a context limit that is not a power of two (e.g.
    # 40960): clamp, and drop padding columns past the cache (they hold no prompt token).
    steps = _bucket(max_new_tokens, 16)
    cache_len = max_cache_len or min(_bucket(tokens.shape[1] + steps, 64), limit)
    if tokens.shape[1] > cache_len >= lengths.max():
        tokens = tokens[:, :cache_len]
    if needed > cache_len:
        raise ValueError(
            f"longest prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"tokens do not fit the cache: {cache_len} slots (max_cache_len={max_cache_len}, "
            f"max_position_embeddings={limit})"
        )
    if cache_len > limit:
        raise ValueError(f"max_cache_len={cache_len} exceeds max_position_embeddings={limit}")
    return cache_len, tokens


def generate(
    model,
    prompts: Sequence[Sequence[int]] | Int[Array, "B T"],
    max_new_tokens: int,
    *,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    max_cache_len: int | None = None,
    cache_dtype=None,
    v_transposed: bool = False,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` for each prompt (a batch of different lengths).

    ``cache_dtype`` (default the model's): the KV cache's, e.g. ``jnp.float8_e4m3fn``;
    ``v_transposed`` (FP8 cache only): V stored for the decode kernel's FP8 P.V
    (`step3_jax.cache.KVCache`).

    ``temperature`` (finite, >= 0; 0: greedy), ``top_k`` (integer in [0, vocab_size]; 0: off)
    and ``top_p`` (in (0, 1]) are one value for all prompts or one per prompt. Every argument
    is validated before anything is compiled or allocated. The cache holds ``max_cache_len``
    tokens (default: from the prompt and step buckets); a request that cannot fit raises
    ValueError instead of truncating. ``compile_seconds`` in the result is the time this
    call spent tracing and compiling (excluded from the prefill / decode times).
    """
    cfg = model.config
    stops = _check_args(cfg, max_new_tokens, stop_tokens, seed, max_cache_len)
    tokens, lengths = _prepare_prompts(prompts, cfg.vocab_size)
    plan = _plan(cfg, tokens, lengths, max_new_tokens, (temperature, top_k, top_p), stops,
                 max_cache_len, cache_dtype or model.dtype, v_transposed)  # fmt: skip
    graphdef, state = nnx.split(model)
    clock = (_compile_clock["seconds"], time.perf_counter())
    first, cache = _prefill(
        graphdef, state, plan.tokens, plan.lengths, plan.cache, jax.random.key(seed), plan.params
    )
    return _decode_and_collect(graphdef, state, plan, cache, first, seed, max_new_tokens, clock)


@dataclasses.dataclass
class _Plan:
    """A validated request, padded to its buckets (shared with `step3_jax.vision.generate`)."""

    tokens: np.ndarray  # [B_bucket, T_bucket] int32
    lengths: np.ndarray  # [B_bucket] int32; padding rows hold 1 token
    batch: int  # real prompts (rows past it only pad the bucket)
    params: SamplingParams  # [B_bucket] each
    stops: list[int]
    stop_arr: np.ndarray  # [stop bucket] int32, padded with PAD_OUTPUT
    cache: KVCache


def _plan(
    cfg, tokens, lengths, max_new_tokens, sampling, stops, max_cache_len, dtype, v_transposed
) -> _Plan:
    """Sampling arrays, cache and stop array for prompts from `_prepare_prompts`."""
    batch, padded_batch = len(lengths), tokens.shape[0]
    params = sampling_params(*sampling, batch, cfg.vocab_size)
    params = SamplingParams(*(np.resize(np.asarray(a), padded_batch) for a in params))
    cache_len, tokens = _cache_len(
        tokens, lengths, max_new_tokens, max_cache_len, cfg.max_position_embeddings
    )
    cache = KVCache.for_config(cfg, padded_batch, cache_len, dtype, v_transposed)
    all_lengths = np.ones(padded_batch, np.int32)
    all_lengths[:batch] = lengths
    stop_arr = np.full(_bucket(len(stops), 4), PAD_OUTPUT, np.int32)
    stop_arr[: len(stops)] = stops
    return _Plan(tokens, all_lengths, batch, params, stops, stop_arr, cache)


def _decode_and_collect(graphdef, state, plan, cache, first, seed, max_new_tokens, clock):
    """Runs the decode loop after a prefill started at ``clock = (compile s, wall s)``."""
    c0, t0 = clock
    first.block_until_ready()
    c1, t1 = _compile_clock["seconds"], time.perf_counter()
    active = np.arange(len(plan.lengths)) < plan.batch
    out, steps, cache = _decode_loop(
        graphdef, state, cache, first, active, jax.random.key(seed + 1),
        np.int32(max_new_tokens), plan.stop_arr, plan.params, _bucket(max_new_tokens, 16),
    )  # fmt: skip
    out = np.asarray(out)[: plan.batch]
    c2, t2 = _compile_clock["seconds"], time.perf_counter()
    times = (t1 - t0 - (c1 - c0), t2 - t1 - (c2 - c1), c2 - c0)
    return _collect(out, int(steps), max_new_tokens, set(plan.stops), *times)


def _collect(out, steps, max_new, stops, prefill_s, decode_s, compile_s) -> GenerationResult:
    seqs, reasons = [], []
    for row in out[:, :max_new]:
        row = [int(t) for t in row if t != PAD_OUTPUT]
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        reasons.append("length" if cut is None else "stop")
        seqs.append(row if cut is None else row[:cut])
    return GenerationResult(
        seqs, reasons, max(prefill_s, 0.0), max(decode_s, 0.0), max(steps - 1, 0), compile_s
    )


def decode_step(
    model,
    tokens: Int[Array, " B"],
    cache: KVCache,
    *,
    check_bounds: bool = True,
) -> tuple[Float[Array, "B V"], KVCache]:
    """One jitted decode step: appends ``tokens [B]`` at each sequence's length.

    Returns float32 logits ``[B, V]`` and the updated cache (the input cache is donated: do
    not reuse it). ``check_bounds`` reads ``cache.lengths`` back to the host (one small sync)
    to raise a clear error when a sequence is full instead of silently dropping the write.
    For the tightest research loops use `make_decode_step`, which splits the model once.
    """
    return make_decode_step(model, check_bounds=check_bounds)(tokens, cache)


def _check_cache(cache, config, batch: int) -> None:
    """The decode step takes a `KVCache` only, shaped for the model (`model.check_cache`)."""
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
    check_cache(cache, config, batch)


def make_decode_step(model, *, check_bounds: bool = True):
    """Returns ``step(tokens [B], cache) -> (logits [B, V], cache)`` with the model pre-split."""
    if not isinstance(check_bounds, bool):
        raise ValueError(f"check_bounds must be a bool, got {check_bounds!r}")
    graphdef, state = nnx.split(model)
    config = model.config

    def step(tokens, cache: KVCache):
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        if tokens.ndim != 2 or tokens.shape[1] != 1:
            raise ValueError(f"tokens must have shape [B] or [B, 1], got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
        _check_cache(cache, config, tokens.shape[0])
        if check_bounds:
            # One host read for all checks: a scatter past max_len or a gather past vocab_size
            # would otherwise silently drop the write / give NaN logits.
            longest, lo, hi = map(
                int, jax.device_get((jnp.max(cache.lengths), jnp.min(tokens), jnp.max(tokens)))
            )
            vocab = config.vocab_size
            if lo < 0 or hi >= vocab:
                raise ValueError(
                    f"tokens must lie in [0, vocab_size={vocab}), got values in [{lo}, {hi}]"
                )
            if longest + 1 > cache.max_len:
                raise ValueError(
                    f"cache is full: a sequence has length {longest} and max_len={cache.max_len}"
                )
        positions = cache.lengths[:, None]
        logits, cache = _forward_cached(graphdef, state, tokens, positions, cache)
        return logits[:, 0], cache

    return step
