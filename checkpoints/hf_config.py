"""A checkpoint's ``config.json`` <-> `Step3Config`, both ways.

Reading names the file (and, from `Step3Config.from_hf_config`, the key) in every error, and
refuses a ``quantization_config`` the loader would misread (`check_quantization_config`);
`config_json` is the dict `step3_jax.checkpoints.hf_save.save_hf` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from step3_jax.checkpoints import integrity
from step3_jax.checkpoints.hf_mapping import BLOCK
from step3_jax.checkpoints.integrity import CheckpointFormatError
from step3_jax.config import Step3Config, brief, is_int, mapping_or_none


# ----------------------------------------------------------------------------- reading
def read_config(path: str | Path) -> Step3Config:
    """`Step3Config` from a checkpoint directory's ``config.json``.

    Raises `CheckpointFormatError` naming the file (and, from `Step3Config`, the key) for
    malformed JSON, wrong types and out-of-range values."""
    return config_from_hf(read_hf_config(path), Path(path) / "config.json")


def read_hf_config(path: str | Path) -> dict:
    """The raw JSON object of ``path / "config.json"`` (FileNotFoundError if absent)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}; pass config= explicitly")
    hf = integrity.load_json(cfg_path)
    if not isinstance(hf, dict):
        raise CheckpointFormatError(f"{cfg_path}: must hold a JSON object")
    return hf


def config_from_hf(hf: dict, cfg_path: Path) -> Step3Config:
    """`Step3Config.from_hf_config` with its errors re-raised naming ``cfg_path``."""
    try:
        return Step3Config.from_hf_config(hf)
    except KeyError as e:
        raise CheckpointFormatError(f"{cfg_path}: missing key {e}") from e
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointFormatError(f"{cfg_path}: {e}") from e


def load_config(path: Path, config: Step3Config | None) -> Step3Config:
    """The config a load uses: ``config`` if given, else ``path / "config.json"``.

    A ``config.json`` present beside an explicit ``config`` is still read, for its
    ``quantization_config`` (`check_quantization_config`)."""
    hf_cfg = read_hf_config(path) if config is None or (path / "config.json").is_file() else {}
    try:
        check_quantization_config(hf_cfg)
    except ValueError as e:
        raise CheckpointFormatError(f"{path / 'config.json'}: {e}") from e
    return config or config_from_hf(hf_cfg, path / "config.json")


def check_quantization_config(hf: Mapping) -> None:
    """Refuses, by name, a ``quantization_config`` this loader would misread.

    Supported: none, or block-FP8 as the release ships it (``quant_method: "fp8"``, dynamic
    activation scales, ``weight_block_size: [128, 128]``: one float32 ``weight_scale_inv`` per
    128x128 block). Other block shapes would silently mis-scale every weight, so they raise.
    The VL config keeps it at the top level; a text sub-config may carry its own.
    """
    text = mapping_or_none(hf.get("text_config"), "text_config")
    for where, sub in (("", hf), ("text_config.", text)):
        q = mapping_or_none(sub.get("quantization_config"), f"{where}quantization_config")
        if not q:
            continue
        method = q.get("quant_method", "fp8")
        if method != "fp8":
            raise ValueError(
                f"{where}quantization_config.quant_method={brief(method)} is not supported "
                "(step3_jax loads bf16/f32 and block-FP8 'fp8' checkpoints)"
            )
        fmt = q.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise ValueError(
                f"{where}quantization_config.fmt={brief(fmt)} is not supported (float8 e4m3 only)"
            )
        block = q.get("weight_block_size")
        if block is not None and not (
            isinstance(block, (list, tuple))
            and len(block) == 2
            and all(is_int(b) and b == BLOCK for b in block)
        ):
            shown = brief(list(block) if isinstance(block, tuple) else block)
            raise ValueError(
                f"{where}quantization_config.weight_block_size={shown} is not supported: "
                f"step3_jax's block-FP8 weights use [{BLOCK}, {BLOCK}] blocks"
            )
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"{where}quantization_config.activation_scheme={brief(scheme)} is not supported "
                "(step3_jax computes activation scales dynamically)"
            )


# ----------------------------------------------------------------------------- writing
def config_json(
    config: Step3Config, *, torch_dtype, block_fp8: bool, extra_config: Mapping | None = None
) -> dict:
    """The ``config.json`` of a saved checkpoint.

    ``torch_dtype``: the float dtype the params are stored in; ``block_fp8``: some tensors are
    block-FP8 (adds the release's ``quantization_config``, which `check_quantization_config`
    accepts). With ``extra_config`` (the VL keys) the text keys nest under ``text_config``,
    and ``torch_dtype`` / ``quantization_config`` stay at the top level, as in the release.
    """
    hf_cfg = config.to_hf_config()
    hf_cfg["torch_dtype"] = np.dtype(torch_dtype).name
    if block_fp8:
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


__all__ = [
    "check_quantization_config",
    "config_from_hf",
    "config_json",
    "load_config",
    "read_config",
    "read_hf_config",
]
