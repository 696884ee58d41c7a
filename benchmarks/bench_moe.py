"""MoE FFN benchmark at Step-3 shapes: Pallas FP8 grouped GEMMs vs XLA / JAX example / torch.

Shapes: D=7168, F=5120, E=48 routed experts (top-3) plus one shared expert. For each tokens per
step T and each expert shard (E_local experts of 48 on this device; routing is uniform over
all 48, so a shard sees ~E_local/48 of the pairs), reports the time of the whole routed +
shared MoE layer and of each GEMM, effective weight GB/s (bytes of the experts that received
at least one token, plus the shared expert), TFLOP/s, % of the measured copy bandwidth and of
the measured dense FP8 GEMM rate (torch._scaled_mm), and side by side the baselines:
XLA ``lax.ragged_dot`` (bf16 and FP8), the JAX ``ragged_dot_mgpu`` example (bf16) and torch
grouped GEMMs where present.

Timed by ``benchmarks.harness`` (device time, host times beside it; % of its copy probe).

Usage (GPU): ``python3 benchmarks/bench_moe.py --out results.json``
CPU smoke run: ``python3 benchmarks/bench_moe.py --tiny`` (D = F = 256, the XLA path).
The last stdout line is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax.kernels.grouped_gemm import api, moe  # noqa: E402
from step3_jax.kernels.grouped_gemm.config import TuningConfig  # noqa: E402

D, F, E, TOPK = 7168, 5120, 48, 3
IMPL = "pallas"


def set_tiny() -> None:
    """Tiny shapes and the XLA path (--tiny or BENCH_DRY=1): this script's plumbing on a CPU."""
    global D, F, IMPL
    D, F, IMPL = 256, 256, "xla"


if os.environ.get("BENCH_DRY") == "1":
    set_tiny()


def ms(fn, *args, reps=10, warmup=2, **kw) -> float:
    """Device time of ``fn(*args)`` in ms (harness timer)."""
    return harness.time_calls(fn, [args], reps=reps, warmup=warmup, **kw).time_us / 1e3


