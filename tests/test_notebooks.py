"""Executes every colab/*.ipynb top to bottom on CPU (what CI runs on the tiny config).

A notebook fails the test if any cell raises. Needs nbclient, nbformat and an ipykernel
"python3" kernel (the dev extras); skipped with the reason where they are missing (e.g. on the
offline GPU machines). The kernel runs in the repository root, so ``import step3_jax`` finds
the working tree and the notebooks' guarded install cell does nothing.
"""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _missing_tools() -> str | None:
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError as e:
        return f"notebook tools not installed ({e.name}); pip install -e '.[dev]'"
    if "python3" not in KernelSpecManager().find_kernel_specs():
        return "no 'python3' Jupyter kernel (python -m ipykernel install --sys-prefix)"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The kernel subprocess inherits the environment (XLA_FLAGS from conftest included).
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors


def test_notebooks_are_found():
    assert any(p.name == "01_quickstart.ipynb" for p in NOTEBOOKS)
