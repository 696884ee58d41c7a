"""Token sampling: greedy, temperature, top-k and top-p (nucleus), all on device.

Sampling parameters are traced values, one per request (`SamplingParams`: ``[B]`` arrays),
so one compiled decode loop serves every temperature / top-k / top-p and a batch may mix
greedy and sampled rows. `SamplingConfig` is the validated scalar form (one setting for
a whole batch); `sampling_params` validates per-request values and builds the arrays.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from step3_jax.config import is_int


def check_temperature(t, name: str = "temperature") -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0: greedy), got {t!r}")
    return float(t)


def check_top_p(p, name: str = "top_p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {p!r}")
    return float(p)


def check_top_k(k, vocab_size: int | None, name: str = "top_k") -> int:
    hi = "" if vocab_size is None else f", <= vocab_size={vocab_size}"
    if not is_int(k) or k < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: no top-k){hi}, got {k!r}")
    if vocab_size is not None and k > vocab_size:
        raise ValueError(f"{name} must be an integer >= 0 (0: no top-k){hi}, got {k!r}")
    return int(k)


def check_token_ids(ids, name: str, vocab_size: int | None = None) -> list[int]:
    """A sequence of integer token ids (in [0, vocab_size) when it is given), as ints."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray, set, frozenset)):
        raise ValueError(f"{name} must be a sequence of token ids, got {ids!r}")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of token ids, got shape {ids.shape}")
    ids = list(ids)
    want = ">= 0" if vocab_size is None else f"in [0, vocab_size={vocab_size})"
    bad = [t for t in ids if not is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"{name} must be integer ids {want}, got {bad[:5]}")
    return [int(t) for t in ids]


def check_max_tokens(n, name: str = "max_new_tokens") -> int:
    """How many tokens to generate: an integer >= 1."""
    if not is_int(n) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    return int(n)


SEED_RANGE = (-(2**63), 2**63 - 2)  # int64, with room for the decode loop's seed + 1


def check_seed(seed, name: str = "seed") -> int:
    lo, hi = SEED_RANGE
    if not is_int(seed) or not lo <= seed <= hi:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**63 - 2], got {seed!r}")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / T)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set with cumulative probability >= top_p

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_k(self.top_k, None)
        check_top_p(self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def params(self, batch: int) -> SamplingParams:
        """The same setting for each of ``batch`` rows."""
        return SamplingParams(
            np.full((batch,), self.temperature, np.float32),
            np.full((batch,), self.top_k, np.int32),
            np.full((batch,), self.top_p, np.float32),
        )


class SamplingParams(NamedTuple):
    """Per-request sampling settings (a pytree of ``[B]`` arrays, traced under jit)."""

    temperature: Float[Array, " B"]  # float32, 0: greedy row
    top_k: Int[Array, " B"]  # int32, 0: no top-k
    top_p: Float[Array, " B"]  # float32 in (0, 1]


def _per_request(value, batch: int, name: str, check) -> list:
    if isinstance(value, (np.ndarray, jax.Array, np.generic)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, (Sequence, np.ndarray, jax.Array)) and not isinstance(value, str):
        if np.ndim(value) != 1 or len(value) != batch:
            raise ValueError(
                f"{name} must be one number or one per prompt ({batch}), got shape "
                f"{np.shape(value)}"
            )
        values = np.asarray(value).tolist() if not isinstance(value, Sequence) else value
        return [check(v, f"{name}[{i}]") for i, v in enumerate(values)]
    return [check(value, name)] * batch


def sampling_params(
    temperature, top_k, top_p, batch: int, vocab_size: int | None = None
) -> SamplingParams:
    """Validated `SamplingParams` from scalars or per-request sequences of length ``batch``.

    Raises ValueError naming the argument (and request index): temperature must be finite
    and >= 0, top_k an integer in [0, vocab_size], top_p in (0, 1].
    """
    temps = _per_request(temperature, batch, "temperature", check_temperature)
    ks = _per_request(top_k, batch, "top_k", lambda k, n: check_top_k(k, vocab_size, n))
    ps = _per_request(top_p, batch, "top_p", check_top_p)
    return SamplingParams(
        np.asarray(temps, np.float32), np.asarray(ks, np.int32), np.asarray(ps, np.float32)
    )


def filter_logits(logits: Float[Array, "B V"], top_k, top_p) -> Float[Array, "B V"]:
    """Sets logits outside the top-k / nucleus sets to -inf (ties at the threshold are kept).

    ``top_k`` (int, 0: off) and ``top_p`` (float, 1: off) are scalars or ``[B]`` arrays,
    possibly traced: one descending sort serves both filters.
    """
    b, v = logits.shape
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
    kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)  # the top-k set, still sorted
    probs = jax.nn.softmax(desc, axis=-1)
    # Mass strictly before each sorted token; keep tokens whose preceding mass < top_p,
    # which always keeps the most likely token. top_p == 1 keeps everything even where
    # the float32 cumsum reaches 1.0 before the last token.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    nucleus = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < jnp.maximum(kth, nucleus), -jnp.inf, logits)


def sample(
    logits: Float[Array, "B V"], key: jax.Array, params: SamplingParams | SamplingConfig
) -> Int[Array, " B"]:
    """One token per row: argmax where temperature is 0, else a draw from the filtered
    softmax(logits / temperature). The sort for top-k / top-p runs only when some row of
    the batch asks for a filter, and the draw only when some row samples (`lax.cond`s)."""
    if isinstance(params, SamplingConfig):
        params = params.params(logits.shape[0])
    logits = logits.astype(jnp.float32)
    temp = jnp.asarray(params.temperature, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.where(temp > 0, temp, 1.0)[:, None]
        top_k, top_p = jnp.asarray(params.top_k), jnp.asarray(params.top_p)
        scaled = jax.lax.cond(
            jnp.any((top_k > 0) | (top_p < 1.0)),
            lambda x: filter_logits(x, top_k, top_p),
            lambda x: x,
            scaled,
        )
        drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
        return jnp.where(temp > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temp > 0), draw, lambda _: greedy, logits)


__all__ = ["SamplingConfig", "SamplingParams", "filter_logits", "sample", "sampling_params"]
