"""Time to the first streamed token of `step3-jax chat` on the demo model, from process launch.

Each run launches the CLI, writes one user message to its stdin (at launch, as a pipe does,
or after ``--type-delay`` seconds, as a person typing), and times the first byte after
``assistant> ``. ``cold``: an empty XLA compilation cache (every program compiles); ``warm``:
the cache the cold run filled (what every later session gets). CPU only, and wall-clock
timings need an otherwise idle machine: the script records the load average.

    python benchmarks/bench_chat_first_token.py [--runs 3] [--type-delay 0] [--out DIR]

Last stdout line: one JSON object (also written to DIR/chat_first_token.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "step3_jax.cli", "chat", "--max-new-tokens", "8"]
MESSAGE = b"Who is Mr. Knightley?\n"


def one_run(cache_dir: str, type_delay: float) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": cache_dir}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        CLI, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    time.sleep(type_delay)
    t_send = time.perf_counter()
    proc.stdin.write(MESSAGE)
    proc.stdin.flush()
    seen = b""
    while not seen.endswith(b"assistant> "):
        byte = proc.stdout.read(1)
        if not byte:
            raise RuntimeError(f"chat exited early: {proc.stderr.read().decode()[-2000:]}")
        seen += byte
    proc.stdout.read(1)
    t_first = time.perf_counter()
    proc.stdin.close()
    proc.stdin = None
    _, err = proc.communicate(timeout=300)
    ready = err.decode().split("ready in ", 1)[-1].split(" s", 1)[0]
    return {
        "first_token_after_launch_s": round(t_first - t0, 3),
        "first_token_after_message_s": round(t_first - t_send, 3),
        "model_ready_in_process_s": float(ready) if ready.replace(".", "").isdigit() else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="warm runs (after one cold run)")
    p.add_argument("--type-delay", type=float, default=0.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        load_before = os.getloadavg()[0]
        cold = one_run(cache, args.type_delay)
        warm = [one_run(cache, args.type_delay) for _ in range(args.runs)]
        load_after = os.getloadavg()[0]
    import jax

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "bench": "chat_first_token",
        "device": "cpu",
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "commit": commit,
        "type_delay_s": args.type_delay,
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "cold": cold,
        "warm_median_first_token_after_launch_s": statistics.median(
            r["first_token_after_launch_s"] for r in warm
        ),
        "warm_median_first_token_after_message_s": statistics.median(
            r["first_token_after_message_s"] for r in warm
        ),
        "warm_runs": warm,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chat_first_token.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
