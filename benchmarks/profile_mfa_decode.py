"""Where the FP8 MFA decode kernel spends its time, per warpgroup (GPU only).

Runs the Pallas kernel with Mosaic GPU's in-kernel profiler on (``mosaic_gpu.PROFILE``): each
warpgroup records the start and end of the kernel's named regions (``jax.named_scope``: qk,
softmax, v_cvt, pv, ...; mem_wait on the memory warpgroup) and the trace is summarised as
cycles-equivalent nanoseconds per KV block and per warpgroup, plus the share of the warpgroup's
wall time each region takes. The profiler adds ~12 cycles per event, so the kernel runs slower
than in ``bench_mfa_decode.py``; compare regions, not totals.

    python3 benchmarks/profile_mfa_decode.py --out $OUT --batch 128 --ctx 4096
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.bench_mfa_decode import VARIANTS, make_inputs  # noqa: E402
from step3_jax.kernels.mfa_decode import TuningConfig, mfa_decode_attention  # noqa: E402


def summarise(trace: dict, n_blocks: int) -> dict:
    """Per warpgroup (0, 1 compute; 2 memory): mean ns per CTA of each region, and its share
    of the warpgroup's span (first begin to last end), averaged over CTAs."""
    per = collections.defaultdict(lambda: collections.defaultdict(float))
    span = collections.defaultdict(lambda: [float("inf"), float("-inf")])
    stack = collections.defaultdict(list)
    for ev in trace["traceEvents"]:
        key = ev["tid"]
        if ev["ph"] == "B":
            stack[key].append((ev["name"], ev["ts"]))
        else:
            name, t0 = stack[key].pop()
            per[key][name] += (ev["ts"] - t0) * 1e3  # us -> ns
        lo, hi = span[key]
        span[key] = [min(lo, ev["ts"]), max(hi, ev["ts"])]
    by_wg = collections.defaultdict(lambda: collections.defaultdict(list))
    for tid, regions in per.items():
        wg = (tid - 1) % 3
        wall = (span[tid][1] - span[tid][0]) * 1e3
        by_wg[wg]["_span_ns"].append(wall)
        for name, ns in regions.items():
            by_wg[wg][name].append(ns)
    out = {}
    for wg, regions in sorted(by_wg.items()):
        n = len(regions["_span_ns"])
        out[f"wg{wg}"] = {name: round(sum(v) / max(n, 1), 1) for name, v in sorted(regions.items())}
        out[f"wg{wg}"]["_ctas"] = n
        out[f"wg{wg}"]["_ns_per_block_of_this_wg"] = round(
            out[f"wg{wg}"]["_span_ns"] / max(n_blocks / (2 if wg < 2 else 1), 1), 1
        )
    return out


def profile_variant(name: str, kwargs: dict, b: int, s: int, space: int) -> dict:
    from step3_jax.kernels.mfa_decode import mosaic_gpu as mg  # GPU-only module

    d = make_inputs(0, b, s, True)
    with tempfile.TemporaryDirectory() as tmp:
        mg.PROFILE.update(space=space, dir=tmp)
        jax.clear_caches()
        try:
            out = mfa_decode_attention(**d, implementation="pallas", config=TuningConfig(**kwargs))
            jax.block_until_ready(out)
            jax.effects_barrier()  # the trace is written by a host callback
        finally:
            mg.PROFILE.update(space=0, dir="")
            jax.clear_caches()
        files = sorted(glob.glob(os.path.join(tmp, "**", "*.json"), recursive=True))
        if not files:
            return {"variant": name, "error": f"no trace written under {tmp}"}
        with open(files[-1]) as f:
            trace = json.load(f)
    return {"variant": name, "B": b, "ctx": s, **summarise(trace, s // kwargs.get("block_s", 64))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--space", type=int, default=1024, help="profiler events per warpgroup")
    ap.add_argument(
        "--variants", default="q_in_kernel]|q_tma,ring_epi]", help="'|'-separated suffixes"
    )
    args = ap.parse_args(argv)
    wanted = [v for v in args.variants.split("|") if v]
    rows = []
    for name, (fp8, kwargs) in VARIANTS.items():
        if fp8 and any(name.endswith(w) for w in wanted):
            try:
                rows.append(profile_variant(name, kwargs, args.batch, args.ctx, args.space))
            except Exception as err:  # noqa: BLE001 - record and go on to the next variant
                rows.append({"variant": name, "error": f"{type(err).__name__}: {err}"[:400]})
            harness.print_json(rows[-1])
    # In-kernel profiler shares, not timings: provenance only, no copy probe.
    path = os.path.join(args.out, "profile_mfa_decode.json")
    doc = harness.write_results(path, rows, bench="profile_mfa_decode", copy=False)
    harness.print_json({k: v for k, v in doc.items() if k != "rows"})


if __name__ == "__main__":
    main()
