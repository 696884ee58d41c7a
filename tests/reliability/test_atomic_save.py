"""Issue 15, lost checkpoints: a save killed at any step leaves the old or the new one.

At b4ff9dc ``save_hf(overwrite=True)`` deleted the old checkpoint before writing the new one
(a kill in between lost both) and wrote config.json after the index (a kill in between
loaded the new weights with the old config). Here every numbered step of a save
(`step3_jax.checkpoints.integrity.fault_point`) is a crash point:

* fast (default run): in-process, the hook raises at each of the ~50 points of
  ``save_hf(overwrite=True)`` and at each point of ``save_orbax``;
* slow: a subprocess is SIGKILLed at each distinct step name (and, for orbax, also at
  timed moments inside orbax's own write).

After each crash the directory must load as exactly the old or exactly the new checkpoint:
weights AND config of one of them, never a mix, and files beside the checkpoint (a
tokenizer) survive.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from rel_fixtures import REFERENCE, abstract_model, build_model, model_leaf, tiny_config

from step3_jax.checkpoints import integrity, load_hf, restore_orbax, save_hf, save_orbax
from step3_jax.checkpoints.hf_config import read_config
from step3_jax.checkpoints.hf_validate import verify_checkpoint
from step3_jax.checkpoints.safetensors_io import index_checkpoint, read_tensor
from step3_jax.config import Step3Config

OLD_CFG = tiny_config()
NEW_CFG = dataclasses.replace(OLD_CFG, rms_norm_eps=1e-6)  # same shapes: a mix would load
PROBE = ("layers", 1, "ffn", "up_proj")
HERE = Path(__file__).parent


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so no handler in the library catches it."""


@pytest.fixture(scope="module")
def models():
    return build_model(OLD_CFG, seed=1), build_model(NEW_CFG, seed=2)


def _fresh_old(path: Path, old_model, template: Path | None = None) -> None:
    """The old checkpoint (+ a tokenizer) at ``path``; copied from ``template`` if given."""
    if template is not None:
        shutil.copytree(template, path)
        return
    save_hf(old_model, path)
    (path / "tokenizer.json").write_text('{"kept": true}')


def _assert_old_or_new(path: Path, models) -> str:
    loaded = load_hf(path, dtype=jnp.float32, param_dtype=jnp.float32, policy=REFERENCE)
    assert (path / "tokenizer.json").read_text() == '{"kept": true}'
    probe = model_leaf(loaded, PROBE)
    for name, model in zip(("old", "new"), models, strict=True):
        if np.array_equal(probe, model_leaf(model, PROBE)):
            assert loaded.config == model.config, f"{name} weights with the other's config"
            for path_ in [("embed_tokens",), ("lm_head",), ("layers", 0, "self_attn", "wq")]:
                np.testing.assert_array_equal(model_leaf(loaded, path_), model_leaf(model, path_))
            return name
    raise AssertionError("the checkpoint is neither the old nor the new one")


def _steps_of(fn) -> list[str]:
    steps: list[str] = []
    integrity.FAULT_HOOK = steps.append
    try:
        fn()
    finally:
        integrity.FAULT_HOOK = None
    return steps


def _crash_at(k: int):
    calls = [0]

    def hook(step):
        calls[0] += 1
        if calls[0] == k + 1:
            raise Crash(step)

    return hook


def _read_all(path: Path) -> tuple[dict, Step3Config]:
    """What `load_hf` reads, at the file level: recovery, the manifest check, config.json
    and every tensor's bytes (cheap enough to run after each of ~50 crashes)."""
    integrity.recover(path)
    assert verify_checkpoint(path)
    tensors = {n: read_tensor(i).tobytes() for n, i in index_checkpoint(path).items()}
    return tensors, read_config(path)


def test_save_hf_overwrite_crash_at_every_step_leaves_old_or_new(tmp_path, models):
    old, new = models
    probe_dir = tmp_path / "probe"
    _fresh_old(probe_dir, old)
    expected = {"old": _read_all(probe_dir)}
    steps = _steps_of(lambda: save_hf(new, probe_dir, overwrite=True, max_shard_bytes=40_000))
    expected["new"] = _read_all(probe_dir)
    assert {"wrote_index", "wrote_config", "moved_old_aside", "renamed_new"} <= set(steps)
    assert len(steps) > 20
    swap = steps.index("renamed_new")
    _fresh_old(tmp_path / "template", old)
    for k in range(len(steps)):
        path = tmp_path / f"ck{k}"
        _fresh_old(path, old, tmp_path / "template")
        integrity.FAULT_HOOK = _crash_at(k)
        try:
            with pytest.raises(Crash):
                save_hf(new, path, overwrite=True, max_shard_bytes=40_000)
        finally:
            integrity.FAULT_HOOK = None
        # Before the swap every crash leaves the old checkpoint, after it the new one:
        # all tensors AND the config of that one.
        assert _read_all(path) == expected["old" if k < swap else "new"], steps[k]
        assert (path / "tokenizer.json").read_text() == '{"kept": true}'
        if k in (swap - 1, swap):  # the full load at both sides of the swap
            assert _assert_old_or_new(path, models) == ("old" if k < swap else "new")


