"""`load_hf` / `save_hf`: Hugging Face safetensors checkpoints <-> `Step3Model`.

Loading never materializes random weights: the model is built abstractly (`nnx.eval_shape`),
the checkpoint's headers are validated against the declarative table (`hf_mapping.entries`)
before any data is read, and then tensors stream one at a time from disk to their target
sharding. Host memory peaks at about one tensor (plus, for a dtype change, nothing: the cast
runs on device).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from step3_jax.checkpoints import hf_mapping, integrity
from step3_jax.checkpoints.hf_mapping import Entry
from step3_jax.checkpoints.integrity import MANIFEST_FILE, CheckpointFormatError
from step3_jax.checkpoints.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardWriter,
    TensorInfo,
    index_checkpoint,
    read_tensor,
    shard_files,
)
from step3_jax.config import Step3Config
from step3_jax.model import Step3Model
from step3_jax.policy import KernelPolicy

FP8_MODES = ("dequantize", "keep")
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# Dtypes a float parameter may be stored in; anything else (int8, bool, int64, float8_e5m2)
# would be cast to float silently and is refused.
FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64))
BLOCK = 128  # block-FP8 checkpoints: one scale per 128x128 block of the 2-D weight
HOST_CAST_BYTES = 16 * 2**20  # dtype changes of tensors up to this size happen on the host
ShardingSpec = Callable[[str], Sharding | None] | None


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model: lists every problem at once."""

    def __init__(self, missing, unexpected, misshaped, path=""):
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        lines = [f"checkpoint {path} does not match the model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {it}" for it in items]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- validation
def _canonical_tensors(tensors: Mapping[str, TensorInfo]) -> tuple[dict, list[str], dict]:
    """Splits a checkpoint's tensors into the text model's, by text-model name (layout
    prefixes rewritten, `hf_mapping.PREFIX_ALIASES`), and the vision half's, by on-disk name
    (`hf_mapping.VISION_PREFIXES`). Also returns the names that collide after rewriting
    (reported as unexpected), e.g. a checkpoint mixing two layouts."""
    out, dupes, vision = {}, [], {}
    for name, info in tensors.items():
        vname = hf_mapping.vision_name(name)
        if vname is not None:
            if vname in vision:
                dupes.append(f"{name} (duplicates {vision[vname].name})")
            vision[vname] = info
            continue
        canon = hf_mapping.canonical_name(name)
        if canon in out:
            dupes.append(f"{name} (duplicates {out[canon].name})")
        out[canon] = info
    return out, dupes, vision


def _check_entry(e: Entry, ckpt: dict, misshaped: list, missing: list) -> None:
    info = ckpt.get(e.hf_name)
    if info is None:
        missing.append(f"{e.hf_name} {list(e.hf_shape)} -> {e.path_str}")
        return
    if info.shape != e.hf_shape:
        misshaped.append(
            f"{e.hf_name}: checkpoint {list(info.shape)}, model expects "
            f"{list(e.hf_shape)} (-> {e.path_str})"
        )
    if info.dtype not in (*FLOAT_DTYPES, FP8):
        misshaped.append(
            f"{e.hf_name}: dtype {info.dtype} in the checkpoint, expected a float dtype "
            f"({', '.join(map(str, FLOAT_DTYPES))}) or block-FP8 float8_e4m3fn"
        )
    if info.dtype != FP8:
        return
    scale = ckpt.get(e.scale_name)
    if not e.quantizable:
        misshaped.append(
            f"{e.hf_name}: float8 in the checkpoint but this tensor is never "
            "quantized (router, norms, embedding, lm_head)"
        )
    elif scale is None:
        missing.append(f"{e.scale_name} {list(e.scale_shape(BLOCK))} (scales of fp8 {e.hf_name})")
    elif scale.shape != e.scale_shape(BLOCK) or scale.dtype != np.float32:
        misshaped.append(
            f"{e.scale_name}: checkpoint {scale.dtype}{list(scale.shape)}, "
            f"expected float32{list(e.scale_shape(BLOCK))}"
        )


