"""The declarative HF <-> step3_jax table of Step3-VL's vision half, with load and save.

Release layout (top-level names, as vLLM and SGLang load them; the HF-transformers in-memory
layout prefixes them with ``model.``, accepted on load)::

    vision_model.embeddings.class_embedding                 [1, D]
    vision_model.embeddings.patch_embedding.{weight,bias}   [D, 3, 14, 14], [D]
    vision_model.embeddings.position_embedding.weight       [(P/14)^2 + 1, D]
    vision_model.transformer.layers.{i}.self_attn.qkv_proj.{weight,bias}  [3D, D], [3D]
    vision_model.transformer.layers.{i}.self_attn.out_proj.{weight,bias}  [D, D], [D]
    vision_model.transformer.layers.{i}.layer_norm{1,2}.{weight,bias}     [D]
    vision_model.transformer.layers.{i}.mlp.fc1.{weight,bias}             [F, D], [F]
    vision_model.transformer.layers.{i}.mlp.fc2.{weight,bias}             [D, F], [D]
    vit_downsampler.{weight,bias}        [O, D, 2, 2], [O]
    vit_downsampler2.{weight,bias}       [2O, O, 3, 3], [2O]
    vit_large_projector.weight (+ .bias with projector_bias)   [M, 2O] ([M])

step3_jax keeps PyTorch's layouts (linear ``[out, in]``, conv ``[O, I, kh, kw]``), so every
transform is the identity and a round trip is bitwise. The vision half is bf16 in both
releases: vLLM builds the tower with ``quant_config=None`` and the downsamplers/projector as
plain torch modules, so a float8 tensor here is refused, by name.

The functions take and return dicts of host numpy arrays so the main loader
(`step3_jax.checkpoints.hf_load.load_hf`) can hand over the vision tensors it skips.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step3_jax.checkpoints.hf_config import read_hf_config
from step3_jax.checkpoints.hf_mapping import IDENTITY, VISION_PREFIXES, Entry, vision_name
from step3_jax.checkpoints.hf_validate import capped
from step3_jax.checkpoints.integrity import CheckpointFormatError
from step3_jax.checkpoints.safetensors_io import index_checkpoint, read_tensor
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.encoder import Step3VisionModel

FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


class VisionCheckpointError(ValueError):
    """The vision tensors do not match the config: every problem listed at once."""


def canonical_name(name: str) -> str | None:
    """The release-layout name of a vision tensor (``model.``-prefixed in-memory names
    included), or None for a tensor of the text model: `hf_mapping.vision_name`, the one
    list of vision prefixes (`hf_mapping.VISION_PREFIXES`)."""
    return vision_name(name)


def _e(hf: str, path: tuple, shape: tuple[int, ...]) -> Entry:
    return Entry(hf, path, shape, shape, IDENTITY)


def _pair(hf: str, path: tuple, w_shape, b_shape, bias: bool = True) -> list[Entry]:
    out = [_e(f"{hf}.weight", (*path, "weight"), w_shape)]
    return out + ([_e(f"{hf}.bias", (*path, "bias"), b_shape)] if bias else [])


def _layer(c: Step3VisionConfig, i: int) -> list[Entry]:
    d, f = c.hidden_size, c.intermediate_size
    hf, p = f"vision_model.transformer.layers.{i}.", ("vision_model", "layers", i)
    return [
        *_pair(f"{hf}self_attn.qkv_proj", (*p, "self_attn", "qkv_proj"), (3 * d, d), (3 * d,)),
        *_pair(f"{hf}self_attn.out_proj", (*p, "self_attn", "out_proj"), (d, d), (d,)),
        *_pair(f"{hf}layer_norm1", (*p, "layer_norm1"), (d,), (d,)),
        *_pair(f"{hf}mlp.fc1", (*p, "mlp", "fc1"), (f, d), (f,)),
        *_pair(f"{hf}mlp.fc2", (*p, "mlp", "fc2"), (d, f), (d,)),
        *_pair(f"{hf}layer_norm2", (*p, "layer_norm2"), (d,), (d,)),
    ]


def entries(c: Step3VisionConfig) -> list[Entry]:
    """Every parameter of a `Step3VisionModel` built from ``c``, in checkpoint order."""
    d, o, ps = c.hidden_size, c.output_hidden_size, c.patch_size
    emb, p = "vision_model.embeddings.", ("vision_model", "embeddings")
    rows = c.position_grid**2 + 1
    out = [
        _e(f"{emb}class_embedding", (*p, "class_embedding"), (1, d)),
        *_pair(f"{emb}patch_embedding", (*p, "patch_embedding"), (d, c.num_channels, ps, ps), (d,)),
        _e(f"{emb}position_embedding.weight", (*p, "position_embedding"), (rows, d)),
    ]
    for i in range(c.num_layers):
        out += _layer(c, i)
    out += _pair("vit_downsampler", ("vit_downsampler",), (o, d, 2, 2), (o,))
    out += _pair("vit_downsampler2", ("vit_downsampler2",), (2 * o, o, 3, 3), (2 * o,))
    m = c.text_hidden_size
    out += _pair(
        "vit_large_projector", ("vit_large_projector",), (m, 2 * o), (m,), c.projector_bias
    )
    return out


def hf_to_params(
    tensors: Mapping[str, np.ndarray], c: Step3VisionConfig
) -> dict[tuple, np.ndarray]:
    """Vision tensors by HF name (text-model tensors are ignored) -> arrays by NNX path.

    Raises `VisionCheckpointError` listing every missing, duplicate, unexpected, mis-shaped or
    float8 tensor."""
    canon: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for name, arr in tensors.items():
        cn = canonical_name(name)
        if cn is None:
            continue
        if cn in canon:
            problems.append(f"duplicate: {name} (same tensor as {cn})")
        canon[cn] = arr
    out = {}
    for e in entries(c):
        arr = canon.pop(e.hf_name, None)
        if arr is None:
            problems.append(f"missing: {e.hf_name} {list(e.hf_shape)}")
        elif tuple(arr.shape) != e.hf_shape:
            problems.append(
                f"mis-shaped: {e.hf_name} is {list(arr.shape)}, expected {list(e.hf_shape)}"
            )
        elif np.dtype(arr.dtype).name not in FLOAT_DTYPES:
            problems.append(
                f"dtype: {e.hf_name} is {arr.dtype}; the vision half is never quantized"
            )
        else:
            out[e.path] = e.transform.to_model(arr, e.model_shape)
    problems += [f"unexpected: {n} {list(a.shape)}" for n, a in sorted(canon.items())]
    if problems:
        raise VisionCheckpointError(
            f"vision tensors do not match the config ({len(problems)} problems):\n  "
            + "\n  ".join(capped(problems))
        )
    return out


def params_to_hf(params: Mapping[tuple, np.ndarray], c: Step3VisionConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`: arrays by NNX path -> release-layout tensors."""
    table = entries(c)
    if set(params) != {e.path for e in table}:
        diff = sorted(map(str, set(params) ^ {e.path for e in table}))
        raise VisionCheckpointError(f"vision params do not match the table: {capped(diff)}")
    return {e.hf_name: e.transform.to_hf(np.asarray(params[e.path]), e.hf_shape) for e in table}


