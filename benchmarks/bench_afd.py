"""AFD decode step on GPUs at Step-3 layer shapes, against the non-disaggregated baseline.

Random weights (FP8 e4m3 + 128x128 block scales, or bf16) with Step-3's real layer shapes and
as many layers as the FFN device fits (first layer dense, the rest MoE). Per run: TPOT (median
blocked step), device time per step (steps enqueued back to back), host overhead (their
difference), per-layer attention time, FFN time and transfer time (the same compiled program
with only one stage switched on), tokens/s/GPU; then the DP+EP baseline on the same GPUs at
several batches, and the baseline batch whose TPOT is closest to AFD's.

    python3 benchmarks/bench_afd.py --layout 1A1F --layers 12 --out r.json

Last stdout line: the JSON (schema of `step3_jax.cost.simulator.load_measured`, plus extras).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax.config import Step3Config  # noqa: E402
from step3_jax.quant_model import Fp8Weight  # noqa: E402
from step3_jax.sharding.afd import AfdConfig, AfdExecutor  # noqa: E402
from step3_jax.sharding.baseline import BaselineExecutor  # noqa: E402
from step3_jax.sharding.layout import AfdLayout, ArenaDtypes  # noqa: E402


def bench_config(layers: int, tiny: bool = False, full: bool = False) -> Step3Config:
    """Step-3 layer shapes with ``layers`` layers (first dense, rest MoE); ``full``: the real
    61-layer Step-3 (5 dense layers, 56 MoE)."""
    base = Step3Config.tiny() if tiny else Step3Config.step3()
    if full:
        return base
    return dataclasses.replace(base, num_layers=layers, moe_layer_ids=tuple(range(1, layers)))


def _inputs(batch: int, context: int, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128000, (batch, 1)).astype(np.int32)
    # Ragged contexts in [context/2, context): the cache must hold `context` slots.
    pos = rng.integers(context // 2, context - 1, (batch, 1)).astype(np.int32)
    return tokens, pos, np.zeros((batch,), np.int32)


def _time(fn, reps: int) -> tuple[float, float]:
    """(median blocked seconds per call, pipelined seconds per call): the harness's host
    times (no CUPTI: a multi-GPU step's kernels on several devices do not sum to a time)."""
    t = harness.time_calls(fn, reps=reps, warmup=2, device_time=False)
    return t.host_us * 1e-6, t.host_loop_us * 1e-6


def run_afd(args, cfg, layout, devices, num_mb: int, microbatch: int, stages: bool) -> dict:
    dtypes = ArenaDtypes(weight=args.weights, cache=args.cache)
    afd = AfdConfig(
        microbatch,
        num_mb,
        args.context,
        fp8_transfer=True,
        ffn_implementation=args.ffn_impl,
        attention_implementation=args.attention_impl,
        experts_in_place=not args.experts_copied,
    )
    ex = AfdExecutor(cfg, layout, devices, afd, dtypes=dtypes)
    ex.load_random(seed=1)
    tokens, pos, sel = _inputs(ex.batch, args.context)
    tpot, pipelined = _time(lambda: ex.step(tokens, pos, sel), args.reps)
    stage = {"attention": float("nan"), "ffn": float("nan"), "exchange": float("nan")}
    for name in ("attention", "ffn", "exchange") if stages else ():
        part = AfdExecutor(cfg, layout, devices, afd, dtypes=dtypes, stages=(name,))
        part.arenas, ex.arenas = ex.arenas, None
        stage[name], _ = _time(lambda part=part: part.step(tokens, pos, sel), args.reps)
        ex.arenas, part.arenas = part.arenas, None
    try:  # XLA temp memory of the step: an arena-sourced weight copy would show up here
        args_ = [ex._per_device(a) for a in (tokens, pos, sel)]
        mem = ex._program.lower(ex.arenas, *args_).compile().memory_analysis()
        temp_gib = mem.temp_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001
        temp_gib = -1.0
    items = cfg.num_layers * num_mb
    ticks = len(ex.schedule)
    n_gpu = layout.num_devices
    ex.arenas = None  # free the device memory before the next configuration
    return {
        "name": f"afd_{layout.name}_mb{num_mb}x{microbatch}",
        "cache": args.cache,
        "attention_impl": str(args.attention_impl),
        "experts_in_place": not args.experts_copied,
        "layout": layout.name,
        "gpus_per_instance": 1,
        "num_layers": cfg.num_layers,
        "micro_batches": num_mb,
        "batch": ex.batch,
        "tokens_per_attention_gpu_per_microbatch": microbatch,
        "attn_us_per_layer": stage["attention"] / items * 1e6,
        "ffn_us_per_layer": stage["ffn"] / items * 1e6,
        "transfer_us_per_layer": stage["exchange"] / ticks * 1e6,
        "measured_step_ms": tpot * 1e3,
        "device_step_ms": pipelined * 1e3,
        "host_overhead_ms": max(tpot - pipelined, 0.0) * 1e3,
        "ticks": ticks,
        "tokens_per_s_per_gpu": ex.batch / tpot / n_gpu,
        "arena_gib_per_device": ex.arena.bytes_per_device() / 2**30,
        "arena": ex.arena.report(),
        "xla_temp_gib": temp_gib,
        "ffn_plain_arrays_us_per_layer": (
            _plain_ffn_us(args, cfg, layout, devices[-1], microbatch) if stages else float("nan")
        ),
    }


def _plain_ffn_us(args, cfg, layout, device, microbatch: int) -> float:
    """Control: one MoE layer's FFN-device work (the same `protocol.ffn_partial`) on plain
    arrays instead of arena views, same token count; the gap to ``ffn_us_per_layer`` is the
    arena's cost."""
    from step3_jax.sharding import protocol
    from step3_jax.sharding.layout import ffn_local_dims

    loc = ffn_local_dims(cfg, layout)
    d, e, f, fs = cfg.hidden_size, loc["experts"], loc["moe_f"], loc["shared_f"]
    t = layout.num_attention * microbatch
    key = iter(jax.random.split(jax.random.key(5), 16))
    with jax.default_device(device):
        fp8 = args.weights == "float8_e4m3fn"

        def w(shape, nb):
            if fp8:
                return _random_fp8(next(key), shape, 1, nb)
            return (jax.random.normal(next(key), shape) * 0.02).astype(jnp.bfloat16)

        p = {
            "gate": w((e, f, d), 1),
            "up": w((e, f, d), 1),
            "down": w((e, d, f), 1),
            "shared_gate": w((fs, d), 0),
            "shared_up": w((fs, d), 0),
            "shared_down": w((d, fs), 0),
        }
        x = jax.random.normal(next(key), (t, d), jnp.float32)
        from step3_jax import quant

        vals, scales = quant.quantize_activations(x)
        ids = jax.random.randint(next(key), (t, cfg.top_k), 0, cfg.num_experts)
        wts = jax.random.uniform(next(key), (t, cfg.top_k))
        packet = protocol.Packet(vals, scales, ids.astype(jnp.int32), wts)
        fn = jax.jit(
            lambda pk, p: protocol.ffn_partial(
                pk, p, is_moe=True, first_expert=0, dtype=jnp.bfloat16, implementation=args.ffn_impl
            )
        )
        med, _ = _time(lambda: fn(packet, p), args.reps)
    return med * 1e6


def _baseline_weights(cfg, n: int, weights: str, mesh_dp, mesh_rep):
    """Random DP+EP parameters: attention stacked [L, ...] replicated; FFN [n, Lk, ...]."""
    from step3_jax.sharding.layout import ffn_local_dims

    d, r, nh, h, e = (
        cfg.hidden_size,
        cfg.share_q_dim,
        cfg.num_heads,
        cfg.head_dim,
        cfg.num_experts,
    )
    L, nm, nd = cfg.num_layers, len(cfg.moe_layer_ids), len(cfg.dense_layer_ids)
    loc = ffn_local_dims(cfg, AfdLayout(1, n, 1))
    el, f, fs, fd = loc["experts"], loc["moe_f"], loc["shared_f"], loc["dense_f"]
    lin = {
        "q_proj": ((L, r, d), 1, 1),
        "k_proj": ((L, h, d), 1, 1),
        "v_proj": ((L, h, d), 1, 1),
        "wq": ((L, nh, h, r), 1, 1),
        "o_proj": ((L, d, nh, h), 2, 1),
    }
    norms = {"input_norm": (L, d), "inter_norm": (L, r), "post_norm": (L, d), "router": (L, e, d)}
    ffn = {
        "gate": ((n, nm, el, f, d), 1, 3),
        "up": ((n, nm, el, f, d), 1, 3),
        "down": ((n, nm, el, d, f), 1, 3),
        "shared_gate": ((n, nm, fs, d), 1, 2),
        "shared_up": ((n, nm, fs, d), 1, 2),
        "shared_down": ((n, nm, d, fs), 1, 2),
        "dense_gate": ((n, nd, fd, d), 1, 2),
        "dense_up": ((n, nd, fd, d), 1, 2),
        "dense_down": ((n, nd, d, fd), 1, 2),
    }
    key = iter(jax.random.split(jax.random.key(3), 64))

    def make(shape, nc, nb, sh):
        if weights != "float8_e4m3fn":
            return jax.jit(
                lambda k: (jax.random.normal(k, shape) * 0.02).astype(jnp.bfloat16),
                out_shardings=sh,
            )(next(key))
        return jax.jit(lambda k: _random_fp8(k, shape, nc, nb), out_shardings=sh)(next(key))

    attn = {k: make(s, nc, nb, mesh_rep) for k, (s, nc, nb) in lin.items()}
    attn |= {
        k: jax.jit(
            lambda k_, s=s: (
                jnp.ones(s, jnp.bfloat16) + 0.01 * jax.random.normal(k_, s, jnp.bfloat16)
            ),
            out_shardings=mesh_rep,
        )(next(key))
        for k, s in norms.items()
    }
    ffn_w = {
        k: make(s, nc, nb, mesh_dp)
        for k, (s, nc, nb) in ffn.items()
        if s[1] > 0 and s[-1] > 0 and s[-2] > 0
    }
    v = cfg.vocab_size
    glob = {
        k: jax.jit(
            lambda k_, s=s: (0.02 * jax.random.normal(k_, s)).astype(jnp.bfloat16),
            out_shardings=mesh_rep,
        )(next(key))
        for k, s in (("embed", (v, d)), ("lm_head", (v, d)), ("final_norm", (d,)))
    }
    return glob, attn, ffn_w


def _random_fp8(key, shape, num_contract, num_batch):
    """Random block-FP8 weight: e4m3 values ~N(0, 64^2), every block scale 2e-4 (so the
    dequantized weight is ~N(0, 0.013^2), about 1/sqrt(7168): activations stay O(1))."""
    vals = jnp.clip(jax.random.normal(key, shape) * 64, -448, 448).astype(jnp.float8_e4m3fn)
    lead, rest = shape[:num_batch], shape[num_batch:]
    n, k = int(np.prod(rest[: len(rest) - num_contract])), int(np.prod(rest[-num_contract:]))
    scales = jnp.full((*lead, -(-n // 128), -(-k // 128)), 2e-4, jnp.float32)
    return Fp8Weight(vals, scales, num_contract=num_contract)


def run_baseline(args, cfg, devices, per_device: int) -> dict:
    n = len(devices)
    ex = BaselineExecutor(
        cfg,
        devices,
        batch=per_device * n,
        max_len=args.context,
        fp8_transfer=True,
        act_dtype=jnp.bfloat16,
        cache_dtype=jnp.dtype(args.cache),
        ffn_implementation=args.ffn_impl,
        attention_implementation=args.attention_impl,
    )
    ex.glob, ex.attn, ex.ffn = _baseline_weights(cfg, n, args.weights, ex.dp, ex.rep)
    tokens, pos, sel = _inputs(per_device * n, args.context)
    tpot, pipelined = _time(lambda: ex.step(tokens, pos, sel), args.reps)
    ex.glob = ex.attn = ex.ffn = ex.cache = None  # free the device memory
    return {
        "name": f"baseline_dp_ep_{n}gpu_b{per_device}",
        "gpus": n,
        "batch": per_device * n,
        "measured_step_ms": tpot * 1e3,
        "device_step_ms": pipelined * 1e3,
        "host_overhead_ms": max(tpot - pipelined, 0.0) * 1e3,
        "tokens_per_s_per_gpu": per_device * n / tpot / n,
    }


def _guard(results, label, fn):
    t0 = time.perf_counter()
    try:
        out = fn()
        out["wall_s"] = time.perf_counter() - t0
        results.append(out)
        print(json.dumps(out), flush=True)
    except Exception as e:  # noqa: BLE001 - one failed config must not lose the others
        traceback.print_exc()
        results.append({"name": label, "error": f"{type(e).__name__}: {e}"[:2000]})
    finally:
        gc.collect()  # drop the finished run's arenas before the next one allocates
        jax.clear_caches()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", default="1A1F")
    p.add_argument("--ffn-ep", type=int, default=None)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--microbatch", type=int, default=128)
    p.add_argument("--micro-batches", default="3,2,1")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--weights", default="float8_e4m3fn", choices=["float8_e4m3fn", "bfloat16"])
    p.add_argument("--ffn-impl", default="grouped", choices=["grouped", "dense"])
    p.add_argument("--baseline-batches", default="128,256,512")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    p.add_argument("--full", action="store_true", help="the real 61-layer Step-3")
    p.add_argument("--cache", default="bfloat16", choices=["bfloat16", "float8_e4m3fn"])
    p.add_argument("--attention-impl", default="xla", choices=["xla", "pallas"])
    p.add_argument("--experts-copied", action="store_true", help="control: slice experts")
    p.add_argument(
        "--runs", default="", help="'MxBm,...' (micro-batches x sequences each); overrides "
        "--micro-batches/--microbatch"
    )  # fmt: skip
    p.add_argument("--stage-runs", type=int, default=99, help="stage breakdown for the first N")
    args = p.parse_args(argv)
    layout = AfdLayout.parse(args.layout, ffn_ep=args.ffn_ep)
    devices = jax.devices()[: layout.num_devices]
    cfg = bench_config(args.layers, args.tiny, args.full)
    runs: list[dict] = []
    base: list[dict] = []
    harness.copy_probe()  # before any arena fills the device memory

    def save() -> dict:  # after every config: a timeout still leaves the finished ones
        # Harness provenance + the `step3_jax.cost.simulator.load_measured` schema ("runs").
        extra = dict(
            jax_version=jax.__version__,
            devices_used=len(devices),
            config=vars(args),
            runs=[r for r in runs if "error" not in r],
            baseline=base,
            errors=[r for r in runs if "error" in r],
        )
        if args.out:
            return harness.write_results(args.out, [], bench="afd", **extra)
        return harness.results("afd", [], **extra)

    plan = [tuple(int(v) for v in r.split("x")) for r in args.runs.split(",") if r]
    plan = plan or [(int(m), args.microbatch) for m in args.micro_batches.split(",") if m]
    for i, (m, bm) in enumerate(plan):
        stages = i < args.stage_runs
        _guard(
            runs,
            f"afd_mb{m}x{bm}",
            lambda m=m, bm=bm, st=stages: run_afd(args, cfg, layout, devices, m, bm, st),
        )
        save()
    for b in [int(x) for x in args.baseline_batches.split(",") if x]:
        _guard(base, f"baseline_b{b}", lambda b=b: run_baseline(args, cfg, devices, b))
        save()
    result = save()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
