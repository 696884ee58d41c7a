"""Data-parallel forward / decode on 8 fake CPU devices (conftest sets the device count).

The batch is sharded over a 1-D "data" mesh and the parameters are replicated, so each device
runs the same float32 program on its own rows. Per-row arithmetic is the same as on one device
up to XLA's choice of summation order; both are within the reference tolerance of the exact
result (test_reference_model.py: u * sqrt(256) * 29 ~ 2.8e-5 normwise), hence 2x that here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import step3_jax as s3

pytestmark = pytest.mark.multi_device

CFG = s3.Step3Config.tiny()
N_DEV = 8
TOL = 2 * 2.0**-24 * np.sqrt(256) * (7 * CFG.num_layers + 1)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices, have {jax.device_count()}")
    return Mesh(np.asarray(jax.devices()[:N_DEV]), ("data",))


@pytest.fixture(scope="module")
def model() -> s3.Step3Model:
    abstract = nnx.eval_shape(
        lambda: s3.Step3Model(
            CFG,
            rngs=nnx.Rngs(0),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            policy=s3.KernelPolicy.reference(),
        )
    )
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, ref.random_params(state, 3)))


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


def test_sharded_forward_equals_single_device(mesh, model):
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (N_DEV, 6)).astype(np.int32)
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    state_sharding = jax.tree.map(lambda _: replicated, state)

    forward = jax.jit(
        lambda st, tok: nnx.merge(graphdef, st)(tok),
        in_shardings=(state_sharding, rows),
        out_shardings=rows,
    )
    logits = forward(jax.device_put(state, state_sharding), jax.device_put(tokens, rows))
    assert logits.sharding.is_equivalent_to(rows, logits.ndim)
    shard_shapes = {s.data.shape for s in logits.addressable_shards}
    assert shard_shapes == {(1, 6, CFG.vocab_size)}  # one row per device

    single = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok))(
        jax.device_put(state, jax.devices()[0]), jax.device_put(tokens, jax.devices()[0])
    )
    assert _rel(logits, single) < TOL


def test_sharded_decode_steps_equal_single_device(mesh, model):
    """make_decode_step with the cache and tokens sharded over "data" (params replicated)."""
    rows = NamedSharding(mesh, P("data"))
    cache_rows = NamedSharding(mesh, P(None, "data"))  # k, v: [L, B, S, H]

    def run(shard: bool):
        m = model
        cache = s3.KVCache.for_config(CFG, N_DEV, 8, dtype=jnp.float32)
        tokens = jnp.arange(N_DEV, dtype=jnp.int32) * 37 % CFG.vocab_size
        if shard:
            graphdef, state = nnx.split(model)
            m = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
            cache = cache.replace(
                k=jax.device_put(cache.k, cache_rows),
                v=jax.device_put(cache.v, cache_rows),
                lengths=jax.device_put(cache.lengths, rows),
            )
            tokens = jax.device_put(tokens, rows)
        step, out = s3.make_decode_step(m), []
        for _ in range(3):
            logits, cache = step(tokens, cache)
            tokens = jnp.argmax(logits, -1).astype(jnp.int32)
            out.append(np.asarray(logits))
        return np.stack(out), cache

    sharded, cache = run(True)
    assert cache.k.sharding.is_equivalent_to(cache_rows, cache.k.ndim)
    single, _ = run(False)
    assert _rel(sharded, single) < TOL
