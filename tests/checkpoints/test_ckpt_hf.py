"""HF safetensors <-> Step3Model: round trips, block-FP8, errors, memory, sharding."""

from __future__ import annotations

import json
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ckpt_fixtures import (
    FP8,
    dequantize_reference,
    random_tensors,
    read_all,
    small_config,
    write_hf,
)
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from step3_jax.checkpoints import (
    CheckpointFormatError,
    CheckpointMismatchError,
    dequantize_blocks,
    hf_mapping,
    load_hf,
    save_hf,
)
from step3_jax.policy import KernelPolicy
from step3_jax.quant_model import Fp8Weight

CFG = small_config()


def _leaf(model, path):
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[path].get_value()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_hf_model_hf_round_trip_is_bitwise(tmp_path, dtype):
    src = random_tensors(CFG, seed=1, dtype=dtype)
    write_hf(tmp_path / "in", CFG, src)
    model = load_hf(
        tmp_path / "in", dtype=dtype, param_dtype=dtype, policy=KernelPolicy.reference()
    )
    # Every reshape transform landed where the table says (wq: [N*H, R] -> [N, H, R]).
    wq = np.asarray(_leaf(model, ("layers", 2, "self_attn", "wq")))
    np.testing.assert_array_equal(
        wq.reshape(-1, CFG.share_q_dim), src["model.layers.2.self_attn.wq.weight"]
    )
    index = save_hf(model, tmp_path / "out", max_shard_bytes=150_000)
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert set(index["weight_map"]) == set(src)
    for name, ref in src.items():
        shard = tmp_path / "out" / index["weight_map"][name]
        with safe_open(str(shard), "flax") as f:  # the reference reader reads our files
            got = np.asarray(f.get_tensor(name))
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert got.tobytes() == ref.tobytes(), name
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: cfg_out[k] for k in CFG.to_hf_config()} == CFG.to_hf_config()


def test_prefixed_vl_checkpoint_loads_and_skips_vision(tmp_path):
    src = random_tensors(CFG, seed=2)
    renamed = {}
    for name, t in src.items():
        new = (
            name.replace("model.", "model.language_model.", 1)
            if name.startswith("model.")
            else "language_model." + name
        )
        renamed[new] = t
    renamed["vision_model.patch_embed.weight"] = np.ones((4, 4), np.float32)
    renamed["vit_large_projector.weight"] = np.ones((2, 4), np.float32)
    write_hf(tmp_path, CFG, renamed, num_shards=2)
    model = load_hf(tmp_path, policy=KernelPolicy.reference())
    got = np.asarray(_leaf(model, ("lm_head",)))
    np.testing.assert_array_equal(got, src["lm_head.weight"])


def test_block_fp8_dequantize_matches_numpy_reference(tmp_path):
    src = random_tensors(CFG, seed=3, fp8=True)
    write_hf(tmp_path, CFG, src)
    model = load_hf(
        tmp_path,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        fp8="dequantize",
        policy=KernelPolicy.reference(),
    )
    checked = 0
    for e in hf_mapping.entries(CFG):
        got = np.asarray(_leaf(model, e.path))
        if e.quantizable:
            # f32(fp8) is exact and one f32 multiply is correctly rounded on both sides:
            # the results must be identical, not merely close.
            ref = dequantize_reference(src[e.hf_name], src[e.scale_name])
            np.testing.assert_array_equal(got, ref.reshape(e.model_shape), err_msg=e.hf_name)
            checked += 1
        else:
            np.testing.assert_array_equal(got, src[e.hf_name].astype(np.float32))
    # 3 layers x 5 attention linears = 15, dense ffn 2 x 3 = 6, moe 3 stacked + 3 shared = 6
    assert checked == 27


def test_dequantize_blocks_ragged_batched():
    rng = np.random.default_rng(4)
    vals = np.clip(rng.standard_normal((3, 200, 300)) * 50, -448, 448).astype(FP8)
    scale = rng.uniform(0.5, 2.0, (3, 2, 3)).astype(np.float32)
    got = dequantize_blocks(jnp.asarray(vals), jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(got), dequantize_reference(vals, scale))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_blocks(jnp.asarray(vals), jnp.asarray(scale[:, :1]))


