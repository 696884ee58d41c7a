"""Shared helpers of the vision tests: random HF-named vision tensors (never zeros) and models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import reference_numpy as ref
from flax import nnx

from step3_jax.checkpoints import vision_mapping
from step3_jax.model import Step3Model
from step3_jax.policy import KernelPolicy
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.model import Step3VLModel


def random_vision_tensors(cfg: Step3VisionConfig, seed: int, dtype=np.float32) -> dict:
    """Release-named random tensors. Norm weights near 1 (not exactly), biases and class /
    position embeddings O(0.1-1), linear weights ~1/sqrt(fan_in): every path matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in vision_mapping.entries(cfg):
        shape = e.hf_shape
        if "layer_norm" in e.hf_name and e.hf_name.endswith("weight"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif e.hf_name.endswith("bias") or "embedding" in e.hf_name and len(shape) == 2:
            a = 0.3 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[e.hf_name] = a.astype(dtype)
    return out


def load_tiny(cfg: Step3VisionConfig, tensors: dict, dtype=jnp.float32):
    return vision_mapping.load_vision(
        None,
        cfg,
        tensors=tensors,
        dtype=dtype,
        param_dtype=dtype,
        policy=KernelPolicy(vision_attention="xla"),
    )


def random_vl_model(text_cfg, vis_cfg: Step3VisionConfig, text_seed: int, vision_seed: int):
    """A float32 `Step3VLModel` of random weights (reference kernel policy): the text model's
    from `reference_numpy.random_params`, the tower's from `random_vision_tensors`."""
    abstract = nnx.eval_shape(
        lambda: Step3Model(
            text_cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
            policy=KernelPolicy.reference(),
        )
    )  # fmt: skip
    graphdef, state = nnx.split(abstract)
    text = nnx.merge(graphdef, jax.tree.map(jnp.asarray, ref.random_params(state, text_seed)))
    return Step3VLModel(text, load_tiny(vis_cfg, random_vision_tensors(vis_cfg, vision_seed)))


def random_pixels(n: int, size: int, seed: int) -> np.ndarray:
    """Normalized-looking pixels: CLIP-normalized uniform [0, 1] values, [n, 3, size, size]."""
    rng = np.random.default_rng(seed)
    return ((rng.uniform(0, 1, (n, 3, size, size)) - 0.45) / 0.27).astype(np.float32)


BF16 = np.dtype(ml_dtypes.bfloat16)


def embed(model, pixels) -> np.ndarray:
    """``model(pixels)`` jitted (one compile per shape beats op-by-op dispatch on CPU)."""
    from step3_jax.vision.model import _embed_images, flatten_tower

    out = _embed_images(flatten_tower(model), jnp.asarray(pixels))
    return np.asarray(out.astype(jnp.float32))
