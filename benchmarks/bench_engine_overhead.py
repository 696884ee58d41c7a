"""What the engine adds over the bare fixed-batch decode step, and where (no load generator).

Builds the engine of ``bench_serving.py`` (same flags: ``--step3 --layers 4 --precision
fp8+kv8 --max-batch 64 ...``), times the bare step (every slot active), then runs the same
``--max-batch`` requests (``--prompt-len`` tokens each, ``--output-len`` new tokens) to the end
three ways, reporting the engine's mean decode iteration each time. (The requests' contexts
run from ``prompt_len[1]`` to ``prompt_len[1] + output_len[1]``; the bare step's positions are
uniform over ``[prompt_len[0], prompt_len[1] + output_len[1])``: give ``--prompt-len P:P`` so
both cover the same range, as in the command below.)

* ``in_thread``: `Engine.run_until_done` in the calling thread;
* ``thread``: the engine's background thread, the main thread waiting on each result;
* ``clients``: the background thread plus one client thread per request, each iterating its
  stream (what `bench_serving.py --concurrency` does).

    python3 benchmarks/bench_engine_overhead.py --step3 --layers 4 --precision fp8+kv8 \\
        --max-batch 64 --max-len 4096 --prompt-len 64:64 --output-len 256:256 --out OUT
    JAX_PLATFORMS=cpu python3 benchmarks/bench_engine_overhead.py --tiny --max-len 512
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import bench_serving, harness  # noqa: E402


def _requests(engine, a, vocab: int, rng):
    from step3_jax.engine import SamplingParams

    n = a.output_len[1]
    return [
        engine.submit(
            list(map(int, rng.integers(1, vocab, a.prompt_len[1]))),
            SamplingParams(max_tokens=n, ignore_eos=True),
        )
        for _ in range(a.max_batch)
    ]


def run_mode(executor, a, vocab: int, mode: str) -> dict:
    from step3_jax.engine import Engine

    engine = Engine(executor, None, max_queue=1 << 20)  # fresh: a shut-down one takes none
    rng = np.random.default_rng(0)
    before = dict(engine.stats)
    t0 = time.perf_counter()
    if mode == "in_thread":
        _requests(engine, a, vocab, rng)
        engine.run_until_done()
    else:
        engine.start()
        if mode == "thread":
            [s.result() for s in _requests(engine, a, vocab, rng)]
        else:
            streams = _requests(engine, a, vocab, rng)
            threads = [threading.Thread(target=s.result) for s in streams]
            [t.start() for t in threads]
            [t.join() for t in threads]
        engine.shutdown()
    wall = time.perf_counter() - t0
    return {
        "mode": mode,
        "wall_s": round(wall, 3),
        **bench_serving.engine_breakdown(before, engine.stats),
    }


def main(argv=None) -> dict:
    a = bench_serving.parse_args(argv)
    engine, vocab = bench_serving.build_engine(a)
    bare = bench_serving.bare_step(engine, a, vocab)
    from step3_jax.engine import SamplingParams

    engine.generate([[1] * (a.prefill_chunk + 1)], SamplingParams(max_tokens=2))  # compile
    rows = []
    for mode in ("in_thread", "thread", "clients"):
        rows.append(run_mode(engine.executor, a, vocab, mode))
        ms = rows[-1]["decode_ms"]
        rows[-1]["decode_vs_bare"] = None if ms is None else round(ms / bare["step_ms"], 3)
        harness.print_json(rows[-1])
    doc = harness.results(
        "engine_overhead", rows, copy=False, bare_step=bare, max_batch=a.max_batch,
        prompt_len=a.prompt_len, output_len=a.output_len, layers=a.layers,
        precision=a.precision, model="step3" if a.step3 else "tiny" if a.tiny else "demo",
    )  # fmt: skip
    if a.out:  # a folder, as for bench_serving.py
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "engine_overhead.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
    harness.print_json(doc)
    return doc


if __name__ == "__main__":
    main()
