"""Orbax checkpoints of a model's parameters (and optimizer state), restorable on any mesh.

`CheckpointManager` is a small wrapper over ``orbax.checkpoint.CheckpointManager`` that:

* saves the NNX parameter state (``"params"``) and optionally any optimizer-state pytree
  (``"opt_state"``) under one step;
* restores onto whatever sharding the caller asks for: targets are ``jax.ShapeDtypeStruct``
  with ``.sharding`` (`abstract_state` builds them from an abstract model and a
  ``path -> Sharding`` callback), so a checkpoint written on one mesh loads on another;
* never overwrites: saving an existing step raises ``FileExistsError``;
* turns a missing step into ``FileNotFoundError`` (listing the steps that exist) and a corrupt
  one into `CheckpointFormatError`.

Atomicity comes from orbax: a step is written to ``<step>.orbax-checkpoint-tmp`` and renamed
only once complete, so an interrupted save is never listed nor restorable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from step3_jax.checkpoints.safetensors_io import CheckpointFormatError

PARAMS, OPT_STATE = "params", "opt_state"


def path_name(path) -> str:
    """``layers.3.ffn.up_proj`` from a pytree key path of an NNX state (the Variable's
    ``.value`` attribute key is dropped, so names match `step3_jax.checkpoints.hf_mapping`
    paths)."""
    parts = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in parts)


def abstract_state(model: nnx.Module, sharding: Callable[[str], Any] | None = None) -> nnx.State:
    """The parameter state of ``model`` (concrete or from `nnx.eval_shape`) as
    ``ShapeDtypeStruct`` leaves carrying ``sharding(path)`` (default: first device)."""
    state = nnx.state(model, nnx.Param)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(path, x):
        name = path_name(path)
        s = (sharding(name) if sharding else None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree_util.tree_map_with_path(leaf, state)


def abstract_like(tree, sharding: Callable[[Any], Any] | None = None):
    """``ShapeDtypeStruct`` targets for any pytree of arrays (e.g. an optax state); leaves
    keep their current sharding unless ``sharding(leaf)`` gives another."""

    def leaf(x):
        s = sharding(x) if sharding else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(leaf, tree)


class CheckpointManager:
    """Step-numbered orbax checkpoints of params (+ optimizer state) in ``directory``.

    Args:
      directory: created if absent.
      max_to_keep: older steps are deleted after a successful save (None: keep all).
      async_save: return from `save` before the write finishes (call `wait`).
    """

    def __init__(
        self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = False
    ):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Completed steps only (interrupted saves are invisible)."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, model: nnx.Module, opt_state: Any = None) -> None:
        """Saves the parameters of ``model`` (and ``opt_state``) as ``step``."""
        if step in self.all_steps():
            raise FileExistsError(
                f"step {step} already exists in {self.directory}; refusing to overwrite it"
            )
        items = {PARAMS: ocp.args.StandardSave(nnx.state(model, nnx.Param))}
        if opt_state is not None:
            items[OPT_STATE] = ocp.args.StandardSave(opt_state)
        if not self._mgr.save(step, args=ocp.args.Composite(**items), force=True):
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")

    def wait(self) -> None:
        """Blocks until an async save has finished."""
        self._mgr.wait_until_finished()

    def restore(
        self, step: int | None, params_target: nnx.State, opt_state_target: Any = None
    ) -> tuple[nnx.State, Any]:
        """``(params, opt_state)`` of ``step`` (None: latest) placed as the targets' shardings.

        Targets are pytrees of ``ShapeDtypeStruct`` (see `abstract_state`, `abstract_like`);
        ``opt_state`` is None when ``opt_state_target`` is None.
        """
        steps = self.all_steps()
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in "
                f"{self.directory} (complete steps: {steps})"
            )
        items = {PARAMS: ocp.args.StandardRestore(params_target)}
        if opt_state_target is not None:
            items[OPT_STATE] = ocp.args.StandardRestore(opt_state_target)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(
                f"checkpoint step {step} in {self.directory} is "
                f"corrupt or does not match the target: {e}"
            ) from e
        return out[PARAMS], out.get(OPT_STATE) if opt_state_target is not None else None

    def restore_model(
        self,
        abstract_model: nnx.Module,
        step: int | None = None,
        sharding: Callable[[str], Any] | None = None,
    ) -> nnx.Module:
        """A ready model: ``abstract_model`` (from `nnx.eval_shape`) filled from ``step``,
        each parameter placed with ``sharding(path)``."""
        params, _ = self.restore(step, abstract_state(abstract_model, sharding))
        graphdef, _, rest = nnx.split(abstract_model, nnx.Param, ...)
        return nnx.merge(graphdef, params, rest)

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_orbax(directory: str | Path, step: int, model: nnx.Module, opt_state=None) -> None:
    """One-shot `CheckpointManager.save` (keeps every step)."""
    with CheckpointManager(directory, max_to_keep=None) as mgr:
        mgr.save(step, model, opt_state)


def restore_orbax(
    directory: str | Path,
    abstract_model: nnx.Module,
    step: int | None = None,
    sharding: Callable[[str], Any] | None = None,
) -> nnx.Module:
    """One-shot `CheckpointManager.restore_model`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no orbax checkpoint directory at {directory}")
    with CheckpointManager(directory, max_to_keep=None) as mgr:
        return mgr.restore_model(abstract_model, step, sharding)


__all__ = [
    "CheckpointManager",
    "abstract_like",
    "abstract_state",
    "path_name",
    "restore_orbax",
    "save_orbax",
]
