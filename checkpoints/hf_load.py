"""`load_hf`: a Hugging Face safetensors checkpoint -> `Step3Model`.

Loading never materializes random weights: the model is built abstractly (`nnx.eval_shape`),
the checkpoint's headers are validated against the declarative table (`hf_mapping.entries`,
`hf_validate.validate`) before any data is read, and then tensors stream one at a time from
disk to their target sharding. Host memory peaks at about one tensor (plus, for a dtype
change, nothing: the cast runs on device).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, Sharding
from tqdm.auto import tqdm

from step3_jax import quant_model
from step3_jax.checkpoints import hf_mapping, integrity
from step3_jax.checkpoints.hf_config import load_config
from step3_jax.checkpoints.hf_mapping import BLOCK, FP8, Entry
from step3_jax.checkpoints.hf_validate import (
    check_table_matches_model,
    split_tensors,
    validate,
    verify_checkpoint,
)
from step3_jax.checkpoints.integrity import CheckpointFormatError
from step3_jax.checkpoints.safetensors_io import TensorInfo, index_checkpoint, read_tensor
from step3_jax.config import Step3Config
from step3_jax.model import Step3Model
from step3_jax.policy import KernelPolicy

FP8_MODES = ("dequantize", "keep")
HOST_CAST_BYTES = 16 * 2**20  # dtype changes of tensors up to this size happen on the host
ShardingSpec = Callable[[str], Sharding | None] | None
VisionLoader = Callable[[dict[str, TensorInfo]], object]
_NOT_FINITE = "contains NaN or inf"


# ----------------------------------------------------------------------------- sharding
def resolve_sharding(sharding=None, mesh=None, specs=None) -> Callable[[str], Sharding]:
    """``path -> Sharding`` from a callback, or from ``mesh`` + ``specs`` (a callable
    ``path -> PartitionSpec`` or a mapping ``regex -> PartitionSpec``, first full match wins,
    unmatched paths replicated); default: the first device."""
    if sharding is not None and (mesh is not None or specs is not None):
        raise ValueError("pass either sharding= or mesh= + specs=, not both")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if sharding is not None:
        if not callable(sharding):
            raise ValueError(f"sharding must be a callable path -> Sharding, got {sharding!r}")
        return lambda path: sharding(path) or default
    if mesh is None:
        if specs is not None:
            raise ValueError("specs= needs mesh=")
        return lambda path: default

    def spec_of(path: str) -> PartitionSpec:
        if callable(specs):
            return specs(path) or PartitionSpec()
        for pattern, spec in (specs or {}).items():
            if re.fullmatch(pattern, path):
                return spec
        return PartitionSpec()

    return lambda path: NamedSharding(mesh, spec_of(path))


def _scale_sharding(s: Sharding) -> Sharding:
    # Block scales are ~1/16384 of the weight: replicate them on the weight's mesh.
    return NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else s


# ----------------------------------------------------------------------------- one tensor
def dequantize_blocks(values: jax.Array, scale_inv: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Block-FP8 -> float: ``float32(values[..., n, k]) * scale_inv[..., n // 128, k // 128]``.

    ``values [..., N, K]`` float8_e4m3fn, ``scale_inv [..., ceil(N/128), ceil(K/128)]`` f32.
    """
    n, k = values.shape[-2:]
    if scale_inv.shape[-2:] != (-(-n // BLOCK), -(-k // BLOCK)):
        raise ValueError(
            f"scale_inv shape {scale_inv.shape} does not cover values {values.shape}"
            f" in {BLOCK}x{BLOCK} blocks"
        )
    s = jnp.repeat(jnp.repeat(scale_inv, BLOCK, axis=-2), BLOCK, axis=-1)[..., :n, :k]
    return (values.astype(jnp.float32) * s).astype(dtype)


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x.astype(jnp.float32)))


@jax.jit
def _valid_scales(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x) & (x > 0))


