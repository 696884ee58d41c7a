"""Where a benchmark result came from: the commit recorded in the JSON under benchmarks/results/.

The GPU machine runs a copy of the working tree, so the GPU scripts pass the commit in
``GIT_COMMIT`` (``BENCH_COMMIT`` is the older name, still read). Without it the repository's
HEAD is recorded, with ``+dirty`` when tracked files differ from it: that copy may sit on an
older HEAD with the newer tree laid over it (a run without GIT_COMMIT once recorded a commit
two sessions old).
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = False) -> str:
    """``$GIT_COMMIT`` (or ``$BENCH_COMMIT``), else ``git rev-parse HEAD`` of the repository
    (``+dirty`` appended when tracked files differ from it), else ``"unknown"``."""
    env = os.environ.get("GIT_COMMIT") or os.environ.get("BENCH_COMMIT")
    if env:
        return env
    run = lambda *a: subprocess.run(a, cwd=ROOT, capture_output=True, text=True, check=False)
    try:
        head = run("git", "rev-parse", *(["--short"] if short else []), "HEAD").stdout.strip()
        dirty = head and run("git", "status", "--porcelain", "--untracked-files=no").stdout
    except OSError:
        return "unknown"
    return (head + ("+dirty" if dirty.strip() else "")) if head else "unknown"