def validate(table: list[Entry], ckpt: dict, dupes: list[str], path="") -> None:
    """Raises ONE `CheckpointMismatchError` listing every missing, unexpected and mis-shaped
    tensor (each tensor consumed once, each parameter filled once, every shape checked)."""
    missing: list[str] = []
    misshaped: list[str] = []
    consumed = set()
    for e in table:
        _check_entry(e, ckpt, misshaped, missing)
        consumed.add(e.hf_name)
        if e.hf_name in ckpt and ckpt[e.hf_name].dtype == FP8:
            consumed.add(e.scale_name)
    unexpected = [f"{n} {list(i.shape)}" for n, i in sorted(ckpt.items()) if n not in consumed]
    if missing or misshaped or unexpected or dupes:
        raise CheckpointMismatchError(missing, unexpected + dupes, misshaped, path)


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


# ----------------------------------------------------------------------------- loading
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
    host = read_tensor(info)
    finite = "contains NaN or inf"
    if info.dtype != FP8:
        if info.dtype != np.dtype(param_dtype) and info.nbytes <= HOST_CAST_BYTES:
            # Small tensors: cast on the host (same IEEE round-to-nearest-even as XLA's
            # convert) instead of compiling one device convert per distinct shape, which
            # dominated the demo model's start-up on CPU.
            host = host.astype(np.dtype(param_dtype))
        value = jax.device_put(e.transform.to_model(host, e.model_shape), target)
        if checks is not None:
            checks.append((info, finite, _all_finite(value)))
        return (value if value.dtype == param_dtype else value.astype(param_dtype)), info.nbytes
    sinfo = ckpt[e.scale_name]
    scale = jax.device_put(read_tensor(sinfo))
    nbytes = info.nbytes + sinfo.nbytes
    keep = fp8 == "keep"
    raw = jax.device_put(host.reshape(e.model_shape), target) if keep else jax.device_put(host)
    if checks is not None:
        checks.append((info, finite, _all_finite(raw)))
        checks.append((sinfo, "has a NaN, inf, zero or negative scale", _valid_scales(scale)))
    if not keep:
        fn = jax.jit(
            lambda v, s: dequantize_blocks(v, s, param_dtype).reshape(e.model_shape),
            out_shardings=target,
        )
        return fn(raw, scale), nbytes
    from step3_jax.quant_model import Fp8Weight

    scales = jax.device_put(scale, _scale_sharding(target))
    return Fp8Weight(raw, scales, num_contract=e.num_contract), nbytes


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


def read_config(path: str | Path) -> Step3Config:
    """`Step3Config` from a checkpoint directory's ``config.json``.

    Raises `CheckpointFormatError` naming the file (and, from `Step3Config`, the key) for
    malformed JSON, wrong types and out-of-range values."""
    return _config_from_hf(_read_hf_config(path), Path(path) / "config.json")


def _read_hf_config(path: str | Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}; pass config= explicitly")
    hf = integrity.load_json(cfg_path)
    if not isinstance(hf, dict):
        raise CheckpointFormatError(f"{cfg_path}: must hold a JSON object")
    return hf


def _config_from_hf(hf: dict, cfg_path: Path) -> Step3Config:
    try:
        return Step3Config.from_hf_config(hf)
    except KeyError as e:
        raise CheckpointFormatError(f"{cfg_path}: missing key {e}") from e
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointFormatError(f"{cfg_path}: {e}") from e


def verify_checkpoint(path: str | Path) -> bool:
    """Checks every file listed in the checkpoint's SHA-256 manifest (`save_hf` writes one).

    Returns False when the checkpoint has no manifest (nothing to verify); raises
    `CheckpointFormatError` naming the first file whose size or hash differs, or a shard the
    index names that the manifest does not cover."""
    path = Path(path)
    files = integrity.read_manifest(path)
    if files is None:
        return False
    named = {
        *shard_files(path)[1],
        *(n for n in (INDEX_FILE, "config.json") if (path / n).is_file()),
    }
    if unlisted := sorted(named - set(files)):
        raise CheckpointFormatError(
            f"{path / MANIFEST_FILE}: does not cover {unlisted} (files changed after saving?)"
        )
    integrity.verify_manifest(path, files)
    return True