def _load_entry(e: Entry, ckpt: dict, target: Sharding, param_dtype, fp8: str, checks: list):
    """One parameter from disk to ``target``; returns ``(value, bytes read)``.

    With a ``checks`` list, appends ``(tensor name, problem, on-device bool)`` per tensor read:
    the values are checked where they land, and all flags come back in one transfer.
    """
    info = ckpt[e.hf_name]
    if info.dtype != FP8:
        return _load_float(e, info, target, param_dtype, checks), info.nbytes
    sinfo = ckpt[e.scale_name]
    value = _load_fp8(e, info, sinfo, target, param_dtype, fp8 == "keep", checks)
    return value, info.nbytes + sinfo.nbytes


def _load_float(e: Entry, info: TensorInfo, target: Sharding, param_dtype, checks):
    """A float tensor in the model layout on ``target``, cast to ``param_dtype``."""
    host = read_tensor(info)
    if info.dtype != np.dtype(param_dtype) and info.nbytes <= HOST_CAST_BYTES:
        # Small tensors: cast on the host (same IEEE round-to-nearest-even as XLA's
        # convert) instead of compiling one device convert per distinct shape, which
        # dominated the demo model's start-up on CPU.
        host = host.astype(np.dtype(param_dtype))
    value = jax.device_put(e.transform.to_model(host, e.model_shape), target)
    if checks is not None:
        checks.append((info, _NOT_FINITE, _all_finite(value)))
    return value if value.dtype == param_dtype else value.astype(param_dtype)


def _load_fp8(e: Entry, info, sinfo, target: Sharding, param_dtype, keep: bool, checks):
    """A block-FP8 weight + its scales: an `Fp8Weight` (``keep``) or dequantized on device."""
    host = read_tensor(info)
    scale = jax.device_put(read_tensor(sinfo))
    raw = jax.device_put(host.reshape(e.model_shape), target) if keep else jax.device_put(host)
    if checks is not None:
        checks.append((info, _NOT_FINITE, _all_finite(raw)))
        checks.append((sinfo, "has a NaN, inf, zero or negative scale", _valid_scales(scale)))
    if not keep:
        fn = jax.jit(
            lambda v, s: dequantize_blocks(v, s, param_dtype).reshape(e.model_shape),
            out_shardings=target,
        )
        return fn(raw, scale)
    scales = jax.device_put(scale, _scale_sharding(target))
    return quant_model.Fp8Weight(raw, scales, num_contract=e.num_contract)


def _raise_if_not_finite(checks: list) -> None:
    flags = jax.device_get([c[2] for c in checks])
    bad = [
        f"{info.name} ({info.file.name}) {problem}"
        for (info, problem, _), ok in zip(checks, flags, strict=True)
        if not ok
    ]
    if bad:
        raise CheckpointFormatError(
            f"{len(bad)} tensor(s) hold invalid values (pass check_finite=False to load "
            "anyway):\n  " + "\n  ".join(bad[:20])
        )


