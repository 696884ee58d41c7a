"""Where a benchmark result came from: the commit recorded in the JSON under benchmarks/results/.

The GPU machine runs a copy of the working tree without ``.git``, so the GPU scripts pass the
commit in ``GIT_COMMIT`` (``BENCH_COMMIT`` is the older name, still read).
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = False) -> str:
    """``$GIT_COMMIT`` (or ``$BENCH_COMMIT``), else ``git rev-parse HEAD`` of the repository,
    else ``"unknown"``."""
    env = os.environ.get("GIT_COMMIT") or os.environ.get("BENCH_COMMIT")
    if env:
        return env
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"