def test_save_hf_after_a_crash_cleans_up_and_succeeds(tmp_path, models):
    old, new = models
    _fresh_old(tmp_path / "ck", old)
    integrity.FAULT_HOOK = _crash_at(
        _steps_of(lambda: save_hf(new, tmp_path / "ck", overwrite=True)).index("moved_old_aside")
    )
    try:
        with pytest.raises(Crash):
            save_hf(new, tmp_path / "ck", overwrite=True)
    finally:
        integrity.FAULT_HOOK = None
    assert not (tmp_path / "ck").exists()  # the window between the two renames
    save_hf(new, tmp_path / "ck", overwrite=True)  # recovers the old one, then replaces it
    assert _assert_old_or_new(tmp_path / "ck", models) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging or old leftovers


@pytest.mark.parametrize("leftover", [".ck.old", ".ck.partial"])
def test_save_hf_unlinks_a_leftover_symlink_without_following_it(tmp_path, models, leftover):
    """A symlink where the swap keeps its ``.old``/``.partial`` folder (what an earlier
    save through a symlinked path left behind) is unlinked, never rmtree'd or followed."""
    old, new = models
    _fresh_old(tmp_path / "ck", old)
    (tmp_path / "run5").mkdir()
    (tmp_path / "run5" / "keep.txt").write_text("mine")
    os.symlink("run5", tmp_path / leftover)
    save_hf(new, tmp_path / "ck", overwrite=True)  # was: OSError: rmtree on a symbolic link
    assert _assert_old_or_new(tmp_path / "ck", models) == "new"
    assert (tmp_path / "run5" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "run5"]


def _abstract():
    return abstract_model(OLD_CFG)


def _assert_orbax_old_or_new(directory: Path, models) -> None:
    old, new = models
    step0 = restore_orbax(directory, _abstract(), 0)
    np.testing.assert_array_equal(model_leaf(step0, PROBE), model_leaf(old, PROBE))
    if (directory / "1").is_dir():
        step1 = restore_orbax(directory, _abstract(), 1)
        np.testing.assert_array_equal(model_leaf(step1, PROBE), model_leaf(new, PROBE))


def test_save_orbax_crash_at_every_step_keeps_old_steps(tmp_path, models):
    old, new = models
    save_orbax(tmp_path / "probe", 0, old)
    steps = _steps_of(lambda: save_orbax(tmp_path / "probe", 1, new))
    assert steps == ["orbax_save", "orbax_saved", "orbax_wrote_manifest"]
    for k in range(len(steps)):
        directory = tmp_path / f"o{k}"
        save_orbax(directory, 0, old)
        integrity.FAULT_HOOK = _crash_at(k)
        try:
            with pytest.raises(Crash):
                save_orbax(directory, 1, new)
        finally:
            integrity.FAULT_HOOK = None
        _assert_orbax_old_or_new(directory, models)


# ----------------------------------------------------------------------------- SIGKILL
CHILD = textwrap.dedent(
    """
    import dataclasses, os, signal, sys, threading
    from rel_fixtures import build_model, tiny_config
    from step3_jax.checkpoints import integrity, save_hf, save_orbax

    kind, path, target, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    new = build_model(dataclasses.replace(tiny_config(), rms_norm_eps=1e-6), seed=2)
    seen = {}

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(step):
        seen[step] = seen.get(step, 0) + 1
        if step == target and seen[step] == 1:
            if delay > 0:  # a kill `delay` seconds later: inside orbax's own write
                threading.Timer(delay, kill).start()
            else:
                kill()

    integrity.FAULT_HOOK = hook
    if kind == "hf":
        save_hf(new, path, overwrite=True, max_shard_bytes=40_000)
    else:
        save_orbax(path, 1, new)
    """
)


def _kill_child(kind: str, path: Path, target: str, delay: float = 0.0) -> int:
    env = {**os.environ, "PYTHONPATH": str(HERE), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", CHILD, kind, str(path), target, str(delay)]
    return subprocess.run(cmd, env=env, timeout=300, capture_output=True).returncode


@pytest.mark.slow
def test_sigkill_at_each_save_hf_step_leaves_old_or_new(tmp_path, models):
    old, new = models
    _fresh_old(tmp_path / "probe", old)
    steps = _steps_of(
        lambda: save_hf(new, tmp_path / "probe", overwrite=True, max_shard_bytes=40_000)
    )
    # Each distinct step at its first occurrence (shards: the first and the last one).
    shards = [s for s in dict.fromkeys(steps) if s.startswith("wrote_shard_")]
    targets = [s for s in dict.fromkeys(steps) if s not in shards[1:-1]]
    for i, step in enumerate(targets):
        path = tmp_path / f"ck{i}"
        _fresh_old(path, old)
        assert _kill_child("hf", path, step) == -signal.SIGKILL, step
        expect = "old" if steps.index(step) < steps.index("renamed_new") else "new"
        assert _assert_old_or_new(path, models) == expect, step


@pytest.mark.slow
def test_sigkill_during_save_orbax_keeps_old_steps(tmp_path, models):
    old, _ = models
    cases = [(s, 0.0) for s in ("orbax_save", "orbax_saved", "orbax_wrote_manifest")]
    cases += [("orbax_save", d) for d in (0.05, 0.3)]  # inside orbax's own write
    for i, (step, delay) in enumerate(cases):
        directory = tmp_path / f"o{i}"
        save_orbax(directory, 0, old)
        _kill_child("orbax", directory, step, delay)
        _assert_orbax_old_or_new(directory, models)