def check_quantization_config(hf: Mapping) -> None:
    """Refuses, by name, a ``quantization_config`` this loader would misread.

    Supported: none, or block-FP8 as the release ships it (``quant_method: "fp8"``, dynamic
    activation scales, ``weight_block_size: [128, 128]``: one float32 ``weight_scale_inv`` per
    128x128 block). Other block shapes would silently mis-scale every weight, so they raise.
    The VL config keeps it at the top level; a text sub-config may carry its own.
    """
    for where, sub in (("", hf), ("text_config.", hf.get("text_config") or {})):
        q = sub.get("quantization_config")
        if q is None:
            continue
        method = q.get("quant_method", "fp8")
        if method != "fp8":
            raise ValueError(
                f"{where}quantization_config.quant_method={method!r} is not supported "
                "(step3_jax loads bf16/f32 and block-FP8 'fp8' checkpoints)"
            )
        fmt = q.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise ValueError(
                f"{where}quantization_config.fmt={fmt!r} is not supported (float8 e4m3 only)"
            )
        block = q.get("weight_block_size")
        if block is not None and [int(b) for b in block] != [BLOCK, BLOCK]:
            raise ValueError(
                f"{where}quantization_config.weight_block_size={list(block)} is not supported: "
                f"step3_jax's block-FP8 weights use [{BLOCK}, {BLOCK}] blocks"
            )
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"{where}quantization_config.activation_scheme={scheme!r} is not supported "
                "(step3_jax computes activation scales dynamically)"
            )


VisionLoader = Callable[[dict[str, TensorInfo]], object]


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
    hf_cfg = _read_hf_config(path) if config is None or (path / "config.json").is_file() else {}
    check_quantization_config(hf_cfg)
    cfg = config or _config_from_hf(hf_cfg, path / "config.json")
    target_of = resolve_sharding(sharding, mesh, specs)
    ckpt, dupes, vision_tensors = _canonical_tensors(index_checkpoint(path))
    table = hf_mapping.entries(cfg)
    validate(table, ckpt, dupes, path)
    abstract = nnx.eval_shape(
        lambda: Step3Model(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=dtype,
            param_dtype=param_dtype,
            policy=policy,
        )
    )
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    _check_table_covers_model(table, leaves)
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
    model = nnx.merge(graphdef, state)
    if fuse_qkv:
        from step3_jax.quant_model import fuse_qkv as fuse

        fuse(model)
    if vision is not None:
        vision(vision_tensors)
    return model


def _check_table_covers_model(table: list[Entry], leaves: dict) -> None:
    paths = {e.path for e in table}
    if paths != set(leaves) or len(paths) != len(table):
        raise RuntimeError(
            "hf_mapping.entries out of sync with Step3Model: no entry for "
            f"{sorted(map(str, set(leaves) - paths))}, no parameter for "
            f"{sorted(map(str, paths - set(leaves)))}"
        )
    for e in table:
        if tuple(leaves[e.path].get_value().shape) != e.model_shape:
            raise RuntimeError(
                f"hf_mapping: {e.path_str} is {leaves[e.path].get_value().shape} "
                f"in the model, table says {e.model_shape}"
            )


def _progress(total: int, enabled: bool | None):
    from tqdm.auto import tqdm

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


# ----------------------------------------------------------------------------- saving
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
    from step3_jax.quant_model import Fp8Weight

    if isinstance(value, Fp8Weight):
        if value.granularity != "block":
            raise ValueError(f"{e.path_str}: only block-scaled Fp8Weight has an HF layout")
        vals = np.asarray(jax.device_get(value.values)).reshape(e.hf_shape)
        return {e.hf_name: vals, e.scale_name: np.asarray(jax.device_get(value.scales))}
    host = np.asarray(jax.device_get(value))
    if dtype is not None:
        host = host.astype(np.dtype(dtype))
    return {e.hf_name: e.transform.to_hf(host, e.hf_shape)}


