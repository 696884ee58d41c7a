"""Import hygiene: one namespace, no cycles, leaf modules stay leaves.

* An installed step3-jax puts only ``step3_jax`` into site-packages: the repository's
  top-level ``sharding/``, ``checkpoints/`` and ``pallas_kernels/`` install as
  ``step3_jax.sharding``, ``step3_jax.checkpoints`` and ``step3_jax.kernels``.
* Importing the FP8 formats (``step3_jax.quant``) or a kernel package does not import the
  model (``step3_jax/__init__`` is lazy), so the kernels never depend on the model.
Each import check runs in a fresh interpreter (this process has everything loaded already).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_only_step3_jax_is_installed_top_level():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = cfg["packages"]
    assert {p.split(".")[0] for p in packages} == {"step3_jax"}
    assert cfg["package-dir"] == {
        "step3_jax.sharding": "sharding",
        "step3_jax.checkpoints": "checkpoints",
        "step3_jax.kernels": "pallas_kernels",
    }
    # Every folder with an __init__.py under the mapped roots is listed (nothing left out).
    roots = {
        "step3_jax": ROOT / "step3_jax",
        **{k: ROOT / v for k, v in cfg["package-dir"].items()},
    }
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
    assert found == set(packages), sorted(found ^ set(packages))


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import step3_jax.quant",
        "import step3_jax.kernels.mfa_decode",
        "import step3_jax.kernels.grouped_gemm",
        "import step3_jax",
    ],
)
def test_leaves_do_not_import_the_model(statement):
    loaded = _loaded_after(statement)
    heavy = {"step3_jax.model", "step3_jax.decode", "step3_jax.sharding", "step3_jax.checkpoints"}
    assert not heavy & loaded, sorted(heavy & loaded)
    assert not {"sharding", "checkpoints", "pallas_kernels"} & loaded


def test_lazy_public_names_resolve():
    import step3_jax as s3

    assert s3.Step3Model.__module__ == "step3_jax.model"
    assert s3.KernelPolicy().attention is None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = s3.nope
