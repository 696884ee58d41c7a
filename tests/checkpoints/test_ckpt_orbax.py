"""Orbax save/restore: exact across meshes, optimizer state, never overwrites, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from step3_jax import Step3Config, Step3Model
from step3_jax.checkpoints import (
    CheckpointFormatError,
    CheckpointManager,
    abstract_like,
    restore_orbax,
)
from step3_jax.checkpoints.orbax_io import path_name

CFG = Step3Config.tiny()


def _model(seed=0):
    return Step3Model(CFG, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)


def _params(model):
    return {
        path_name(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }


def _sharder(mesh, expert_axis, vocab_axis):
    """path -> NamedSharding: experts split over ``expert_axis``, embeddings over vocab."""

    def sharding(path: str):
        if (
            path.endswith(("ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"))
            and ".shared" not in path
        ):
            layer = int(path.split(".")[1])
            if CFG.is_moe_layer(layer):
                return NamedSharding(mesh, PartitionSpec(expert_axis, None, None))
        if path in ("embed_tokens", "lm_head"):
            return NamedSharding(mesh, PartitionSpec(vocab_axis, None))
        return NamedSharding(mesh, PartitionSpec())

    return sharding


@pytest.mark.multi_device
def test_save_on_one_mesh_restore_on_another_is_exact(tmp_path):
    devs = np.array(jax.devices()[:8])
    mesh_a = Mesh(devs.reshape(2, 4), ("data", "expert"))
    mesh_b = Mesh(devs[::-1].reshape(4, 2), ("x", "y"))
    model = _model(1)
    # Place the saved model sharded on mesh A.
    state = nnx.state(model, nnx.Param)
    shard_a = _sharder(mesh_a, "expert", "data")
    placed = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, shard_a(path_name(p))),
        state,
    )
    nnx.update(model, placed)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(7, model)
        abstract = nnx.eval_shape(lambda: _model(0))
        restored = mgr.restore_model(abstract, 7, sharding=_sharder(mesh_b, "x", "y"))
    want, got = _params(model), _params(restored)
    assert want.keys() == got.keys()
    assert "layers.1.ffn.up_proj" in want
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    saved_up = nnx.state(model, nnx.Param)["layers"][1]["ffn"]["up_proj"][...]
    assert saved_up.sharding == NamedSharding(mesh_a, PartitionSpec("expert", None, None))
    up = nnx.state(restored, nnx.Param)["layers"][1]["ffn"]["up_proj"][...]
    assert up.sharding == NamedSharding(mesh_b, PartitionSpec("x", None, None))
    tokens = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(model(tokens)))


def test_optimizer_state_round_trip_and_latest_step(tmp_path):
    model = _model(2)
    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    _, opt_state = tx.update(grads, opt_state, params)
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, model, opt_state)
        assert mgr.all_steps() == [2, 3]  # max_to_keep
        p2, o2 = mgr.restore(None, abstract_like(params), abstract_like(opt_state))
    for a, b in zip(jax.tree.leaves(o2), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_existing_step_is_never_overwritten(tmp_path):
    a, b = _model(3), _model(4)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, a)
        with pytest.raises(FileExistsError, match="step 5"):
            mgr.save(5, b)
    restored = restore_orbax(tmp_path, nnx.eval_shape(lambda: _model(0)), 5)
    for k, v in _params(a).items():
        np.testing.assert_array_equal(_params(restored)[k], v)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    abstract = nnx.eval_shape(lambda: _model(0))
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint directory"):
        restore_orbax(tmp_path / "nope", abstract)
    with CheckpointManager(tmp_path / "empty") as mgr:
        with pytest.raises(FileNotFoundError, match="complete steps: \\[\\]"):
            mgr.restore_model(abstract, 3)


def test_interrupted_save_is_invisible(tmp_path):
    model = _model(5)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model)
    # What an interrupted save leaves behind: orbax's temporary step folder.
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp-123" / "partial").write_bytes(b"\0" * 64)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1]
        assert mgr.latest_step() == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = _model(6)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model)
    # Truncate every data file of the step: restore must fail loudly, not return garbage.
    files = [p for p in (tmp_path / "1").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])
    with pytest.raises((CheckpointFormatError, FileNotFoundError)):
        restore_orbax(tmp_path, nnx.eval_shape(lambda: _model(0)), 1)
