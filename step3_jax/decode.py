"""Prefill + on-device decode loop, and a jitted single decode step for research loops.

`generate` pads a batch of prompts of different lengths to one bucketed length, prefills them
in one call, then runs ALL decode steps inside one jitted `lax.while_loop` (no Python round trip
per token). Shapes are bucketed (powers of two) so repeated calls reuse one compilation.
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
from step3_jax.sampling import SamplingConfig, sample

PAD_OUTPUT = -1  # written after a sequence has stopped


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _forward_cached(graphdef, state, tokens, positions, cache):
    model = nnx.merge(graphdef, state)
    return model(tokens, cache=cache, positions=positions)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, prompt_lengths, cache):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = model(tokens, cache=cache, positions=positions)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    # Padding tokens wrote K/V past each prompt; lengths says they are not there, and the first
    # decode step overwrites slot prompt_length before anything reads it.
    return last, cache.replace(lengths=prompt_lengths)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampling", "max_steps"), donate_argnames=("cache",)
)
def _decode_loop(graphdef, state, cache, first, key, num_steps, stop_tokens, sampling, max_steps):
    model = nnx.merge(graphdef, state)
    batch = first.shape[0]
    out = jnp.full((batch, max_steps), PAD_OUTPUT, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_tokens)

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
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # decode-loop iterations run (excluding the prefill's token)

    @property
    def decode_tokens_per_second(self) -> float:
        """Batch tokens produced per second by the decode loop (prefill excluded)."""
        return len(self.tokens) * self.decode_steps / max(self.decode_seconds, 1e-9)


def _prepare_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        prompts = list(np.asarray(prompts))  # rows keep the array's dtype for the check below
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty sequence of token-id sequences")
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        # Float ids would be silently truncated by the int cast: reject them.
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must hold integer token ids, got dtype {r.dtype}")
        if r.min() < 0 or r.max() >= vocab_size:
            raise ValueError(
                f"prompts[{i}] has token ids outside [0, vocab_size={vocab_size}): "
                f"min {r.min()}, max {r.max()}"
            )
    rows = [r.astype(np.int64) for r in rows]
    lengths = np.array([r.size for r in rows], np.int32)
    padded = np.zeros((len(rows), _bucket(lengths.max(), 8)), np.int32)
    for i, r in enumerate(rows):
        padded[i, : r.size] = r
    return padded, lengths


def generate(
    model,
    prompts: Sequence[Sequence[int]] | Int[Array, "B T"],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    max_cache_len: int | None = None,
    cache_dtype=None,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` for each prompt (a batch of different lengths).

    The cache holds ``max_cache_len`` tokens (default: the bucketed prompt + new-token
    length); a request that cannot fit raises ValueError instead of truncating.
    """
    cfg = model.config
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = SamplingConfig(temperature, top_k, top_p)
    tokens, lengths = _prepare_prompts(prompts, cfg.vocab_size)
    needed = int(lengths.max()) + int(max_new_tokens)
    limit = cfg.max_position_embeddings
    # Power-of-two buckets may overshoot a context limit that is not a power of two (e.g.
    # 40960): clamp, and drop padding columns past the cache (they hold no prompt token).
    cache_len = max_cache_len or min(max(_bucket(needed, 64), tokens.shape[1]), limit)
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
    dtype = cache_dtype or model.dtype
    cache = KVCache.for_config(cfg, tokens.shape[0], cache_len, dtype)
    stops = jnp.asarray(list(stop_tokens) or [PAD_OUTPUT], jnp.int32)
    graphdef, state = nnx.split(model)

    t0 = time.perf_counter()
    logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    first = sample(logits, jax.random.key(seed), sampling)
    first.block_until_ready()
    t1 = time.perf_counter()
    out, steps, cache = _decode_loop(
        graphdef,
        state,
        cache,
        first,
        jax.random.key(seed + 1),
        jnp.int32(max_new_tokens),
        stops,
        sampling,
        _bucket(max_new_tokens, 16),
    )
    out = np.asarray(out)
    t2 = time.perf_counter()
    return _collect(out, int(steps), max_new_tokens, set(stop_tokens), t1 - t0, t2 - t1)


def _collect(out, steps, max_new, stops, prefill_s, decode_s) -> GenerationResult:
    seqs, reasons = [], []
    for row in out[:, :max_new]:
        row = [int(t) for t in row if t != PAD_OUTPUT]
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        reasons.append("length" if cut is None else "stop")
        seqs.append(row if cut is None else row[:cut])
    return GenerationResult(seqs, reasons, prefill_s, decode_s, max(steps - 1, 0))


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


def make_decode_step(model, *, check_bounds: bool = True):
    """Returns ``step(tokens [B], cache) -> (logits [B, V], cache)`` with the model pre-split."""
    graphdef, state = nnx.split(model)
    config = model.config

    def step(tokens, cache: KVCache):
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        if tokens.ndim != 2 or tokens.shape[1] != 1:
            raise ValueError(f"tokens must have shape [B] or [B, 1], got {tokens.shape}")
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
