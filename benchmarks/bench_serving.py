"""Serving load test: throughput, TTFT and TPOT percentiles of the engine under load.

Load levels (one result row each):
* ``--rates 1,2,4``: open loop, Poisson arrivals at each rate (requests/s) for ``--duration``
  seconds, then the requests in flight drain;
* ``--concurrency 8,32``: closed loop, N clients each sending its next request as soon as the
  previous one ends, for ``--duration`` seconds.
Prompt and output lengths are uniform over ``--prompt-len LO:HI`` and ``--output-len LO:HI``
(random token ids, ``ignore_eos``, so every response must have exactly its length).

Targets (``--mode``):
* ``engine``: the `Engine` in this process (its own thread), no HTTP: what the GPU run uses
  (no FastAPI on the GPU machine). Also times the bare fixed-batch decode step (every slot
  active, same executor) for the "engine overhead <= 10%" comparison (``--bare-steps``).
* ``http``: ``step3-jax serve`` started as a subprocess, streaming clients (httpx, SSE); also
  reports the server's RSS at start and end and its compile counts (from /metrics).

Per request: TTFT = first token - submission; TPOT = (last - first token) / (tokens - 1).
Throughput = generated tokens / (last finish - first submission). Writes ``serving.json`` and
``serving.png`` (TPOT p50/p99 against throughput) to ``--out``; the last stdout line is JSON.

    # CPU, demo model, the 32-client target
    python benchmarks/bench_serving.py --demo --mode http --concurrency 32 --duration 60 \\
        --out benchmarks/results/serving_cpu
    # GPU, Step-3 layer shapes with random FP8 weights and FP8 paged KV (the lead runs this)
    python benchmarks/bench_serving.py --step3 --layers 4 --precision fp8+kv8 --mode engine \\
        --max-batch 64 --rates 8,16,32,64 --prompt-len 512:2048 --output-len 128:512 \\
        --max-len 4096 --prefill-chunk 256 --page-size 64 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402

Q = (50, 90, 99)


def _range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    m = p.add_mutually_exclusive_group()
    m.add_argument("--demo", action="store_true", help="the shipped demo model (default)")
    m.add_argument("--tiny", action="store_true", help="tiny config, random weights (--precision)")
    m.add_argument("--step3", action="store_true", help="Step-3 layer shapes, random weights")
    p.add_argument("--layers", type=int, default=4, help="--step3: decoder layers")
    p.add_argument("--precision", default="fp8+kv8", help="--step3/--tiny: bf16|fp8|fp8+kv8")
    p.add_argument(
        "--v-transposed",
        action="store_true",
        help="FP8 KV cache (--precision fp8+kv8): V stored transposed, P.V as an FP8 wgmma",
    )
    p.add_argument("--mode", choices=("engine", "http"), default="engine")
    p.add_argument("--rates", default="", help="Poisson arrival rates, requests/s")
    p.add_argument("--concurrency", default="", help="closed-loop client counts")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    p.add_argument("--prompt-len", type=_range, default=(16, 64))
    p.add_argument("--output-len", type=_range, default=(16, 64))
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--page-size", type=int, default=64, help="a multiple of 64 on Hopper")
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--bare-steps", type=int, default=20, help="engine mode: bare-step timing")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for serving.json and serving.png")
    a = p.parse_args(argv)
    if not (a.rates or a.concurrency):
        a.concurrency = "8"
    return a


def pct(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {f"p{q}": None for q in Q}
    return {f"p{q}": round(float(np.percentile(xs, q)) * 1e3, 3) for q in Q}  # ms


def summarize(level: dict, records: list[dict], t0: float, t1: float) -> dict:
    """records: {ok, complete, n_out, ttft, tpot} per request (seconds)."""
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["n_out"] for r in ok)
    wall = max(t1 - t0, 1e-9)
    return {
        **level,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "incomplete": sum(not r["complete"] for r in ok),
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "throughput_tok_s": round(tokens / wall, 2),
        "throughput_req_s": round(len(ok) / wall, 3),
        "ttft_ms": pct(r["ttft"] for r in ok),
        "tpot_ms": pct(r["tpot"] for r in ok),
    }


def workload(a, rng, vocab: int):
    """An endless stream of (prompt ids, max_tokens)."""
    while True:
        n = int(rng.integers(a.prompt_len[0], a.prompt_len[1] + 1))
        yield (
            list(map(int, rng.integers(1, vocab, n))),
            int(rng.integers(a.output_len[0], a.output_len[1] + 1)),
        )


# ------------------------------------------------------------------------------ engine mode
def build_engine(a):
    import jax.numpy as jnp

    from step3_jax.engine import Engine, ModelExecutor

    cache_dtype = None
    if a.step3 or a.tiny:  # --tiny: a CPU dry run of the --step3 code path (same precision)
        from benchmarks.bench_decode import bench_config, random_model
        from step3_jax.quant_model import Precision

        prec = Precision(a.precision)
        cfg = bench_config("step3" if a.step3 else "tiny", a.layers, None)
        model = random_model(cfg, prec, "grouped", None, jnp.bfloat16)
        cache_dtype = prec.cache_dtype
    else:
        from step3_jax.checkpoints import load_demo

        model, _ = load_demo()
    ex = ModelExecutor(
        model, max_batch=a.max_batch, max_len=a.max_len, page_size=a.page_size,
        prefill_chunk=a.prefill_chunk, cache_dtype=cache_dtype,
        v_transposed=a.v_transposed and cache_dtype is not None,
    )  # fmt: skip
    return Engine(ex, None, max_queue=1 << 20), model.config.vocab_size


def bare_step(engine, a, vocab: int, seed: int = 0) -> dict:
    """The fixed-batch decode step alone: every slot active, executor decode + sampler + token
    fetch per step (what the engine adds on top is scheduling). The rows look like a serving
    batch: distinct random tokens every step and positions spread over the serving range.
    The sampled tokens are fetched but not fed back, since greedy decoding keeps identical
    rows identical. Identical rows route every token of a MoE layer to the same top-k
    experts, so the step reads a small fraction of the expert weights. The first version of
    this baseline fed back the tokens of all-ones rows and did exactly that."""
    from step3_jax.engine.sampling import sample_rows

    rng = np.random.default_rng(seed)
    ex, b = engine.executor, engine.executor.max_batch
    for s in range(b):
        ex.admit(s, a.max_len)
    lo = min(a.prompt_len[0], a.max_len - 2)
    hi = max(min(a.prompt_len[1] + a.output_len[1], a.max_len - 1), lo + 1)
    pos = rng.integers(lo, hi, b).astype(np.int32)
    active = np.ones(b, bool)
    z, zi = np.zeros(b, np.float32), np.zeros(b, np.int32)
    for i in range(a.bare_steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        toks = rng.integers(1, vocab, b).astype(np.int32)
        logits = ex.decode(toks, pos, active)
        np.asarray(sample_rows(logits, z, zi, np.ones(b, np.float32), zi, zi))
    dt = (time.perf_counter() - t0) / a.bare_steps
    for s in range(b):
        ex.release(s)
    return {"batch": b, "step_ms": round(dt * 1e3, 3), "throughput_tok_s": round(b / dt, 2),
            "positions": [int(pos.min()), int(pos.max())]}  # fmt: skip


def run_engine_level(engine, a, rng, vocab, rate=None, clients=None) -> dict:
    from step3_jax.engine import SamplingParams

    gen, reqs, stop = workload(a, rng, vocab), [], time.perf_counter() + a.duration
    lock = threading.Lock()  # client threads share the workload generator

    def submit():
        with lock:
            prompt, n = next(gen)
        s = engine.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        reqs.append((s, n))
        return s

    before = dict(engine.stats)
    t0 = time.perf_counter()
    if rate:
        t = t0
        while (t := t + rng.exponential(1.0 / rate)) < stop:
            time.sleep(max(0.0, t - time.perf_counter()))
            submit()
    else:

        def client():
            while time.perf_counter() < stop:
                submit().result()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        [th.start() for th in threads]
        [th.join() for th in threads]
    records = []
    for s, n in reqs:
        r = s.result()
        n_out = len(r.output)
        tpot = (r.finish_time - r.first_token_time) / (n_out - 1) if n_out > 1 else None
        records.append(dict(ok=True, complete=n_out == n and r.finish_reason == "length",
                            n_out=n_out, ttft=r.ttft, tpot=tpot))  # fmt: skip
    t1 = max(s.request.finish_time for s, _ in reqs)
    level = {"rate": rate} if rate else {"concurrency": clients}
    return {**summarize(level, records, t0, t1), "engine": engine_breakdown(before, engine.stats)}


def engine_breakdown(before: dict, after: dict) -> dict:
    """The engine's iterations during one load level: decode and prefill calls, their mean
    wall time (host work and sampling included) and the mean active slots per decode."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    steps, pre = d.get("decode_steps", 0), d.get("prefill_steps", 0)
    return {
        "decode_steps": steps,
        "prefill_steps": pre,
        "decode_ms": round(1e3 * d.get("decode_seconds", 0) / steps, 3) if steps else None,
        "prefill_ms": round(1e3 * d.get("prefill_seconds", 0) / pre, 3) if pre else None,
        "active_slots": round(d.get("decode_slot_steps", 0) / steps, 2) if steps else None,
    }


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.get("tpot_ms", {}).get("p50") is not None),
                  key=lambda r: r["throughput_tok_s"])  # fmt: skip
    x = [r["throughput_tok_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for q, style in (("p50", "o-"), ("p99", "s--")):
        ax.plot(x, [r["tpot_ms"][q] for r in rows], style, label=f"TPOT {q}")
    for r in rows:
        label = f"{r['rate']}/s" if r.get("rate") else f"{r.get('concurrency')} clients"
        ax.annotate(label, (r["throughput_tok_s"], r["tpot_ms"]["p99"]), fontsize=7)
    ax.set_xlabel("throughput (generated tokens/s)")
    ax.set_ylabel("time per output token (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> dict:
    a = parse_args(argv)
    rng = np.random.default_rng(a.seed)
    levels = [("rate", float(x)) for x in a.rates.split(",") if x]
    levels += [("clients", int(x)) for x in a.concurrency.split(",") if x]
    extra = {"mode": a.mode, "model": "step3" if a.step3 else "tiny" if a.tiny else "demo",
             "prompt_len": a.prompt_len, "output_len": a.output_len, "max_batch": a.max_batch,
             "max_len": a.max_len, "page_size": a.page_size, "prefill_chunk": a.prefill_chunk,
             "duration_s": a.duration, "loadavg_start": os.getloadavg()}  # fmt: skip
    rows = []
    if a.mode == "engine":
        from step3_jax.engine import SamplingParams

        engine, vocab = build_engine(a)
        extra["bare_step"] = bare_step(engine, a, vocab)
        warm = [[1] * (a.prefill_chunk + 1)]  # compiles the prefill step and both samplers
        engine.generate(warm, SamplingParams(max_tokens=2, temperature=0.5))
        engine.start()
        warm = engine.compile_count()
        for kind, v in levels:
            kw = {"rate": v} if kind == "rate" else {"clients": v}
            rows.append(run_engine_level(engine, a, rng, vocab, **kw))
            harness.print_json(rows[-1])
        engine.shutdown()
        extra["engine_compiles"] = {"after_warmup": warm, "end": engine.compile_count()}
        if a.step3 or a.tiny:
            extra["layers"], extra["precision"] = a.layers, a.precision
    else:
        from benchmarks.serving_http import http_level, start_server, stop_server

        server = start_server(a)
        try:
            for kind, v in levels:
                kw = {"rate": v} if kind == "rate" else {"clients": v}
                gen = workload(a, rng, 2048)  # the demo model's vocabulary
                records, t0, t1, more = http_level(server, a.duration, gen, rng, **kw)
                level = {"rate": v} if kind == "rate" else {"concurrency": v}
                rows.append({**summarize(level, records, t0, t1), **more})
                harness.print_json(rows[-1])
        finally:
            extra["server"] = stop_server(server)
    extra["loadavg_end"] = os.getloadavg()  # a shared machine's load bends CPU timings
    doc = harness.results("serving", rows, copy=False, **extra)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "serving.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
        plot(rows, os.path.join(a.out, "serving.png"))
    harness.print_json(doc)
    return doc


if __name__ == "__main__":
    main()
