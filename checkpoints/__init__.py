"""Checkpoints: HF safetensors in/out, orbax save/restore, the shipped demo model.

* `load_hf` / `save_hf`: Hugging Face layout (config.json + sharded safetensors + index),
  bf16/f32 or block-FP8, streamed tensor by tensor onto any sharding. `load_hf_vl` /
  `save_hf_vl`: the same plus the Step3-VL vision half (`vision_mapping`). Modules:
  `hf_mapping` (the name table), `hf_config` (config.json), `hf_validate` (checks before a
  load reads data), `hf_load`, `hf_save`, `hf_vl`.
* `CheckpointManager` (and `save_orbax` / `restore_orbax`): orbax checkpoints of model (and
  optimizer) state, restorable onto a different mesh.
* `load_demo`: the small Step-3-architecture model trained on Jane Austen that ships here.
* `load_tokenizer`: a ``tokenizer.json`` (the demo's or a real Step-3 one).
"""

from step3_jax.checkpoints.demo import load_demo
from step3_jax.checkpoints.hf_load import dequantize_blocks, load_hf
from step3_jax.checkpoints.hf_save import save_hf
from step3_jax.checkpoints.hf_validate import CheckpointMismatchError
from step3_jax.checkpoints.hf_vl import load_hf_vl, save_hf_vl
from step3_jax.checkpoints.orbax_io import (
    CheckpointManager,
    abstract_like,
    abstract_state,
    restore_orbax,
    save_orbax,
)
from step3_jax.checkpoints.safetensors_io import CheckpointFormatError
from step3_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointFormatError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "Tokenizer",
    "abstract_like",
    "abstract_state",
    "dequantize_blocks",
    "load_demo",
    "load_hf",
    "load_hf_vl",
    "load_tokenizer",
    "restore_orbax",
    "save_hf",
    "save_hf_vl",
    "save_orbax",
]
