"""Benchmark MFA decode attention (64 heads, one 256-wide K/V head) against its baselines.

For each B x context: us per call (kernel time from CUPTI via mosaic profiler.measure, median
over rotated input sets larger than L2), effective GB/s over all bytes the kernel must read
(KV + scales + q), and % of the device copy bandwidth measured in the same run. Side by side:
our Pallas kernel (FP8 and bf16 cache), the XLA implementation (FP8 and bf16), the JAX Triton
decode-attention example (bf16), torch SDPA (bf16, CUDA events) and cuDNN through
jax.nn.dot_product_attention (bf16) when it runs.

    python3 benchmarks/bench_mfa_decode.py --out /tmp/res [--quick]

Last stdout line: one JSON object (also written to --out/mfa_decode_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.provenance import git_commit
from step3_jax.kernels.mfa_decode import mfa_decode_attention
from step3_jax.quant import quantize_kv

N, H = 64, 256
L2_BYTES = 50 * 2**20


def _measure_us(fn, arg_sets, reps=5):
    """Median kernel time (us) over reps x rotated arg sets; CUPTI when available."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        meas = profiler.measure(fn)
        for a in arg_sets[:2]:
            jax.block_until_ready(meas(*a)[0])
        times = []
        for _ in range(reps):
            for a in arg_sets:
                out, t_ms = meas(*a)
                if t_ms is not None:
                    times.append(t_ms * 1e3)
        if times:
            return statistics.median(times), "cupti"
    except Exception as e:  # noqa: BLE001 - fall back to wall clock
        print("cupti measure failed:", type(e).__name__, str(e)[:200], file=sys.stderr)
    jax.block_until_ready(fn(*arg_sets[0]))
    n = reps * len(arg_sets)
    t0 = time.perf_counter()
    for i in range(n):
        out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e6, "wall"


