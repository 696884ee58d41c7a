"""Shared fixtures of the engine tests: the tiny float32 model (seeded random weights), a
character tokenizer, and a process-wide compile counter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import reference_numpy as ref
from flax import nnx

import step3_jax as s3
from step3_jax.policy import KernelPolicy

CFG = s3.Step3Config.tiny()


def build_model(seed: int = 7, dtype=jnp.float32) -> s3.Step3Model:
    abstract = nnx.eval_shape(
        lambda: s3.Step3Model(
            CFG, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, policy=KernelPolicy.reference()
        )
    )
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), ref.random_params(state, seed))
    return nnx.merge(graphdef, params)


class CharTokenizer:
    """Token i is the letter ``chr(97 + i % 26)``: stop strings become testable."""

    eos_id = None

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)


_COMPILES = [0]


def _listener(event: str, *args, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def compiles() -> int:
    """XLA compilations in this process so far (every jit, eager op or executor program)."""
    return _COMPILES[0]
