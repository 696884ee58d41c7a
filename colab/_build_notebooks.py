"""Builds the colab/ notebooks from the source cells in colab/_nb*.py (reviewable diffs).

    .venv/bin/python colab/_build_notebooks.py             # write the notebooks, no outputs
    .venv/bin/python colab/_build_notebooks.py --execute   # ... then run them and save outputs

Each notebook is a list of ("md" | "code", source) cells and starts with the same install
cell (`INSTALL`). The committed notebooks carry their outputs (plots), made with --execute on
CPU; CI re-executes them (tests/test_notebooks.py) and checks their cells match this source.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# One variable says where to install from; CI sets the environment variable to the checkout.
SOURCE_PLACEHOLDER = "https://github.com/YOUR-ORG/step3_jax.git"
INSTALL = f"""\
# Install step3_jax from STEP3_JAX_SOURCE: a git URL or a local checkout. Replace the
# placeholder with the URL of your copy (README, "Notebooks"); the environment variable of the
# same name overrides it. Skipped where step3_jax already imports (a clone after `make setup`).
# A jax that is already installed (Colab's GPU/TPU jax) is kept: it is pinned while the other
# dependencies install; only where no jax exists does the `cpu` extra bring a CPU jax.
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys

STEP3_JAX_SOURCE = os.environ.get("STEP3_JAX_SOURCE", "{SOURCE_PLACEHOLDER}")

if importlib.util.find_spec("step3_jax") is None:
    src = pathlib.Path(STEP3_JAX_SOURCE).expanduser()
    if not src.is_dir():  # a git URL: shallow clone next to the notebook
        src = pathlib.Path("step3_jax_src")
        if not src.is_dir():
            subprocess.run(["git", "clone", "-q", "--depth", "1", STEP3_JAX_SOURCE, src], check=True)
    pins = {{}}
    for name in ("jax", "jaxlib"):
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if "jax" in pins:  # keep it, if step3_jax supports it (pyproject.toml's range)
        import tomllib

        try:
            from packaging.requirements import Requirement
        except ImportError:
            from pip._vendor.packaging.requirements import Requirement

        deps = tomllib.loads((src / "pyproject.toml").read_text())["project"]["dependencies"]
        jax_range = next(Requirement(d).specifier for d in deps if Requirement(d).name == "jax")
        if pins["jax"] not in jax_range:
            raise RuntimeError(
                f"this runtime has jax {{pins['jax']}}; step3_jax needs jax{{jax_range}}. Install "
                "a jax in that range for your accelerator (e.g. pip install -U 'jax[cuda12]'), "
                "restart the runtime and run this cell again."
            )
        pathlib.Path("jax_pins.txt").write_text("".join(f"{{n}}=={{v}}\\n" for n, v in pins.items()))
        subprocess.run([*pip, str(src.resolve()), "-c", "jax_pins.txt"], check=True)
    else:
        subprocess.run([*pip, f"{{src.resolve()}}[cpu]"], check=True)
    importlib.invalidate_caches()
"""


def notebooks() -> dict[str, list[tuple[str, str]]]:
    from _nb01_quickstart import CELLS as QUICKSTART
    from _nb02_kernels import CELLS as KERNELS
    from _nb03_cost_model import CELLS as COST_MODEL
    from _nb04_afd import CELLS as AFD

    return {
        "01_quickstart.ipynb": QUICKSTART,
        "02_kernels.ipynb": KERNELS,
        "03_cost_model.ipynb": COST_MODEL,
        "04_afd.ipynb": AFD,
    }


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives an identical file
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    return nb


def execute(nb: nbformat.NotebookNode, timeout_s: int = 600) -> None:
    """Runs ``nb`` in place in the repository root (so step3_jax imports from the tree)."""
    from nbclient import NotebookClient

    os.environ.setdefault("STEP3_JAX_SOURCE", str(ROOT))
    NotebookClient(
        nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata.pop("execution", None)  # timestamps: keep rebuilds diff-free
            # tqdm's "IProgress not found" (no ipywidgets here) names this machine's paths.
            cell.outputs = [
                o for o in cell.outputs if "IProgress not found" not in o.get("text", "")
            ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execute", action="store_true", help="run each notebook, save outputs")
    ap.add_argument("names", nargs="*", help="only these notebooks (e.g. 02_kernels.ipynb)")
    args = ap.parse_args()
    for name, cells in notebooks().items():
        if args.names and name not in args.names:
            continue
        nb = build(cells)
        if args.execute:
            execute(nb)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
