"""`save_hf`: `Step3Model` -> a Hugging Face safetensors checkpoint, atomically.

The tensors follow the declarative table (`hf_mapping.entries`), one on the host at a time;
the directory swap and its SHA-256 manifest come from `integrity`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from step3_jax import quant_model
from step3_jax.checkpoints import hf_mapping, integrity
from step3_jax.checkpoints.hf_config import config_json
from step3_jax.checkpoints.hf_mapping import FLOAT_DTYPES, FP8, Entry
from step3_jax.checkpoints.integrity import MANIFEST_FILE
from step3_jax.checkpoints.safetensors_io import INDEX_FILE, SINGLE_FILE, ShardWriter
from step3_jax.model import Step3Model

TensorSpec = tuple[str, np.dtype, tuple[int, ...]]  # (HF name, stored dtype, HF shape)


# ----------------------------------------------------------------------------- params -> host
def param_values(model: Step3Model) -> dict[tuple, object]:
    """Param values by NNX path as the HF table names them: a fused leaf
    (`hf_mapping.FUSED_PARAMS`, e.g. ``qkv_proj``) appears as its separate parts, cut back
    bitwise (`MFAttention.qkv_weights`)."""
    values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, node in nnx.iter_graph(model):
        for fused, names in hf_mapping.FUSED_PARAMS.items():
            if (*path, fused) not in values:
                continue
            if fused != "qkv_proj" or not hasattr(node, "qkv_weights"):
                raise ValueError(f"{path}: no rule to split the fused leaf {fused!r}")
            del values[(*path, fused)]
            values.update({(*path, n): w for n, w in zip(names, node.qkv_weights(), strict=True)})
    return values


def _host_tensors(e: Entry, value, dtype) -> dict[str, np.ndarray]:
    """HF-layout host arrays of one parameter (two for an Fp8Weight: weight + scale_inv)."""
    if isinstance(value, quant_model.Fp8Weight):
        if value.granularity != "block":
            raise ValueError(f"{e.path_str}: only block-scaled Fp8Weight has an HF layout")
        vals = np.asarray(jax.device_get(value.values)).reshape(e.hf_shape)
        return {e.hf_name: vals, e.scale_name: np.asarray(jax.device_get(value.scales))}
    host = np.asarray(jax.device_get(value))
    if dtype is not None:
        host = host.astype(np.dtype(dtype))
    return {e.hf_name: e.transform.to_hf(host, e.hf_shape)}


def _tensor_specs(table: list[Entry], values: dict, dtype) -> list[TensorSpec]:
    """What each parameter is written as, in table order (an Fp8Weight: weight + scale)."""
    specs = []
    for e in table:
        v = values[e.path]
        if isinstance(v, quant_model.Fp8Weight):
            specs.append((e.hf_name, FP8, e.hf_shape))
            specs.append((e.scale_name, np.dtype(np.float32), tuple(v.scales.shape)))
        else:
            specs.append((e.hf_name, np.dtype(dtype or v.dtype), e.hf_shape))
    return specs


def _tensor_source(
    table: list[Entry], values: dict, dtype, extra: dict[str, np.ndarray]
) -> Callable[[str], np.ndarray]:
    """``HF name -> host array`` for `ShardWriter`, converting each parameter when asked."""
    by_name = {}
    for e in table:
        by_name[e.hf_name] = by_name[e.scale_name] = e
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        # An Fp8Weight yields two tensors from one leaf; keep the second until asked for.
        if name in extra:
            return extra.pop(name)
        if name not in cache:
            e = by_name[name]
            cache.update(_host_tensors(e, values[e.path], dtype))
        return cache.pop(name)

    return get


# ----------------------------------------------------------------------------- checks
def _is_checkpoint_file(name: str) -> bool:
    """Files a save replaces (the rest of an existing directory is carried over)."""
    base = name.removesuffix(".tmp")
    return base in (INDEX_FILE, SINGLE_FILE, "config.json", MANIFEST_FILE) or (
        base.startswith("model") and base.endswith(".safetensors")
    )


def _check_save_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"save_hf: dtype={dtype!r} is not a dtype") from e
    if dt not in FLOAT_DTYPES:
        raise ValueError(
            f"save_hf: dtype={dt} would round the float weights; use one of "
            f"{', '.join(map(str, FLOAT_DTYPES))} (block-FP8 comes from Fp8Weight leaves)"
        )
    return dt


def _check_extra_tensors(extra_tensors, taken: set[str]) -> dict[str, np.ndarray]:
    """``extra_tensors`` as a dict, each name a new string and each value an array."""
    extra = dict(extra_tensors or {})
    for name, value in extra.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"save_hf: extra_tensors names must be non-empty str, got {name!r}")
        if name in taken:
            raise ValueError(
                f"save_hf: extra_tensors name {name!r} collides with a model tensor; "
                "each tensor name may appear once"
            )
        if not isinstance(value, np.ndarray | jax.Array):
            raise TypeError(
                f"save_hf: extra_tensors[{name!r}] must be an array (numpy or jax), "
                f"got {type(value).__name__}"
            )
    return extra


def _destination(path: str | Path, overwrite: bool) -> Path:
    """The absolute checkpoint directory, after recovering an interrupted save; refuses a
    file, or an existing checkpoint unless ``overwrite``.

    Also refuses, before anything is written: a symlink (the swap renames ``path`` itself,
    so it would replace the link by a folder, or, resolved, silently overwrite whatever the
    link points to; the caller names the real folder instead), and the process's working
    directory or a folder holding it (the swap deletes the old folder)."""
    path = Path(path).absolute()
    if path.is_symlink():
        raise ValueError(
            f"save_hf: path {path} is a symlink (-> {os.readlink(path)}); pass the real "
            f"folder ({path.resolve()}) or remove the link"
        )
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # the working directory is already gone: nothing to protect
        cwd = None
    real = path.resolve()
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise ValueError(
            f"save_hf: path {path} is or contains the current working directory ({cwd}), "
            "which replacing it would delete; save to another folder or chdir out of it"
        )
    path = integrity.recover(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"save_hf: {path} exists and is not a directory")
    old = (
        sorted(p.name for p in path.iterdir() if _is_checkpoint_file(p.name))
        if path.is_dir()
        else []
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{path} already holds a checkpoint ({old[0]}); pass overwrite=True to replace it"
        )
    return path


# ----------------------------------------------------------------------------- the model
def save_hf(
    model: Step3Model,
    path: str | Path,
    *,
    dtype=None,
    max_shard_bytes: int = 4 * 2**30,
    overwrite: bool = False,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
    extra_config: Mapping | None = None,
) -> dict:
    """Writes ``model`` as an HF checkpoint: sharded safetensors + index + ``config.json`` +
    a SHA-256 manifest (``step3_jax.manifest.json``, verified by `load_hf`).

    Float params are cast to ``dtype`` (a float dtype; default: as stored); `Fp8Weight`
    leaves are written as block-FP8 (``weight`` float8_e4m3fn + ``weight_scale_inv`` f32). One
    tensor is on the host at a time. A fused ``qkv_proj`` (`MFAttention.fuse_qkv`) is written
    as the separate q_proj/k_proj/v_proj tensors, so the checkpoint is the same as the unfused
    model's. Refuses to replace an existing checkpoint unless ``overwrite=True``, and
    refuses a symlinked ``path`` or one that is (or holds) the working directory.
    ``extra_tensors`` (HF name -> host array, written as is after the text model's; a name
    of the text model is refused) and
    ``extra_config`` (top-level keys; the text keys then nest under ``text_config``) carry the
    vision half of a VL model (`save_hf_vl`).

    Atomic: everything is written to a hidden sibling folder first, then swapped in by
    renames, then the old checkpoint is deleted (other files of the old folder, e.g. a
    tokenizer, are kept). A crash at any point leaves the old or the new checkpoint
    loadable by `load_hf`, never a mix. Returns the index dict.
    """
    dtype = _check_save_dtype(dtype)
    path = _destination(path, overwrite)
    table = hf_mapping.entries(model.config)
    values = param_values(model)
    if set(values) != {e.path for e in table}:
        raise RuntimeError(
            "hf_mapping.entries out of sync with the model's params: "
            f"{sorted(map(str, set(values) ^ {e.path for e in table}))}"
        )
    specs = _tensor_specs(table, values, dtype)
    extra = _check_extra_tensors(extra_tensors, {s[0] for s in specs})
    specs += [(n, a.dtype, tuple(a.shape)) for n, a in extra.items()]
    hf_cfg = config_json(
        model.config,
        torch_dtype=dtype or values[("norm", "weight")].dtype,
        block_fp8=any(s[1] == FP8 for s in specs),
        extra_config=extra_config,
    )
    return _write_atomic(
        path, specs, _tensor_source(table, values, dtype, extra), hf_cfg, max_shard_bytes
    )


def _write_atomic(
    path: Path,
    specs: list[TensorSpec],
    get: Callable[[str], np.ndarray],
    hf_cfg: dict,
    max_shard_bytes: int,
) -> dict:
    """Writes shards, index, ``config.json`` and manifest into a staging folder, then swaps
    it in for ``path`` (`integrity.replace_directory`). Returns the index dict."""
    staged = integrity.staging_dir(path)
    integrity.remove_tree(staged)  # left by an earlier save that died before its swap
    staged.mkdir(parents=True)
    integrity.fault_point("staging_created")
    writer = ShardWriter(staged, max_shard_bytes)
    index = writer.write(specs, get, {"producer": "step3_jax"})
    integrity.write_json_atomic(staged / "config.json", hf_cfg)
    integrity.fault_point("wrote_config")
    digests = {**writer.digests, **integrity.digest_files(staged, ["config.json"])}
    integrity.write_manifest(staged, digests)
    integrity.fault_point("wrote_manifest")
    integrity.replace_directory(staged, path, keep=lambda n: not _is_checkpoint_file(n))
    return index


__all__ = ["param_values", "save_hf"]
