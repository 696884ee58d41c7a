"""Issue 15, orbax: invalid step numbers, a flipped byte and a truncated array file.

At b4ff9dc ``save_orbax`` accepted steps -1, "abc" and 1.5 (a checkpoint that could never be
restored), a flipped byte in an array file restored silently, and a truncated one raised a
bare ``Exception`` carrying a TensorStore dump.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from rel_fixtures import abstract_model, build_model, model_leaf, tiny_config

from step3_jax.checkpoints import (
    CheckpointFormatError,
    CheckpointManager,
    restore_orbax,
    save_orbax,
)

CFG = tiny_config()


def _abstract():
    return abstract_model(CFG)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model(CFG, seed=4)
    directory = tmp_path_factory.mktemp("orbax")
    save_orbax(directory, 0, model)
    return directory, model


@pytest.mark.parametrize("step", [-1, "abc", 1.5, True, None])
def test_save_orbax_rejects_invalid_steps(tmp_path, step):
    with pytest.raises(ValueError, match="step"):
        save_orbax(tmp_path, step, build_model(CFG))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("step", [-1, "abc", 2.0])
def test_restore_orbax_rejects_invalid_steps(saved, step):
    with pytest.raises(ValueError, match="step"):
        restore_orbax(saved[0], _abstract(), step)


@pytest.mark.parametrize("keep", [0, -1, 2.5, True, "3"])
def test_checkpoint_manager_rejects_invalid_max_to_keep(tmp_path, keep):
    """0 used to delete every step right after saving it; 2.5 was accepted."""
    with pytest.raises(
        ValueError, match=r"max_to_keep must be None .* >= 1, got " + re.escape(repr(keep))
    ):
        CheckpointManager(tmp_path / "ck", max_to_keep=keep)
    assert not (tmp_path / "ck").exists()


def test_checkpoint_manager_accepts_a_numpy_integer_max_to_keep(tmp_path):
    model = build_model(CFG)
    with CheckpointManager(tmp_path, max_to_keep=np.int64(2)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, model)
        assert mgr.all_steps() == [2, 3]


def _array_files(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    return sorted(files, key=lambda p: p.stat().st_size)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_in_an_orbax_array_is_detected(saved, tmp_path):
    directory = _copy(saved[0], tmp_path / "ck")
    big = _array_files(directory / "0")[-1]  # the largest data file holds weights
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x01
    big.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=f"{big.name}.*SHA-256"):
        restore_orbax(directory, _abstract())


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_orbax_array_is_a_format_error(saved, tmp_path, verify):
    directory = _copy(saved[0], tmp_path / "ck")
    big = _array_files(directory / "0")[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="step 0|bytes") as info:
        restore_orbax(directory, _abstract(), verify=verify)
    assert "\n" not in str(info.value)  # one line, no TensorStore dump


def test_intact_orbax_checkpoint_restores_bitwise(saved):
    directory, model = saved
    restored = restore_orbax(directory, _abstract())
    for path in [("layers", 1, "ffn", "up_proj"), ("embed_tokens",)]:
        np.testing.assert_array_equal(model_leaf(restored, path), model_leaf(model, path))
