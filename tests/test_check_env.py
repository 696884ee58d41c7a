"""scripts/check_env.py (what `make` runs): prints the Python, jax and flax in use and refuses
versions outside pyproject.toml's ranges with a clear message and exit code 1."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "check_env.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _copy_with_pyproject(tmp_path: Path, old: str, new: str) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check_env.py", tmp_path / "scripts")
    text = (ROOT / "pyproject.toml").read_text()
    assert old in text
    (tmp_path / "pyproject.toml").write_text(text.replace(old, new))
    return tmp_path


def test_supported_versions_are_reported():
    proc = _run(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sys.executable in proc.stdout
    for name in ("jax", "flax"):
        assert f"{name} {metadata.version(name)} (supported: " in proc.stdout


def test_jax_outside_the_range_is_refused(tmp_path):
    jax_version = metadata.version("jax")
    root = _copy_with_pyproject(tmp_path, '"jax>=0.10.2,<0.12"', f'"jax>{jax_version}"')
    proc = _run(root)
    assert proc.returncode == 1
    assert "ERROR: unsupported version" in proc.stdout
    assert f"jax {jax_version} (supported: >{jax_version})" in proc.stdout
    assert "USE_VENV=1" in proc.stdout


def test_python_outside_the_range_is_refused(tmp_path):
    newer = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
    root = _copy_with_pyproject(
        tmp_path, 'requires-python = ">=3.11"', f'requires-python = ">={newer}"'
    )
    proc = _run(root, "--python-only")
    assert proc.returncode == 1
    assert f"(supported: >={newer})" in proc.stdout