def test_block_fp8_keep_builds_fp8_weights_and_round_trips(tmp_path):
    src = random_tensors(CFG, seed=5, fp8=True)
    write_hf(tmp_path / "in", CFG, src)
    model = load_hf(tmp_path / "in", fp8="keep", policy=KernelPolicy.reference())
    o = _leaf(model, ("layers", 0, "self_attn", "o_proj"))
    assert isinstance(o, Fp8Weight) and o.num_contract == 2 and o.shape == (192, 2, 32)
    ref = dequantize_reference(
        src["model.layers.0.self_attn.o_proj.weight"],
        src["model.layers.0.self_attn.o_proj.weight_scale_inv"],
    )
    np.testing.assert_array_equal(np.asarray(o.dequantize()).reshape(192, 64), ref)
    logits = model(jnp.arange(6, dtype=jnp.int32)[None])
    assert np.isfinite(np.asarray(logits)).all()
    save_hf(model, tmp_path / "out")
    back = read_all(tmp_path / "out")
    assert set(back) == set(src)
    for name, ref in src.items():
        assert back[name].dtype == ref.dtype and back[name].tobytes() == ref.tobytes(), name
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["weight_block_size"] == [128, 128]


def _mismatch(tmp_path, edit):
    src = random_tensors(CFG, seed=6)
    edit(src)
    write_hf(tmp_path, CFG, src)
    with pytest.raises(CheckpointMismatchError) as info:
        load_hf(tmp_path, policy=KernelPolicy.reference())
    return info.value


def test_missing_tensor_is_listed(tmp_path):
    err = _mismatch(tmp_path, lambda s: s.pop("model.layers.1.moe.up_proj.weight"))
    assert len(err.missing) == 1 and "model.layers.1.moe.up_proj.weight" in err.missing[0]
    assert not err.unexpected and not err.misshaped


def test_unexpected_tensor_is_listed(tmp_path):
    def add(s):
        s["model.layers.0.self_attn.extra.weight"] = np.ones((3,), np.float32)

    err = _mismatch(tmp_path, add)
    assert err.unexpected == ["model.layers.0.self_attn.extra.weight [3]"]
    assert not err.missing and not err.misshaped


def test_misshaped_tensor_is_listed(tmp_path):
    def bad(s):
        s["model.layers.2.self_attn.wq.weight"] = s["model.layers.2.self_attn.wq.weight"][:32]

    err = _mismatch(tmp_path, bad)
    assert len(err.misshaped) == 1 and "[32, 96]" in err.misshaped[0] and "[64, 96]" in str(err)
    assert not err.missing and not err.unexpected


def test_all_problems_in_one_error(tmp_path):
    def edit(s):
        s.pop("model.norm.weight")
        s["junk"] = np.ones((2,), np.float32)
        s["lm_head.weight"] = s["lm_head.weight"][:, :10]

    err = _mismatch(tmp_path, edit)
    assert (len(err.missing), len(err.unexpected), len(err.misshaped)) == (1, 1, 1)
    for text in ("model.norm.weight", "junk", "lm_head.weight"):
        assert text in str(err)


def test_fp8_scale_missing_is_listed(tmp_path):
    src = random_tensors(CFG, seed=7, fp8=True)
    src.pop("model.layers.0.mlp.down_proj.weight_scale_inv")
    write_hf(tmp_path, CFG, src)
    with pytest.raises(CheckpointMismatchError, match="down_proj.weight_scale_inv") as info:
        load_hf(tmp_path, policy=KernelPolicy.reference())
    err = info.value
    assert len(err.missing) == 1 and not err.unexpected