def copy_bandwidth_gbs(nbytes=2 * 2**30):
    """Device-to-device copy (read + write) of a large f32 array, GB/s."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    us, _ = _measure_us(f, [(x,)], reps=10)
    return 2 * nbytes / (us * 1e-6) / 1e9


def make_inputs(seed, b, s, fp8):
    key = jax.random.key(seed)
    kq, kk, kv, kl = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, 1, N, H), jnp.bfloat16)
    k = jax.random.normal(kk, (b, s, H), jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, H), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)  # full contexts: every byte is read
    if fp8:
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        return dict(q=q, k=k, v=v, lengths=lengths, k_scale=ks, v_scale=vs)
    return dict(q=q, k=k, v=v, lengths=lengths)


def bytes_read(b, s, fp8):
    kv = 2 * b * s * H * (1 if fp8 else 2)
    scales = 2 * b * s * 4 if fp8 else 0
    return kv + scales + b * N * H * 2


def _arg_sets(b, s, fp8, nbytes):
    n = int(min(8, max(1, -(-3 * L2_BYTES // nbytes))))
    return [make_inputs(i, b, s, fp8) for i in range(n)]


def bench_ours(b, s, fp8, impl, config=None):
    sets = _arg_sets(b, s, fp8, bytes_read(b, s, fp8))
    fn = jax.jit(lambda d: mfa_decode_attention(**d, implementation=impl, config=config))
    return _measure_us(fn, [(d,) for d in sets])


def kernel_breakdown(b, s, fp8):
    """Per-kernel CUPTI times (us) of one pallas call: the Mosaic kernel, q quantization, etc."""
    from jax.experimental.mosaic.gpu import profiler

    d = make_inputs(0, b, s, fp8)
    fn = jax.jit(lambda d: mfa_decode_attention(**d, implementation="pallas"))
    jax.block_until_ready(fn(d))
    _, per_kernel = profiler.measure(fn, aggregate=False)(d)
    return [(name[:80], round(t * 1e3, 2)) for name, t in per_kernel or []]


VARIANTS = {  # name -> (fp8, TuningConfig kwargs); measured side by side at the target shapes
    "pallas_fp8[head,8bit,stages=4]": (True, dict(v_load="8bit", num_stages=4)),
    "pallas_fp8[seq,8bit,stages=4]": (True, dict(wg_split="seq", num_stages=4)),
    "pallas_fp8[seq,wgmma,stages=4]": (True, dict(wg_split="seq", v_load="wgmma", num_stages=4)),
    "pallas_fp8[seq,8bit,stages=2]": (True, dict(wg_split="seq", num_stages=2)),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel"),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,q_tma]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,ring_epi]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel", ring_epilogue=True),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,q_tma,ring_epi]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True, ring_epilogue=True),
    ),
    "pallas_bf16[head,stages=2]": (False, dict(num_stages=2)),
    "pallas_bf16[seq,stages=2]": (False, dict(wg_split="seq", num_stages=2)),
}
# Further variants, measured only when named in --extra-variants (the H200 tuning run): the
# q-in-kernel form of the other FP8 choices, since q_in_kernel is the H100 default.
EXTRA_VARIANTS = {
    "pallas_fp8[seq,wgmma,stages=4,q_in_kernel]": (
        True,
        dict(wg_split="seq", v_load="wgmma", num_stages=4, q_quant="kernel"),
    ),
    "pallas_fp8[seq,8bit,stages=2,q_in_kernel]": (
        True,
        dict(wg_split="seq", num_stages=2, q_quant="kernel"),
    ),
    "pallas_fp8[head,8bit,stages=4,q_in_kernel]": (True, dict(num_stages=4, q_quant="kernel")),
    "pallas_fp8[head,8bit,stages=3,q_in_kernel]": (True, dict(num_stages=3, q_quant="kernel")),
    # The tuned FP8 default with the e4m3 -> f16 V conversion done by the memory warpgroup
    # (v_convert="memory"), with and without q staged by TMA (benchmarks/gpu_vconvert_check.sh).
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,q_tma,ring_epi,vcvt_mem]": (
        True,
        dict(
            wg_split="seq",
            num_stages=4,
            q_quant="kernel",
            q_tma=True,
            ring_epilogue=True,
            v_convert="memory",
        ),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,ring_epi,vcvt_mem]": (
        True,
        dict(
            wg_split="seq", num_stages=4, q_quant="kernel", ring_epilogue=True, v_convert="memory"
        ),
    ),
}
FP8_CONFIG = {}  # TuningConfig kwargs for the sweep's pallas_fp8 rows (--fp8-split)
BF16_CONFIG = {}  # same for pallas_bf16 rows; set only by --config-from-variants


def variants(shapes, copy_gbs, table=None):
    """Time every variant of ``table`` (default VARIANTS) at each (B, S) of ``shapes``."""
    from step3_jax.kernels.mfa_decode import TuningConfig

    rows = []
    for b, s in shapes:
        for name, (fp8, kw) in (table or VARIANTS).items():
            cfg = TuningConfig(**kw)
            rows.append(
                _row(
                    name,
                    b,
                    s,
                    fp8,
                    functools.partial(bench_ours, b, s, fp8, "pallas", cfg),
                    copy_gbs,
                )
            )
    return rows


def best_variant(rows, table, fp8):
    """Name of the ``fp8`` variant of ``table`` with the lowest mean of us / (best us at that
    shape) over the shapes where it ran; only variants that ran at every shape count."""
    names = [n for n, (f, _) in table.items() if f == fp8]
    ok = [r for r in rows if r["impl"] in names and "us" in r]
    shapes = {(r["B"], r["ctx"]) for r in ok}
    if not shapes:
        return None
    best = {sh: min(r["us"] for r in ok if (r["B"], r["ctx"]) == sh) for sh in shapes}
    score = {}
    for n in names:
        mine = [r for r in ok if r["impl"] == n]
        if len(mine) == len(shapes):
            score[n] = sum(r["us"] / best[(r["B"], r["ctx"])] for r in mine) / len(mine)
    return min(score, key=score.get) if score else None


def bench_triton_example(b, s):
    from jax.experimental.pallas.ops.gpu import decode_attention as da

    sets = _arg_sets(b, s, False, bytes_read(b, s, False))
    # block_k=64: the example's default 256 needs 272 KiB of shared memory at head dim 256.
    fn = jax.jit(
        lambda d: da.mqa(d["q"][:, 0], d["k"], d["v"], kv_seq_len=d["lengths"], block_k=64)
    )
    return _measure_us(fn, [(d,) for d in sets])


def bench_cudnn(b, s):
    sets = _arg_sets(b, s, False, bytes_read(b, s, False))

    def f(d):
        return jax.nn.dot_product_attention(
            d["q"],
            d["k"][:, :, None],
            d["v"][:, :, None],
            key_value_seq_lengths=d["lengths"],
            implementation="cudnn",
        )

    return _measure_us(jax.jit(f), [(d,) for d in sets])


def bench_torch_sdpa(b, s, reps=20):
    import torch
    import torch.nn.functional as F

    nbytes = bytes_read(b, s, False)
    n_sets = int(min(8, max(1, -(-3 * L2_BYTES // nbytes))))
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    sets = [(mk(b, N, 1, H), mk(b, 1, s, H), mk(b, 1, s, H)) for _ in range(n_sets)]
    call = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for qkv in sets:
        call(*qkv)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps * n_sets):
        call(*sets[i % n_sets])
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * n_sets), "cuda_events"


def _row(name, b, s, fp8, fn, copy_gbs):
    try:
        us, how = fn()
    except Exception as e:  # noqa: BLE001 - a failing baseline is recorded, not fatal
        return {"impl": name, "B": b, "ctx": s, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    gbs = bytes_read(b, s, fp8) / (us * 1e-6) / 1e9
    row = {"impl": name, "B": b, "ctx": s, "us": round(us, 2), "GBps": round(gbs, 1)}
    row.update(pct_copy=round(100 * gbs / copy_gbs, 1), timer=how)
    print(json.dumps(row), flush=True)
    return row


def sweep(batches, contexts, impls, copy_gbs, rows, flush):
    for s in contexts:
        for b in batches:
            if bytes_read(b, s, False) > 12 * 2**30:
                continue
            plan = _plan(b, s)
            for name in impls:
                fp8, fn = plan[name]
                rows.append(_row(name, b, s, fp8, fn, copy_gbs))
                flush()
    return rows


def _fp8_config():
    from step3_jax.kernels.mfa_decode import TuningConfig

    return TuningConfig(**FP8_CONFIG) if FP8_CONFIG else None


def _bf16_config():
    from step3_jax.kernels.mfa_decode import TuningConfig

    return TuningConfig(**BF16_CONFIG) if BF16_CONFIG else None


def _plan(b, s):
    return {
        "pallas_fp8": (True, lambda: bench_ours(b, s, True, "pallas", _fp8_config())),
        "pallas_bf16": (False, lambda: bench_ours(b, s, False, "pallas", _bf16_config())),
        "xla_fp8": (True, lambda: bench_ours(b, s, True, "xla")),
        "xla_bf16": (False, lambda: bench_ours(b, s, False, "xla")),
        "jax_triton_example_bf16": (False, lambda: bench_triton_example(b, s)),
        "torch_sdpa_bf16": (False, lambda: bench_torch_sdpa(b, s)),
        "cudnn_bf16": (False, lambda: bench_cudnn(b, s)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="1024,4096,8192,32768")
    ap.add_argument(
        "--impls",
        default="pallas_fp8,pallas_bf16,xla_fp8,xla_bf16,"
        "jax_triton_example_bf16,torch_sdpa_bf16,cudnn_bf16",
    )
    ap.add_argument("--variants", default="128x4096,8x32768", help="BxS shapes, '' for none")
    ap.add_argument("--fp8-split", default="", help="'seq' or 'head': pallas_fp8 sweep config")
    ap.add_argument(
        "--extra-variants",
        default="",
        help="'all' or a '|'-separated list of further variants to time (names contain "
        f"commas): {' | '.join(EXTRA_VARIANTS)}",
    )
    ap.add_argument(
        "--config-from-variants",
        action="store_true",
        help="sweep pallas_fp8 / pallas_bf16 with the fastest variant (mean of us / best us over "
        "the --variants shapes) instead of the tuned table",
    )
    ap.add_argument(
        "--only-variants",
        default="",
        help="'|'-separated substrings: time only the variants whose names contain one",
    )
    args = ap.parse_args()
    table = dict(VARIANTS)
    if args.extra_variants:
        names = list(EXTRA_VARIANTS) if args.extra_variants == "all" else args.extra_variants
        names = [n for n in names.split("|") if n] if isinstance(names, str) else names
        unknown = [n for n in names if n not in EXTRA_VARIANTS]
        if unknown:
            raise SystemExit(
                f"--extra-variants: unknown {unknown}; choose from {list(EXTRA_VARIANTS)}"
            )
        table.update({n: EXTRA_VARIANTS[n] for n in names})
    if args.only_variants:
        keep = [w for w in args.only_variants.split("|") if w]
        table = {n: v for n, v in table.items() if any(w in n for w in keep)}
    if args.fp8_split:
        FP8_CONFIG.update(wg_split=args.fp8_split)
    dev = jax.devices()[0]
    copy_gbs = copy_bandwidth_gbs()
    print(json.dumps({"copy_GBps": round(copy_gbs, 1), "device": dev.device_kind}), flush=True)
    commit = git_commit()
    result = {
        "bench": "mfa_decode",
        "device": dev.device_kind,
        "jax": jax.__version__,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "copy_GBps": round(copy_gbs, 1),
        "timer_note": TIMER_NOTE,
        "rows": [],
    }
    tag = dev.device_kind.replace(" ", "_")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mfa_decode_{tag}.json")

    def flush():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    try:
        result["breakdown_fp8_B128_4K"] = kernel_breakdown(128, 4096, True)
        print(json.dumps({"breakdown": result["breakdown_fp8_B128_4K"]}), flush=True)
    except Exception as e:  # noqa: BLE001
        result["breakdown_fp8_B128_4K"] = f"{type(e).__name__}: {str(e)[:200]}"
    shapes = [tuple(int(x) for x in v.split("x")) for v in args.variants.split(",") if v]
    result["variants"] = variants(shapes, copy_gbs, table)
    if args.config_from_variants:
        for fp8, cfg in ((True, FP8_CONFIG), (False, BF16_CONFIG)):
            name = best_variant(result["variants"], table, fp8)
            if name:
                cfg.clear()
                cfg.update(table[name][1])
            result["sweep_config_" + ("fp8" if fp8 else "bf16")] = name
        print(json.dumps({k: v for k, v in result.items() if k.startswith("sweep_config")}))
    flush()
    sweep(
        [int(x) for x in args.batches.split(",")],
        [int(x) for x in args.contexts.split(",")],
        args.impls.split(","),
        copy_gbs,
        result["rows"],
        flush,
    )
    flush()
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "variants")}))


TIMER_NOTE = (
    "JAX rows: CUPTI kernel time summed over every kernel of the call (q quantization and the "
    "split-K combine included), median over reps x rotated input sets (>= 3x L2 bytes). torch: "
    "CUDA events around a loop of calls (includes launch gaps)."
)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
