"""`load_hf_vl` / `save_hf_vl`: the Step3-VL release <-> `Step3VLModel`.

The text model goes through `load_hf` / `save_hf`; the vision tower, downsamplers and
projector through their own declarative table (`vision_mapping`), in the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from step3_jax.checkpoints import integrity, vision_mapping
from step3_jax.checkpoints.hf_load import load_hf
from step3_jax.checkpoints.hf_save import save_hf
from step3_jax.checkpoints.safetensors_io import TensorInfo, read_tensor
from step3_jax.config import Step3Config
from step3_jax.vision.model import Step3VLModel


def load_hf_vl(path: str | Path, config: Step3Config | None = None, vision_config=None, **kwargs):
    """The Step3-VL release: the text model as `load_hf` loads it (``kwargs`` as there) plus
    the vision tower, downsamplers and projector (`vision_mapping.load_vision`, bf16), as a
    `step3_jax.vision.Step3VLModel`.

    The vision half of ``config.json`` is read and checked first (`CheckpointFormatError`
    naming the file and the key), before the text model's weights are read."""
    integrity.recover(Path(path))  # as `load_hf` does first: config.json may be in .<name>.old
    vision_config = vision_config or vision_mapping.read_vision_config(path)
    found: dict[str, TensorInfo] = {}
    text = load_hf(path, config, vision=found.update, **kwargs)  # one pass over the index
    tensors = {name: read_tensor(info) for name, info in found.items()}
    dtypes = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
    vision = vision_mapping.load_vision(
        path, vision_config, tensors=tensors, policy=text.policy, **dtypes
    )
    return Step3VLModel(text, vision)


def save_hf_vl(model: Step3VLModel, path: str | Path, *, dtype=None, **kwargs) -> dict:
    """Writes a `Step3VLModel` in the release layout: `save_hf` of the text model plus the
    vision tensors (`vision_mapping.vision_tensors`) and the VL ``config.json`` keys."""
    tensors = vision_mapping.vision_tensors(model.vision, dtype)
    vl_cfg = model.vision_config.to_hf_config()
    return save_hf(
        model.text, path, dtype=dtype, extra_tensors=tensors, extra_config=vl_cfg, **kwargs
    )


__all__ = ["load_hf_vl", "save_hf_vl"]