def _tensor_specs(table, values, dtype) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    from step3_jax.quant_model import Fp8Weight

    specs = []
    for e in table:
        v = values[e.path]
        if isinstance(v, Fp8Weight):
            specs.append((e.hf_name, FP8, e.hf_shape))
            specs.append((e.scale_name, np.dtype(np.float32), tuple(v.scales.shape)))
        else:
            specs.append((e.hf_name, np.dtype(dtype or v.dtype), e.hf_shape))
    return specs


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
    model's. Refuses to replace an existing checkpoint unless ``overwrite=True``.
    ``extra_tensors`` (HF name -> host array, written as is after the text model's) and
    ``extra_config`` (top-level keys; the text keys then nest under ``text_config``) carry the
    vision half of a VL model (`save_hf_vl`).

    Atomic: everything is written to a hidden sibling folder first, then swapped in by
    renames, then the old checkpoint is deleted (other files of the old folder, e.g. a
    tokenizer, are kept). A crash at any point leaves the old or the new checkpoint
    loadable by `load_hf`, never a mix. Returns the index dict.
    """
    dtype = _check_save_dtype(dtype)
    path = integrity.recover(Path(path).absolute())
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
    table = hf_mapping.entries(model.config)
    values = param_values(model)
    if set(values) != {e.path for e in table}:
        raise RuntimeError(
            "hf_mapping.entries out of sync with the model's params: "
            f"{sorted(map(str, set(values) ^ {e.path for e in table}))}"
        )
    specs = _tensor_specs(table, values, dtype)
    extra = dict(extra_tensors or {})
    specs += [(n, a.dtype, tuple(a.shape)) for n, a in extra.items()]
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

    staged = integrity.staging_dir(path)
    if staged.exists():
        shutil.rmtree(staged)  # left by an earlier save that died before its swap
    staged.mkdir(parents=True)
    integrity.fault_point("staging_created")
    writer = ShardWriter(staged, max_shard_bytes)
    index = writer.write(specs, get, {"producer": "step3_jax"})
    integrity.write_json_atomic(
        staged / "config.json", _hf_config(model, values, specs, dtype, extra_config)
    )
    integrity.fault_point("wrote_config")
    digests = {**writer.digests, **integrity.digest_files(staged, ["config.json"])}
    integrity.write_manifest(staged, digests)
    integrity.fault_point("wrote_manifest")
    integrity.replace_directory(staged, path, keep=lambda n: not _is_checkpoint_file(n))
    return index


def _hf_config(model, values, specs, dtype, extra_config=None) -> dict:
    hf_cfg = model.config.to_hf_config()
    stored = dtype or values[("norm", "weight")].dtype
    hf_cfg["torch_dtype"] = np.dtype(stored).name
    if any(s[1] == FP8 for s in specs):
        hf_cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
        }
    if extra_config is not None:
        top = {k: hf_cfg[k] for k in ("torch_dtype", "quantization_config") if k in hf_cfg}
        hf_cfg = {**extra_config, "text_config": hf_cfg, **top}
    return hf_cfg


def load_hf_vl(path: str | Path, config: Step3Config | None = None, vision_config=None, **kwargs):
    """The Step3-VL release: the text model as `load_hf` loads it (``kwargs`` as there) plus
    the vision tower, downsamplers and projector (`vision_mapping.load_vision`, bf16), as a
    `step3_jax.vision.Step3VLModel`."""
    from step3_jax.checkpoints import vision_mapping
    from step3_jax.vision.model import Step3VLModel

    found: dict[str, TensorInfo] = {}
    text = load_hf(path, config, vision=found.update, **kwargs)  # one pass over the index
    tensors = {name: read_tensor(info) for name, info in found.items()}
    dtypes = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
    vision = vision_mapping.load_vision(
        path, vision_config, tensors=tensors, policy=text.policy, **dtypes
    )
    return Step3VLModel(text, vision)


def save_hf_vl(model, path: str | Path, *, dtype=None, **kwargs) -> dict:
    """Writes a `Step3VLModel` in the release layout: `save_hf` of the text model plus the
    vision tensors (`vision_mapping.vision_tensors`) and the VL ``config.json`` keys."""
    from step3_jax.checkpoints import vision_mapping

    tensors = vision_mapping.vision_tensors(model.vision, dtype)
    vl_cfg = model.vision_config.to_hf_config()
    return save_hf(
        model.text, path, dtype=dtype, extra_tensors=tensors, extra_config=vl_cfg, **kwargs
    )


__all__ = [
    "CheckpointMismatchError",
    "FP8_MODES",
    "VisionLoader",
    "check_quantization_config",
    "dequantize_blocks",
    "load_hf",
    "load_hf_vl",
    "param_values",
    "read_config",
    "resolve_sharding",
    "save_hf",
    "save_hf_vl",
    "validate",
    "verify_checkpoint",
]
