"""Prints the Python, jax and flax `make` uses; refuses versions outside pyproject.toml ranges.

    python3 scripts/check_env.py --python-only   # before creating .venv: the interpreter only
    .venv/bin/python scripts/check_env.py        # after set-up: Python, jax, flax (and jaxlib)

The ranges are read from pyproject.toml (`requires-python` and `[project] dependencies`), so
there is one place to change them. Versions are compared with the `packaging` library (pip's
vendored copy where `packaging` itself is not installed). Exit code 1 with one clear message
when a version is outside its range; 0 otherwise. Runs on old interpreters too (no 3.11-only
syntax), so that a too-old Python gets the message rather than a SyntaxError.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("jax", "jaxlib", "flax")  # jaxlib shares jax's range (it is jax[cpu]/jax's pair)

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pip ships a copy
    try:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.specifiers import SpecifierSet
    except ImportError:  # a bare interpreter (no pip yet): only --python-only can get here
        Requirement = SpecifierSet = None


def _pyproject_text() -> str:
    return (ROOT / "pyproject.toml").read_text()


def python_range() -> SpecifierSet:
    m = re.search(r'^requires-python\s*=\s*"([^"]+)"', _pyproject_text(), re.MULTILINE)
    if not m:
        raise SystemExit("check_env: no requires-python in pyproject.toml")
    return SpecifierSet(m.group(1))


def dependency_ranges() -> dict[str, SpecifierSet]:
    import tomllib  # Python >= 3.11, which the Python check has already ensured

    deps = tomllib.loads(_pyproject_text())["project"]["dependencies"]
    ranges = {}
    for text in deps:
        req = Requirement(text)
        ranges[req.name.lower()] = req.specifier
    ranges.setdefault("jaxlib", ranges.get("jax", SpecifierSet()))
    return ranges


def _fail(lines: list[str]) -> None:
    print("\n".join(["", "ERROR: unsupported version (ranges from pyproject.toml):", *lines]))
    print(
        "Fix: use a Python / jax / flax inside those ranges (`make PYTHON=python3.12 ...` picks "
        "another interpreter; `make USE_VENV=1 ...` ignores a system Python that already has "
        "jax and sets up .venv with supported versions instead).",
        file=sys.stdout,
    )
    sys.exit(1)


def check_python() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    if SpecifierSet is None:  # pip's own requires-python check still applies when installing
        return f"python {version} at {sys.executable} (not checked: no `packaging` module here)"
    spec = python_range()
    line = f"python {version} at {sys.executable} (supported: {spec})"
    if version not in spec:
        _fail([f"  {line}"])
    return line


def check_packages() -> list[str]:
    ranges = dependency_ranges()
    lines, bad = [], []
    for name in CHECKED:
        spec = ranges.get(name, SpecifierSet())
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            bad.append(f"  {name}: not installed (supported: {spec})")
            continue
        line = f"{name} {version} (supported: {spec})"
        (lines if spec.contains(version, prereleases=True) else bad).append(f"  {line}")
    if bad:
        _fail(bad + lines)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python-only", action="store_true", help="check the interpreter only")
    args = ap.parse_args()
    print("using " + check_python())
    if not args.python_only:
        print("\n".join(check_packages()))


if __name__ == "__main__":
    main()
