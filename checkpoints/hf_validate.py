"""Checks `load_hf` runs before it reads any tensor data.

* `verify_checkpoint`: every file against the SHA-256 manifest `save_hf` writes.
* `split_tensors` + `validate`: the checkpoint's safetensors headers against the declarative
  table (`hf_mapping.entries`): each tensor consumed once, each parameter filled once, every
  shape and dtype checked, all problems raised at once as ONE `CheckpointMismatchError`.
* `check_table_matches_model`: the table against the abstract `Step3Model` (a library bug,
  not a checkpoint problem, if it fails).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from step3_jax.checkpoints import hf_mapping, integrity
from step3_jax.checkpoints.hf_mapping import BLOCK, FLOAT_DTYPES, FP8, Entry
from step3_jax.checkpoints.integrity import MANIFEST_FILE, CheckpointFormatError
from step3_jax.checkpoints.safetensors_io import INDEX_FILE, TensorInfo, shard_files

# Problems listed per kind in an error message: a corrupt config (a million layers) must give
# a readable message of bounded size, not one line per tensor it would have wanted.
MAX_LISTED = 20


def capped(items, limit: int = MAX_LISTED) -> list[str]:
    """The first ``limit`` items as strings, then one line saying how many more there are."""
    items = list(items)
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return [str(it) for it in items[:limit]] + more


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
                lines += [f"    {it}" for it in capped(items)]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- integrity
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


# ----------------------------------------------------------------------------- headers
def split_tensors(tensors: Mapping[str, TensorInfo]) -> tuple[dict, list[str], dict]:
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
    """Appends the problems of one table entry (and its FP8 scale) to the two lists."""
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


# ----------------------------------------------------------------------------- table vs model
def check_table_matches_model(table: list[Entry], leaves: dict) -> None:
    """RuntimeError unless the table's entries and the model's param leaves (``{NNX path:
    Variable}``) pair up one to one with equal shapes."""
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


__all__ = [
    "MAX_LISTED",
    "CheckpointMismatchError",
    "capped",
    "check_table_matches_model",
    "split_tensors",
    "validate",
    "verify_checkpoint",
]
