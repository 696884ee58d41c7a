"""The colab/ notebooks: executed top to bottom on CPU, as committed, and once from scratch.

* `test_notebook_executes`: every colab/*.ipynb in a kernel whose working directory is the
  repository root, with STEP3_JAX_SOURCE pointing at this checkout (the install cell then finds
  step3_jax importable and does nothing).
* `test_fresh_venv_runs_the_install_cell`: a new `python3 -m venv`, Jupyter's kernel tools, and
  a notebook run OUTSIDE the checkout, so its own install cell installs step3_jax (and a CPU
  jax) from STEP3_JAX_SOURCE = this checkout; then the shipped demo model must load.
* `test_committed_notebooks_match_their_source`: colab/_build_notebooks.py is the source.

Needs nbclient, nbformat and ipykernel (the dev extras); skipped with the reason where they are
missing (e.g. on the offline GPU machines), and the fresh-venv test also with
STEP3_JAX_OFFLINE=1 (it installs from the package index).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
FRESH_NOTEBOOK = "03_cost_model.ipynb"  # the quickest; every notebook has the same install cell


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


def _errors(nb) -> list:
    return [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


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
    monkeypatch.setenv("STEP3_JAX_SOURCE", str(ROOT))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    assert not _errors(nb), _errors(nb)


@pytest.mark.slow
def test_fresh_venv_runs_the_install_cell(tmp_path: pathlib.Path):
    reason = _missing_tools()
    if reason or os.environ.get("STEP3_JAX_OFFLINE") == "1":
        pytest.skip(reason or "STEP3_JAX_OFFLINE=1")
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    work = tmp_path / "work"  # not the checkout: `import step3_jax` must fail until installed
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(STEP3_JAX_SOURCE=str(ROOT), JAX_PLATFORMS="cpu")
    # Every pip in this test, the install cell's included: no byte-compiling of the installed
    # packages (jax, jaxlib, scipy... ~1/3 of the install time; Python compiles the modules
    # it imports on first import anyway) and no index query for a newer pip. `PIP_COMPILE=0`
    # is `--compile` set off (`PIP_NO_COMPILE=1` would, by pip's env-var rule, turn it ON).
    env.update(PIP_COMPILE="0", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*cmd: str, timeout: int = 900) -> str:
        proc = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run(sys.executable, "-m", "venv", str(venv))
    run(str(py), "-m", "pip", "install", "-q", "ipykernel", "nbclient", "nbformat")
    run(str(py), "-m", "ipykernel", "install", "--sys-prefix", "--name", "step3fresh")
    assert "absent" in run(
        str(py), "-c", "import importlib.util as u; print(u.find_spec('step3_jax') or 'absent')"
    )
    executed = tmp_path / "executed.ipynb"
    driver = (
        "import sys, nbformat\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "NotebookClient(nb, timeout=900, kernel_name='step3fresh',\n"
        "               resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "nbformat.write(nb, sys.argv[3])\n"
    )
    run(str(py), "-c", driver, str(ROOT / "colab" / FRESH_NOTEBOOK), str(work), str(executed))
    import nbformat

    assert not _errors(nbformat.read(executed, as_version=4))
    # Installed (not editable) into the venv, with the demo checkpoint as package data.
    out = run(
        str(py),
        "-c",
        "import step3_jax, jax; from step3_jax import checkpoints; m, t = checkpoints.load_demo();"
        "print(step3_jax.__file__, jax.default_backend(), len(t.encode('Emma')) > 0)",
    )
    assert str(venv) in out and "cpu True" in out, out


def test_committed_notebooks_match_their_source():
    if importlib.util.find_spec("nbformat") is None:
        pytest.skip("nbformat not installed")
    import nbformat

    sys.path.insert(0, str(ROOT / "colab"))
    try:
        import _build_notebooks as builder

        expected = builder.notebooks()
    finally:
        sys.path.remove(str(ROOT / "colab"))
    assert sorted(expected) == [p.name for p in NOTEBOOKS]
    for name, cells in expected.items():
        nb = nbformat.read(ROOT / "colab" / name, as_version=4)
        got = [("md" if c.cell_type == "markdown" else "code", c.source) for c in nb.cells]
        assert got == cells, f"{name} differs from colab/_nb*.py: run colab/_build_notebooks.py"
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not _errors(nb), f"{name}: commit it with its outputs (--execute)"