def torch_dense_fp8_tflops():
    try:
        import torch

        m = n = k = 8192
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device="cuda")
        f = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        t = ms(f, reps=20, warmup=3, sync=lambda _: torch.cuda.synchronize())
        return 2 * m * n * k / (t * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 - report, do not fail the sweep
        print("torch dense fp8 failed:", repr(e)[:200])
        return None


def make_weights(key, e_local, dtype):
    """Random FP8 weights (values ~ N(0,1) in e4m3, block scales ~ U(0.5, 1.5)/448)."""
    ks = jax.random.split(key, 6)

    def w(k, shape):
        return jax.random.normal(k, shape, jnp.float32).astype(dtype)

    def s(k, shape):
        nb = (shape[0], shape[1] // 128, shape[2] // 128)
        return jax.random.uniform(k, nb, jnp.float32, 0.5, 1.5) / 448

    shapes = [(e_local, F, D), (e_local, F, D), (e_local, D, F)]
    ws = [w(ks[i], sh) for i, sh in enumerate(shapes)]
    ss = [s(ks[3 + i], sh) for i, sh in enumerate(shapes)]
    return ws, ss


def routing(key, t):
    logits = jax.random.normal(key, (t, E), jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    w, ids = jax.lax.top_k(p, TOPK)
    return ids.astype(jnp.int32), w


def sorted_rows(ids, first, e_local):
    local = ids.reshape(-1) - first
    valid = (local >= 0) & (local < e_local)
    key = jnp.where(valid, local, e_local)
    gs = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    return gs


def bench_case(t, e_local, weights, scales, shared, cfg, baselines, fp8_tf):
    """All timings of one (T, E_local) case; returns its row: the whole layer (routed +
    shared) timed by the harness over the weight bytes it touches, the same layer with the
    shared expert inside the routed launches (``shared_routed``), the GEMMs beside it."""
    key = jax.random.key(t)
    x = (jax.random.normal(key, (t, D), jnp.float32)).astype(jnp.bfloat16)
    ids, rw = routing(jax.random.key(t + 1), t)
    gs = sorted_rows(ids, 0, e_local)
    rows = int(gs.sum())
    active = int((gs > 0).sum())
    wg, wu, wd = weights
    sg, su, sd = scales
    kw = dict(implementation=IMPL, config=cfg)

    layer = jax.jit(
        lambda x, ids, rw, wg, wu, wd, sg, su, sd, shw: (
            moe.moe_ffn(
                x, ids, rw, wg, wu, wd, w_gate_scale=sg, w_up_scale=su, w_down_scale=sd, **kw
            )
            + moe.shared_expert_ffn(
                x, *shw[:3], w_gate_scale=shw[3], w_up_scale=shw[4], w_down_scale=shw[5], **kw
            )
        )
    )
    wbytes_expert = 3 * F * D  # FP8
    flops = 2 * 3 * F * D * (rows + t)
    row = harness.measure(
        layer, [(x, ids, rw, wg, wu, wd, sg, su, sd, shared)],
        bytes=(active + 1) * wbytes_expert, flops=flops, name="moe_layer",
        shape={"T": t, "E_local": e_local}, T=t, E_local=e_local, routed_rows=rows,
        active_experts=active,
    )  # fmt: skip
    res = row.to_dict()
    res["layer_ms"] = row.time_us / 1e3
    # The same layer with the shared expert as one more group of the routed launches
    # (`moe_ffn(shared=)`, `KernelPolicy.shared_expert="routed"`), same bytes and FLOPs.
    fused = jax.jit(
        lambda x, ids, rw, wg, wu, wd, sg, su, sd, shw: moe.moe_ffn(
            x, ids, rw, wg, wu, wd, w_gate_scale=sg, w_up_scale=su, w_down_scale=sd,
            shared=shw[:3], shared_scales=shw[3:], **kw,
        )
    )  # fmt: skip
    frow = harness.measure(
        fused, [(x, ids, rw, wg, wu, wd, sg, su, sd, shared)],
        bytes=(active + 1) * wbytes_expert, flops=flops, name="moe_layer_shared_routed",
        shape={"T": t, "E_local": e_local},
    )  # fmt: skip
    res["shared_routed"] = {k: frow.to_dict()[k] for k in ("time_us", "GBps", "pct_of_copy")}
    # Individual GEMMs on already-sorted FP8 rows.
    xq = jax.random.normal(key, (max(rows, 1), D), jnp.float32).astype(jnp.float8_e4m3fn)
    xs = jnp.full((max(rows, 1), D // 128), 1 / 448, jnp.float32)
    hq = jax.random.normal(key, (max(rows, 1), F), jnp.float32).astype(jnp.float8_e4m3fn)
    hs = jnp.full((max(rows, 1), F // 128), 1 / 448, jnp.float32)
    gu = jax.jit(
        lambda x, a, b, s, sa, sb: api.grouped_swiglu(
            x, a, b, gs, x_scale=s, w_gate_scale=sa, w_up_scale=sb, **kw
        )
    )
    dn = jax.jit(lambda x, a, s, sa: api.grouped_matmul(x, a, gs, x_scale=s, w_scale=sa, **kw))
    res["gate_up_ms"] = ms(gu, xq, wg, wu, xs, sg, su)
    res["down_ms"] = ms(dn, hq, wd, hs, sd)
    g_flops = 2 * 2 * F * D * rows
    res["gate_up_TFLOPs"] = g_flops / (res["gate_up_ms"] * 1e-3) / 1e12
    res["gate_up_weight_GBs"] = active * 2 * F * D / (res["gate_up_ms"] * 1e-3) / 1e9
    res["down_weight_GBs"] = active * F * D / (res["down_ms"] * 1e-3) / 1e9
    if fp8_tf:
        res["pct_dense_fp8_layer"] = 100 * res["TFLOPs"] / fp8_tf
    for name, fn in baselines.items():
        try:
            t_ms = fn(t, rows, gs, key)
            if t_ms is not None:
                res[f"{name}_gate_up_ms"] = t_ms
        except Exception as e:  # noqa: BLE001
            res[f"{name}_error"] = repr(e)[:160]
    return res


def make_baselines(e_local, max_xla_t):
    """Baselines on the gate/up GEMM shape (D -> 2F, i.e. 7168 -> 10240) for the same rows."""
    n = 2 * F
    key = jax.random.key(99)
    wb = jax.random.normal(key, (e_local, n, D), jnp.float32).astype(jnp.bfloat16)
    out = {}

    cache = {}

    def kn(dtype):
        # ragged_dot wants [G, K, N]: transpose once here, not inside the timed function.
        if dtype not in cache:
            cache[dtype] = jnp.swapaxes(wb, 1, 2).astype(dtype)
        return cache[dtype]

    def xla_bf16(t, rows, gs, k):
        if t > max_xla_t:
            return None
        xr = jax.random.normal(k, (rows, D), jnp.bfloat16)
        f = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
        return ms(f, xr, kn(jnp.bfloat16), gs, reps=3, warmup=1)

    def xla_fp8(t, rows, gs, k):
        if t > max_xla_t:
            return None
        xr = jax.random.normal(k, (rows, D), jnp.float32).astype(jnp.float8_e4m3fn)
        f = jax.jit(
            lambda a, b, g: jax.lax.ragged_dot(a, b, g, preferred_element_type=jnp.float32).astype(
                jnp.bfloat16
            )
        )
        return ms(f, xr, kn(jnp.float8_e4m3fn), gs, reps=3, warmup=1)

    def jax_example(t, rows, gs, k):
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as r

        xr = jax.random.normal(k, (rows, D), jnp.bfloat16)
        f = jax.jit(
            lambda a, b, g: r.ragged_dot(
                a,
                b,
                group_sizes=g,
                block_m=64,
                block_n=128,
                block_k=64,
                max_concurrent_steps=4,
                grid_block_n=1,
                transpose_rhs=True,
            )
        )
        return ms(f, xr, wb, gs)

    def torch_grouped(t, rows, gs, k):
        import torch

        a = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
        if "torch_b" not in cache:
            cache["torch_b"] = torch.randn(e_local, n, D, device="cuda", dtype=torch.bfloat16)
        b = cache["torch_b"].transpose(1, 2)
        offs = torch.tensor(np.cumsum(np.asarray(gs)), device="cuda", dtype=torch.int32)
        f = lambda: torch._grouped_mm(a, b, offs=offs, out_dtype=torch.bfloat16)
        return ms(f, sync=lambda _: torch.cuda.synchronize())

    out["xla_ragged_dot_bf16"] = xla_bf16
    out["xla_ragged_dot_fp8"] = xla_fp8
    out["jax_ragged_dot_mgpu_bf16"] = jax_example
    out["torch_grouped_mm_bf16"] = torch_grouped
    return out


SWEEP = {
    "wg1_64x128_s4": TuningConfig(block_m=64, block_n=128, max_concurrent_steps=4),
    "wg1_64x128_s8": TuningConfig(block_m=64, block_n=128, max_concurrent_steps=8),
    "wg2n_64x256_s4": TuningConfig(block_m=64, block_n=128, num_compute_wgs=2, wg_dim="n"),
    "wg2n_64x256_s6": TuningConfig(
        block_m=64, block_n=128, num_compute_wgs=2, wg_dim="n", max_concurrent_steps=6
    ),
    "wg2m_128x128_s6": TuningConfig(
        block_m=64, block_n=128, num_compute_wgs=2, wg_dim="m", max_concurrent_steps=6
    ),
}
# Further candidates, swept only when named in --sweep-configs (the H200 tuning run): a
# shallower / deeper single-warpgroup ring (H200 streams ~1.4x faster than H100, so the bytes
# a CTA keeps in flight may need to grow), and 4 steps for the split-M two-warpgroup tile.
EXTRA_SWEEP = {
    "wg1_64x128_s3": TuningConfig(block_m=64, block_n=128, max_concurrent_steps=3),
    "wg1_64x128_s6": TuningConfig(block_m=64, block_n=128, max_concurrent_steps=6),
    "wg2m_128x128_s4": TuningConfig(block_m=64, block_n=128, num_compute_wgs=2, wg_dim="m"),
    "wg2n_64x256_s3": TuningConfig(
        block_m=64, block_n=128, num_compute_wgs=2, wg_dim="n", max_concurrent_steps=3
    ),
}
ALL_SWEEP = {**SWEEP, **EXTRA_SWEEP}
if os.environ.get("BENCH_SWEEP"):  # e.g. BENCH_SWEEP=wg1_64x128_s8,wg2n_64x256_s6
    SWEEP = {k: ALL_SWEEP[k] for k in os.environ["BENCH_SWEEP"].split(",")}


def select_sweep(names: str) -> None:
    """Replace the swept configs by ``names`` (comma list of ALL_SWEEP keys); '' keeps them."""
    if not names:
        return
    unknown = [n for n in names.split(",") if n not in ALL_SWEEP]
    if unknown:
        raise SystemExit(f"--sweep-configs: unknown {unknown}; choose from {sorted(ALL_SWEEP)}")
    picked = {n: ALL_SWEEP[n] for n in names.split(",")}
    SWEEP.clear()
    SWEEP.update(picked)


def sweep_gemms(t, weights, scales, check):
    """Time gate/up and down for every SWEEP config at T tokens (E=48); with ``check``, also
    compare each config's output with the XLA path on the same inputs (1 - cos, max rel)."""
    ids, _ = routing(jax.random.key(t + 1), t)
    gs = sorted_rows(ids, 0, E)
    rows = int(gs.sum())
    key = jax.random.key(t)
    xq = jax.random.normal(key, (rows, D), jnp.float32).astype(jnp.float8_e4m3fn)
    xs = jax.random.uniform(key, (rows, D // 128), jnp.float32, 0.5, 1.5) / 448
    hq = jax.random.normal(key, (rows, F), jnp.float32).astype(jnp.float8_e4m3fn)
    hs = jax.random.uniform(key, (rows, F // 128), jnp.float32, 0.5, 1.5) / 448
    wg, wu, wd = weights
    sg, su, sd = scales
    out = []
    want = None
    if check:
        want = (
            api.grouped_swiglu(
                xq, wg, wu, gs, x_scale=xs, w_gate_scale=sg, w_up_scale=su, implementation="xla"
            ),
            api.grouped_matmul(hq, wd, gs, x_scale=hs, w_scale=sd, implementation="xla"),
        )
    for name, cfg in SWEEP.items():
        kw = dict(implementation=IMPL, config=cfg)
        r = {"sweep": name, "T": t, "rows": rows}
        try:
            gu = jax.jit(
                lambda x, a, b, s, sa, sb, kw=kw: api.grouped_swiglu(
                    x, a, b, gs, x_scale=s, w_gate_scale=sa, w_up_scale=sb, **kw
                )
            )
            dn = jax.jit(
                lambda x, a, s, sa, kw=kw: api.grouped_matmul(x, a, gs, x_scale=s, w_scale=sa, **kw)
            )
            r["gate_up_ms"] = ms(gu, xq, wg, wu, xs, sg, su)
            r["down_ms"] = ms(dn, hq, wd, hs, sd)
            r["gate_up_TFLOPs"] = 4 * F * D * rows / (r["gate_up_ms"] * 1e-3) / 1e12
            r["down_TFLOPs"] = 2 * F * D * rows / (r["down_ms"] * 1e-3) / 1e12
            active = int((gs > 0).sum())
            r["gate_up_weight_GBs"] = active * 2 * F * D / (r["gate_up_ms"] * 1e-3) / 1e9
            r["down_weight_GBs"] = active * F * D / (r["down_ms"] * 1e-3) / 1e9
            if check:
                got = (gu(xq, wg, wu, xs, sg, su), dn(hq, wd, hs, sd))
                for tag, a, b in zip(("gate_up", "down"), got, want, strict=True):
                    a = np.asarray(a.astype(jnp.float32), np.float64)
                    b = np.asarray(b.astype(jnp.float32), np.float64)
                    r[f"{tag}_cos_diff"] = float(
                        1 - (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
                    )
                    r[f"{tag}_max_rel"] = float(np.abs(a - b).max() / np.abs(b).max())
        except Exception as e:  # noqa: BLE001 - a failing variant must not stop the sweep
            r["error"] = repr(e)[-300:]
        out.append(r)
        print(short(r), flush=True)
    return out


def pick_config(sweeps, t):
    """Fastest swept config (gate_up + down) at the swept T nearest to t (log scale)."""
    ts = sorted({r["T"] for r in sweeps})
    if not ts:
        return None, None
    near = min(ts, key=lambda x: abs(np.log2(x) - np.log2(t)))
    ok = [
        r
        for r in sweeps
        if r["T"] == near
        and "error" not in r
        and r.get("gate_up_cos_diff", 0) < 1e-3
        and r.get("down_cos_diff", 0) < 1e-3
    ]
    if not ok:
        return None, None
    best = min(ok, key=lambda r: r["gate_up_ms"] + r["down_ms"])
    return best["sweep"], SWEEP[best["sweep"]]


def short(r):
    """One compact stdout line of a result dict (floats to 4 significant digits)."""
    return json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()})


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,128,256,512,1024,2048,4096,8192")
    ap.add_argument("--shards", default="48,16,24")
    ap.add_argument("--shard-tokens", default="256,2048", help="T values for EP shards < 48")
    ap.add_argument("--sweep-tokens", default="256,2048,8192")
    ap.add_argument("--baseline-tokens", default="256,2048")
    ap.add_argument("--max-xla-tokens", type=int, default=2048)
    ap.add_argument("--out", default="moe_results.json")
    ap.add_argument(
        "--sweep-configs",
        default="",
        help=f"comma list of configs to sweep (default: {','.join(SWEEP)}); any of "
        f"{','.join(ALL_SWEEP)}",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (D = F = 256, XLA path)")
    args = ap.parse_args(argv)
    if args.tiny:
        set_tiny()
        args.tokens, args.shards, args.sweep_tokens, args.baseline_tokens = "64", "48", "64", ""
        args.sweep_configs = args.sweep_configs or "wg1_64x128_s4"
    return args


def main(argv=None):
    args = parse_args(argv)
    select_sweep(args.sweep_configs)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    harness.print_json({"copy_probe": harness.copy_probe()})
    extra = {"torch_dense_fp8_TFLOPs": torch_dense_fp8_tflops() if IMPL == "pallas" else None}
    extra["sweep_configs"] = {n: dataclasses.asdict(c) for n, c in SWEEP.items()}
    extra["shapes"] = {"D": D, "F": F, "E": E, "top_k": TOPK, "impl": IMPL}
    extra["sweep"] = []
    results = []

    def save():
        return harness.write_results(args.out, results, bench="moe", **extra)

    sh_w, sh_s = make_weights(jax.random.key(1000), 1, jnp.float8_e4m3fn)
    shared = (sh_w[0][0], sh_w[1][0], sh_w[2][0], sh_s[0][0], sh_s[1][0], sh_s[2][0])
    for e_local in ints(args.shards):
        weights, scales = make_weights(jax.random.key(e_local), e_local, jnp.float8_e4m3fn)
        if e_local == E:
            for i, t in enumerate(ints(args.sweep_tokens)):
                extra["sweep"] += sweep_gemms(t, weights, scales, check=i == 0)
                save()
        want_bl = e_local == E and ints(args.baseline_tokens)  # their weights: 7 GB bf16
        baselines = make_baselines(e_local, args.max_xla_tokens) if want_bl else {}
        for t in ints(args.tokens) if e_local == E else ints(args.shard_tokens):
            name, cfg = pick_config(extra["sweep"], t)
            bl = baselines if t in ints(args.baseline_tokens) else {}
            try:
                r = bench_case(
                    t, e_local, weights, scales, shared, cfg, bl, extra["torch_dense_fp8_TFLOPs"]
                )
            except Exception as e:  # noqa: BLE001
                r = harness.error_row("moe_layer", {"T": t, "E_local": e_local}, e, T=t,
                                      E_local=e_local)  # fmt: skip
            r["config"] = name
            results.append(r)
            print(short(r), flush=True)
            save()
        del weights, scales, baselines
    doc = save()
    summary = {f"T{r['T']}_E{r['E_local']}": round(r.get("layer_ms", -1), 3) for r in results}
    keep = ("device", "jax", "commit", "copy_GBps", "torch_dense_fp8_TFLOPs")
    harness.print_json({**{k: doc[k] for k in keep}, "layer_ms": summary})


if __name__ == "__main__":
    sys.exit(main())
