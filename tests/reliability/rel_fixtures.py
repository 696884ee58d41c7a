"""Helpers for the reliability suite (issue 15): a very small config, HF checkpoints written
with the ``safetensors`` package itself, and a model with seeded random weights."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from step3_jax.checkpoints import hf_mapping
from step3_jax.config import Step3Config
from step3_jax.policy import KernelPolicy

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
INDEX = "model.safetensors.index.json"
REFERENCE = KernelPolicy.reference()  # XLA attention, dense MoE oracle: CPU friendly


def tiny_config(**kw) -> Step3Config:
    """Two layers (dense, MoE), every dimension small: loads and compiles in seconds on CPU."""
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        share_q_dim=32,
        intermediate_size=64,
        moe_layer_ids=(1,),
        num_experts=4,
        top_k=2,
        moe_intermediate_size=32,
        share_expert_dim=32,
        max_position_embeddings=512,
    )
    base.update(kw)
    return Step3Config(**base)


def random_tensors(cfg: Step3Config, seed: int = 0, fp8: bool = False) -> dict[str, np.ndarray]:
    """HF-named float32 tensors (never zeros); with ``fp8`` quantizable weights are
    float8_e4m3fn with positive float32 128x128-block ``weight_scale_inv``."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in hf_mapping.entries(cfg):
        if fp8 and e.quantizable:
            out[e.hf_name] = np.clip(rng.standard_normal(e.hf_shape) * 50, -448, 448).astype(FP8)
            out[e.scale_name] = rng.uniform(1e-4, 1e-2, e.scale_shape()).astype(np.float32)
        else:
            out[e.hf_name] = (rng.standard_normal(e.hf_shape) * 0.05 + 0.01).astype(np.float32)
    return out


def write_checkpoint(path: Path, cfg: Step3Config, tensors: dict, num_shards: int = 2) -> Path:
    """``tensors`` as ``num_shards`` safetensors files + index + config.json."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        group = names[s::num_shards]
        save_file({n: np.ascontiguousarray(tensors[n]) for n in group}, str(path / fname))
        weight_map.update({n: fname for n in group})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    return path


def abstract_model(cfg: Step3Config):
    """The float32 `Step3Model` (dense MoE oracle) as shapes only: a restore target."""
    from step3_jax.model import Step3Model

    return nnx.eval_shape(
        lambda: Step3Model(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            policy=REFERENCE,
        )
    )


def build_model(cfg: Step3Config, seed: int = 0):
    """A float32 `Step3Model` (dense MoE oracle) with seeded random weights."""
    graphdef, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.05 + 0.01, jnp.float32), state
    )
    return nnx.merge(graphdef, state)


def model_leaf(model, path: tuple) -> np.ndarray:
    return np.asarray(dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[path].get_value())
