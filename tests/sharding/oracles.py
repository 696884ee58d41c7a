"""Test-only oracles for the executors: single-device decode with the A->F transfer's
quantization applied, and a greedy loop over any executor's ``step``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step3_jax.cache import KVCache
from step3_jax.sharding.protocol import fake_transfer

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def reference_forward(model, tokens, positions, cache: KVCache, fp8_transfer: bool):
    """`Step3Model.__call__` with the FFN input passed through the A->F transfer's
    quantization (identity when ``fp8_transfer`` is False). Returns ``(logits, cache)``."""
    x = model.embed(tokens)
    for layer in model.layers:
        x_mid, h2, routing, cache = layer.attention_half(x, positions, cache, policy=model.policy)
        h2 = fake_transfer(h2, fp8_transfer)
        x = x_mid + layer.ffn_half(h2, routing, model.policy).astype(x.dtype)
    return model.logits(x), cache.replace(lengths=positions[:, -1] + 1)


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to a power-of-two length (>= 8): tokens, lengths."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    width = max(8, 1 << int(lengths.max() - 1).bit_length())
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out, lengths


def greedy_generate(step: StepFn, prompts: Sequence[Sequence[int]], max_new: int) -> np.ndarray:
    """Greedy tokens ``[B, max_new]`` from ``step(tokens [B,T], positions [B,T], select [B])
    -> logits [B, V]`` (select: the token whose logits are returned). One prefill call over
    the padded prompts, then one call per new token."""
    tokens, lengths = pad_prompts(prompts)
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    logits = step(tokens, positions, lengths - 1)
    out = [np.asarray(jnp.argmax(logits, -1), np.int32)]
    for i in range(max_new - 1):
        pos = (lengths + i)[:, None].astype(np.int32)
        logits = step(out[-1][:, None], pos, np.zeros((b,), np.int32))
        out.append(np.asarray(jnp.argmax(logits, -1), np.int32))
    return np.stack(out, axis=1)


def reference_step_fn(model, batch: int, max_len: int, fp8_transfer: bool) -> StepFn:
    """Single-device oracle with the executors' ``step`` signature (cache held inside)."""
    graphdef, state = nnx.split(model)
    holder = [KVCache.for_config(model.config, batch, max_len, model.dtype)]

    @jax.jit
    def run(state, tokens, positions, select, cache):
        m = nnx.merge(graphdef, state)
        logits, cache = reference_forward(m, tokens, positions, cache, fp8_transfer)
        return jnp.take_along_axis(logits, select[:, None, None], 1)[:, 0], cache

    def step(tokens, positions, select):
        args = (jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(select))
        logits, holder[0] = run(state, *args, holder[0])
        return logits

    return step