# ----------------------------------------------------------------------------- the model
def load_hf(
    path: str | Path,
    config: Step3Config | None = None,
    *,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    sharding: ShardingSpec = None,
    mesh: jax.sharding.Mesh | None = None,
    specs=None,
    fp8: str = "dequantize",
    policy: KernelPolicy | None = None,
    fuse_qkv: bool = False,
    progress: bool | None = None,
    verify: bool = True,
    check_finite: bool = True,
    vision: VisionLoader | None = None,
) -> Step3Model:
    """Loads a Step-3 HF checkpoint (bf16/f32 or block-FP8 safetensors) into a `Step3Model`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors[.index.json]`` + shards.
      config: overrides ``config.json``.
      dtype / param_dtype: compute / parameter dtype of the model (casts happen on device).
      sharding: ``path -> jax.sharding.Sharding`` (NNX path like ``"layers.3.self_attn.wq"``),
        or give ``mesh`` + ``specs`` (see `resolve_sharding`). Default: first device.
      fp8: for block-FP8 tensors, ``"dequantize"`` (float params of ``param_dtype``) or
        ``"keep"`` (`step3_jax.quant_model.Fp8Weight` leaves: fp8 values + f32 block scales).
      policy: the model's `step3_jax.KernelPolicy` (default: the best kernels for the device,
        so a block-FP8 checkpoint loaded with ``fp8="keep"`` runs the Pallas FP8 GEMMs on
        Hopper).
      fuse_qkv: store each layer's q/k/v weights as ONE ``self_attn.qkv_proj`` (loaded
        separately, then fused: `step3_jax.quant_model.fuse_qkv`; with ``fp8="keep"`` the
        block rows must concatenate exactly, i.e. ``share_q_dim`` a multiple of 128).
      progress: tqdm bar in bytes (default: on for checkpoints over 1 GiB).
      verify: when the checkpoint has a SHA-256 manifest (`save_hf` writes one), check every
        file against it first (costs one extra read of the checkpoint: see
        docs/checkpoints.md for the measured rate).
      check_finite: check on device that every tensor is finite and every FP8 scale is
        finite and > 0 (all flags read back in one transfer at the end).
      vision: the VL release's vision half (`hf_mapping.VISION_PREFIXES`) is skipped unless
        this callback is given; it is called once, after the text model is loaded, with
        ``{on-disk name: TensorInfo}`` of every vision tensor (read one with
        `step3_jax.checkpoints.safetensors_io.read_tensor`), whatever the checkpoint's layout.

    Layouts (detected from the names, `hf_mapping.detect_layout`): the text-only checkpoint,
    the VL release on disk (``model.*``, ``lm_head.*`` beside ``vision_model.*``,
    ``vit_downsampler.*``, ``vit_downsampler2.*``, ``vit_large_projector.*``) and the
    HF-transformers in-memory layout (``model.language_model.*``, ``model.vision_model.*``,
    ``model.vit_*``). ``quantization_config`` is checked (`check_quantization_config`).

    Raises:
      CheckpointMismatchError: missing / unexpected / mis-shaped / wrongly typed tensors, all
        listed at once.
      CheckpointFormatError: a truncated, malformed or corrupt file, a path that leaves the
        checkpoint directory, or non-finite values (the message names the file / tensor).
    """
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
    path = Path(path)
    integrity.recover(path)  # a save killed between its two renames leaves `.<name>.old`
    if verify:
        verify_checkpoint(path)
    cfg = load_config(path, config)
    target_of = resolve_sharding(sharding, mesh, specs)
    ckpt, dupes, vision_tensors = split_tensors(index_checkpoint(path))
    table = hf_mapping.entries(cfg)
    validate(table, ckpt, dupes, path)
    graphdef, state, leaves = _abstract_model(cfg, table, dtype, param_dtype, policy)
    _fill_leaves(leaves, table, ckpt, target_of, param_dtype, fp8, check_finite, progress)
    model = nnx.merge(graphdef, state)
    if fuse_qkv:
        quant_model.fuse_qkv(model)
    if vision is not None:
        vision(vision_tensors)
    return model


def _abstract_model(cfg: Step3Config, table: list[Entry], dtype, param_dtype, policy):
    """``(graphdef, state, {NNX path: Variable})`` of a `Step3Model` built without allocating
    its weights (`nnx.eval_shape`), checked against ``table``."""
    abstract = nnx.eval_shape(
        lambda: Step3Model(
            cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, policy=policy
        )
    )
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    check_table_matches_model(table, leaves)
    return graphdef, state, leaves


def _fill_leaves(leaves, table, ckpt, target_of, param_dtype, fp8, check_finite, progress):
    """Streams every table tensor from disk into its abstract leaf (``{NNX path: Variable}``),
    one at a time, then raises `CheckpointFormatError` if any held NaN/inf or a bad scale."""
    total = sum(ckpt[e.hf_name].nbytes for e in table)
    bar = _progress(total, progress)
    checks = [] if check_finite else None
    for e in table:
        value, nbytes = _load_entry(e, ckpt, target_of(e.path_str), param_dtype, fp8, checks)
        leaves[e.path].set_value(value)
        bar.update(nbytes)
    bar.close()
    if checks:
        _raise_if_not_finite(checks)


def _progress(total: int, enabled: bool | None) -> tqdm:
    if enabled is None:
        enabled = total > 2**30
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="loading checkpoint",
        disable=not enabled,
    )


__all__ = [
    "FP8_MODES",
    "VisionLoader",
    "dequantize_blocks",
    "load_hf",
    "resolve_sharding",
]