def test_truncated_shard_fails_cleanly(tmp_path):
    write_hf(tmp_path, CFG, random_tensors(CFG, seed=8), num_shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00002.*truncated"):
        load_hf(tmp_path, policy=KernelPolicy.reference())
    shard.write_bytes(data[:5])  # not even a header length
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_hf(tmp_path, policy=KernelPolicy.reference())


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)


def test_save_refuses_to_overwrite(tmp_path):
    model = Step3Model_small()
    save_hf(model, tmp_path)
    before = read_all(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(model, tmp_path)
    after = read_all(tmp_path)
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)


def Step3Model_small():
    from step3_jax.model import Step3Model

    return Step3Model(CFG, rngs=nnx.Rngs(0), policy=KernelPolicy.reference())


def test_load_streams_with_bounded_host_memory(tmp_path):
    """Host allocations while loading stay near ONE tensor, far below the checkpoint.

    tracemalloc sees every numpy buffer (the staging copies); device buffers are XLA's, not
    host staging. Bound: the largest tensor (its read buffer) + one more in flight + 8 MiB of
    slack for JAX's own Python-side bookkeeping (tracing and caching each jitted cast/reshape
    allocates ~4 MiB of Python objects, measured), against a ~300 MiB checkpoint."""
    cfg = small_config(
        num_layers=8,
        moe_layer_ids=tuple(range(1, 7)),
        num_experts=8,
        hidden_size=512,
        moe_intermediate_size=512,
    )
    src = random_tensors(cfg, seed=9, dtype=np.float32)
    write_hf(tmp_path, cfg, src, num_shards=5)
    total = sum(t.nbytes for t in src.values())
    largest = max(t.nbytes for t in src.values())
    del src
    # Warm-up load: JAX's first trace/compile of each cast allocates tens of MiB of Python
    # objects once per process; the second load measures the loader's own staging.
    load_hf(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32, policy=KernelPolicy.reference())
    tracemalloc.start()
    model = load_hf(
        tmp_path, dtype=jnp.float32, param_dtype=jnp.float32, policy=KernelPolicy.reference()
    )
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # On the CPU backend device_put may alias a numpy buffer as the "device" array, so some
    # loaded parameters stay counted at the end (`current`): they are the model, not staging.
    staging = peak - current
    assert total > 15 * largest  # the bound below is meaningful
    # At most ~3 tensors in flight (read buffer, converted copy, the previous one being freed).
    assert staging < 3 * largest + 8 * 2**20, (staging, peak, current, largest, total)
    assert staging < total / 5, (staging, total)
    assert _leaf(model, ("layers", 3, "ffn", "up_proj")).shape == (8, 512, 512)


@pytest.mark.multi_device
def test_load_onto_a_mesh_with_specs(tmp_path):
    src = random_tensors(CFG, seed=10)
    write_hf(tmp_path, CFG, src)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    # Only the MoE layer (1) has stacked [E, F, D] experts; dense layers' gate/up are [F, D].
    specs = {
        r"layers\.1\.ffn\.(gate|up)_proj": PartitionSpec(None, "model", None),
        r"layers\.\d+\.self_attn\.wq": PartitionSpec("data", None, None),
        "embed_tokens": PartitionSpec("model", None),
    }
    model = load_hf(tmp_path, mesh=mesh, specs=specs, policy=KernelPolicy.reference())
    up = _leaf(model, ("layers", 1, "ffn", "up_proj"))
    assert up.sharding == NamedSharding(mesh, PartitionSpec(None, "model", None))
    assert up.addressable_shards[0].data.shape == (4, 40, 192)
    np.testing.assert_array_equal(np.asarray(up), src["model.layers.1.moe.up_proj.weight"])
    emb = _leaf(model, ("embed_tokens",))
    assert emb.sharding.spec == PartitionSpec("model", None)
    norm = _leaf(model, ("norm", "weight"))
    assert norm.sharding.spec == PartitionSpec()  # unmatched: replicated on the mesh
    with pytest.raises(ValueError, match="either sharding= or mesh="):
        load_hf(tmp_path, mesh=mesh, specs=specs, sharding=lambda p: None)