def model_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """A `Step3VisionModel`'s parameters as host arrays by NNX path."""
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in state}


def read_vision_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """The vision tensors of a checkpoint directory (one tensor read at a time)."""
    infos = index_checkpoint(path)
    return {n: read_tensor(i) for n, i in infos.items() if canonical_name(n) is not None}


def read_vision_config(path: str | Path) -> Step3VisionConfig:
    """`Step3VisionConfig` from a checkpoint directory's ``config.json``.

    Raises `CheckpointFormatError` naming the file and the key (``vision_config.<key>``) for
    malformed JSON, wrong types and out-of-range values, before anything is sized from them."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in {path}; pass vision_config= explicitly")
    try:
        return Step3VisionConfig.from_hf_config(read_hf_config(path))
    except CheckpointFormatError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointFormatError(f"{cfg}: {e}") from e


def load_vision(
    path: str | Path,
    config: Step3VisionConfig | None = None,
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    policy=None,
):
    """A `Step3VisionModel` from a checkpoint directory (or from ``tensors`` already read).

    Built abstractly (no random init), then filled from the table: every leaf once."""
    c = config or read_vision_config(path)
    params = hf_to_params(read_vision_tensors(path) if tensors is None else tensors, c)
    abstract = nnx.eval_shape(
        lambda: Step3VisionModel(
            c, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
            policy=policy,
        )
    )  # fmt: skip
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    if set(leaves) != set(params):
        raise RuntimeError(
            "vision_mapping out of sync with Step3VisionModel: "
            f"{capped(sorted(map(str, set(leaves) ^ set(params))))}"
        )
    for p, arr in params.items():
        if tuple(leaves[p].get_value().shape) != arr.shape:
            raise RuntimeError(f"vision_mapping: {p} is {leaves[p].get_value().shape} in the model")
        leaves[p].set_value(jnp.asarray(arr).astype(param_dtype))
    return nnx.merge(graphdef, state)


def vision_tensors(model, dtype=None) -> dict[str, np.ndarray]:
    """A `Step3VisionModel` as release-layout host tensors (cast to ``dtype`` if given)."""
    params = model_params(model)
    if dtype is not None:
        params = {p: a.astype(np.dtype(dtype)) for p, a in params.items()}
    return params_to_hf(params, model.config)


__all__ = [
    "VISION_PREFIXES",
    "VisionCheckpointError",
    "canonical_name",
    "entries",
    "hf_to_params",
    "load_vision",
    "model_params",
    "params_to_hf",
    "read_vision_config",
    "read_vision_tensors",
    "vision_tensors",
]
