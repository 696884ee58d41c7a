"""Shared helpers for the checkpoint tests: small configs and HF checkpoints written with the
``safetensors`` package itself (an independent writer, so round trips test our reader AND
writer against the reference implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.flax import save_file

from step3_jax.checkpoints import hf_mapping
from step3_jax.config import Step3Config

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def small_config(**kw) -> Step3Config:
    """Dims chosen so FP8 blocks are ragged: 192 = 128 + 64, 320 = 2*128 + 64, 96 < 128."""
    base = dict(
        vocab_size=300,
        hidden_size=192,
        num_layers=3,
        num_heads=2,
        head_dim=32,
        share_q_dim=96,
        intermediate_size=320,
        moe_layer_ids=(1,),
        num_experts=4,
        top_k=2,
        moe_intermediate_size=160,
        share_expert_dim=160,
        max_position_embeddings=256,
    )
    base.update(kw)
    return Step3Config(**base)


def random_tensors(cfg: Step3Config, seed: int, dtype=ml_dtypes.bfloat16, fp8: bool = False):
    """HF-named random tensors (never zeros). With ``fp8``, quantizable weights are
    float8_e4m3fn values with random positive float32 ``weight_scale_inv`` per 128x128 block."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in hf_mapping.entries(cfg):
        if fp8 and e.quantizable:
            vals = np.clip(rng.standard_normal(e.hf_shape) * 100, -448, 448).astype(FP8)
            out[e.hf_name] = vals
            out[e.scale_name] = rng.uniform(1e-4, 1e-2, e.scale_shape()).astype(np.float32)
        else:
            out[e.hf_name] = (rng.standard_normal(e.hf_shape) * 0.05 + 0.01).astype(dtype)
    return out


def write_hf(path: Path, cfg: Step3Config, tensors: dict, num_shards: int = 3) -> Path:
    """Writes ``tensors`` as ``num_shards`` safetensors files + index + config.json."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(
            {n: jnp.asarray(tensors[n]) for n in group},
            str(path / fname),
            metadata={"format": "pt"},
        )
        weight_map.update({n: fname for n in group})
    index = {
        "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    return path


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (our reader; fp8-capable)."""
    from step3_jax.checkpoints.safetensors_io import index_checkpoint, read_tensor

    return {n: read_tensor(i) for n, i in index_checkpoint(path).items()}


def dequantize_reference(values: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """NumPy oracle: each element times its 128x128 block's scale, in float32."""
    *_, n, k = values.shape
    s = np.repeat(np.repeat(scale_inv, 128, axis=-2), 128, axis=-1)[..., :n, :k]
    return values.astype(np.float32) * s
