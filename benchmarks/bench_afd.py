"""AFD decode step on GPUs at Step-3 layer shapes, against the non-disaggregated baseline.

Random weights (FP8 e4m3 + 128x128 block scales, or bf16) with Step-3's real layer shapes and
as many layers as the FFN device fits (first layer dense, the rest MoE). Per run: TPOT (median
blocked step), device time per step (steps enqueued back to back), host overhead (their
difference), per-layer attention time, FFN time and transfer time (the same compiled program
with only one stage switched on), tokens/s/GPU; then the DP+EP baseline on the same GPUs at
several batches, and the baseline batch whose TPOT is closest to AFD's.

    python3 benchmarks/bench_afd.py --layout 1A1F --layers 12 --out r.json

``--role attention|ffn|both`` (one GPU): one device's side of the layout's step (attention
device 0, or FFN device 0) as the same compiled program the AFD step uses
(`AfdExecutor(role=...)`), the exchange replaced by local buffers (the FFN side reads a fixed
random inbox with uniform routing), timed with the harness (CUPTI device time) against the bytes
that side must move and the same-run copy probe; ``both`` also writes a ``runs`` entry per
batch (per-layer times of both roles) for ``step3-jax cost simulate --measured`` and the
simulator's prediction of the whole layout at 1-3 micro-batches:

    python3 benchmarks/bench_afd.py --role both --layout 1A3F --full --runs 1x256,1x512 \\
        --cache float8_e4m3fn --out afd_roles.json

Full-size runs whose arenas fill most of the GPU go one per process (with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95): the allocator keeps an earlier run's memory regions, so a
larger arena after a smaller one in the same process runs out of memory (H200, 44 then 94.5
GiB). Each row's ``memory_gib`` records the allocator's state before and after the fill.

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
from step3_jax.cost import simulator  # noqa: E402
from step3_jax.kernels.grouped_gemm import moe as grouped_moe  # noqa: E402
from step3_jax.policy import KernelPolicy  # noqa: E402
from step3_jax.sharding import afd as afd_module  # noqa: E402
from step3_jax.sharding.afd import AfdConfig, AfdExecutor  # noqa: E402
from step3_jax.sharding.baseline import BaselineExecutor  # noqa: E402
from step3_jax.sharding.layout import AfdLayout, ArenaDtypes  # noqa: E402

QKV_ORDERS = ("auto", "cond", "barrier", "none")
QKV_HELP = (
    "how the reads of the arena for q/k/v are ordered before the in-place KV write "
    "(`afd._qkv_before_write`): auto (the product's rule), cond, barrier, none (experiments)"
)
_PRODUCT_QKV = afd_module._qkv_before_write


def set_qkv_order(name: str) -> None:
    """Overrides `afd._qkv_before_write`'s choice for an experiment (``--qkv-order``)."""
    if name not in QKV_ORDERS:
        raise ValueError(f"--qkv-order must be one of {QKV_ORDERS}, got {name!r}")
    forced = {"cond": True, "barrier": False}.get(name)

    def order(active, qkv, zeros, conditional):
        if name == "none":
            return qkv()
        return _PRODUCT_QKV(active, qkv, zeros, conditional if forced is None else forced)

    afd_module._qkv_before_write = order


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


def _afd_config(args, num_mb: int, microbatch: int) -> tuple[ArenaDtypes, AfdConfig]:
    afd = AfdConfig(
        microbatch,
        num_mb,
        args.context,
        fp8_transfer=True,
        policy=_policy(args),
        experts_in_place=not args.experts_copied,
    )
    dtypes = ArenaDtypes(weight=args.weights, cache=args.cache, v_transposed=args.v_transposed)
    return dtypes, afd


def per_us(seconds: float | None, count: int) -> float | None:
    """Microseconds per item; None (JSON null: not measured) stays None."""
    return None if seconds is None else seconds / count * 1e6


def run_afd(args, cfg, layout, devices, num_mb: int, microbatch: int, stages: bool) -> dict:
    dtypes, afd = _afd_config(args, num_mb, microbatch)
    ex = AfdExecutor(cfg, layout, devices, afd, dtypes=dtypes)
    ex.load_random(seed=1)
    tokens, pos, sel = _inputs(ex.batch, args.context)
    tpot, pipelined = _time(lambda: ex.step(tokens, pos, sel), args.reps)
    stage = {"attention": None, "ffn": None, "exchange": None}  # None: not measured (null)
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
        "v_transposed": args.v_transposed,
        "policy": str(_policy(args)),
        "experts_in_place": not args.experts_copied,
        "layout": layout.name,
        "gpus_per_instance": 1,
        "num_layers": cfg.num_layers,
        "micro_batches": num_mb,
        "batch": ex.batch,
        "tokens_per_attention_gpu_per_microbatch": microbatch,
        "attn_us_per_layer": per_us(stage["attention"], items),
        "ffn_us_per_layer": per_us(stage["ffn"], items),
        "transfer_us_per_layer": per_us(stage["exchange"], ticks),
        "measured_step_ms": tpot * 1e3,
        "device_step_ms": pipelined * 1e3,
        "host_overhead_ms": max(tpot - pipelined, 0.0) * 1e3,
        "ticks": ticks,
        "tokens_per_s_per_gpu": ex.batch / tpot / n_gpu,
        "arena_gib_per_device": ex.arena.bytes_per_device() / 2**30,
        "arena": ex.arena.report(),
        "xla_temp_gib": temp_gib,
    }


def _policy(args) -> KernelPolicy:
    auto = lambda v: None if v == "auto" else v
    return KernelPolicy(
        auto(args.attention_impl),
        auto(args.gemm_impl),
        auto(args.moe_impl),
        o_quant=auto(args.o_quant),
        shared_expert=auto(args.shared_expert),
    )


# ------------------------------------------------------------------- one role on one GPU
def attention_role_bytes(ex: AfdExecutor, positions: np.ndarray) -> int:
    """What the attention device must move per step: every layer's attention weights (FP8
    values + scales) once per micro-batch, the KV cache actually read (each sequence's
    ``position + 1`` tokens: K and V rows plus their per-token scales), the embedding rows
    gathered and the final norm + lm_head once."""
    regs, c, m = ex.arena.attention, ex.config, ex.afd.num_microbatches
    once = ("embed_tokens", "lm_head", "norm.weight")
    cache = [n for n in regs if n.startswith("cache_")]
    weights = sum(r.nbytes for n, r in regs.items() if n not in once and n not in cache)
    # Bytes per cached token from each region's whole item (K is [Bm, S, H]; a transposed V
    # is stored [Bm, S / 64, H, 64], so its trailing dims are not one token's).
    slots = regs["cache_k"].shape[0] * regs["cache_k"].shape[1]
    per_token = sum(
        np.dtype(regs[n].dtype).itemsize * int(np.prod(regs[n].shape)) // slots for n in cache
    )
    kv = int(np.sum(positions.astype(np.int64) + 1)) * c.num_layers * per_token
    embed = positions.size * c.hidden_size * np.dtype(regs["embed_tokens"].dtype).itemsize
    head = regs["lm_head"].nbytes + regs["norm.weight"].nbytes
    return m * weights + kv + embed + head


def ffn_role_bytes(ex: AfdExecutor, tokens_per_tick: int) -> int:
    """What FFN device 0 must move per step: per layer and micro-batch its share of the
    shared/dense SwiGLU and each LOCAL expert that receives a pair (uniform routing of
    ``tokens_per_tick * top_k`` pairs over all experts: the expected touched fraction)."""
    regs, c, m = ex.arena.ffn, ex.config, ex.afd.num_microbatches
    touched = 1.0 - (1.0 - 1.0 / c.num_experts) ** (tokens_per_tick * c.top_k)
    total = 0.0
    for name, reg in regs.items():
        values = regs[name.removesuffix(":scale")]
        total += reg.nbytes * (touched if values.pooled else 1.0)
    return int(m * total)


def _matrix_params(regs: dict, skip=()) -> tuple[int, int]:
    """(parameters of the weight matrices in ``regs``: dense, pooled), norms, scales, the
    cache and ``skip`` left out; per item (a layer), summed over items."""
    dense = pooled = 0
    for name, reg in regs.items():
        if (
            name in skip
            or name.endswith(":scale")
            or name.startswith("cache_")
            or len(reg.shape) < 2
        ):
            continue
        if reg.pooled:
            pooled += reg.count * reg.size
        else:
            dense += reg.count * reg.size
    return dense, pooled


def attention_role_flops(ex: AfdExecutor, positions: np.ndarray) -> int:
    """The attention device's arithmetic per step: 2 flops per weight per token for every
    attention-side matrix (q/k/v, wq, o_proj, the router), MFA's 4 * heads * head_dim per
    cached token read (Q.K and P.V), and the lm_head once."""
    c = ex.config
    once = ("embed_tokens", "lm_head")
    dense, _ = _matrix_params(ex.arena.attention, skip=once)
    linears = 2 * positions.size * dense
    attention = 4 * c.num_heads * c.head_dim * int(np.sum(positions.astype(np.int64) + 1))
    head = 2 * len(positions) * c.vocab_size * c.hidden_size
    return linears + attention * c.num_layers + head


def ffn_role_flops(ex: AfdExecutor, tokens_per_tick: int) -> int:
    """FFN device 0's arithmetic per step: 2 flops per weight per token for its shared/dense
    slices (every token) and for its local experts (each gets ``tokens * top_k / E`` tokens
    on average under uniform routing)."""
    c, m = ex.config, ex.afd.num_microbatches
    dense, pooled = _matrix_params(ex.arena.ffn)
    routed_tokens = tokens_per_tick * c.top_k / c.num_experts
    return int(m * 2 * (tokens_per_tick * dense + routed_tokens * pooled))


def run_role(args, cfg, layout, device, role: str, num_mb: int, microbatch: int) -> dict:
    dtypes, afd = _afd_config(args, num_mb, microbatch)
    ex = AfdExecutor(cfg, layout, [device], afd, dtypes=dtypes, role=role)
    mem_before = harness.memory_gib(device)  # held by an earlier run in this process?
    ex.load_random(seed=1)
    mem_filled = harness.memory_gib(device)
    tokens, pos, sel = _inputs(ex.batch, args.context)
    if role == "attention":
        nbytes, flops = attention_role_bytes(ex, pos), attention_role_flops(ex, pos)
    else:
        n_tok = layout.num_attention * microbatch
        nbytes, flops = ffn_role_bytes(ex, n_tok), ffn_role_flops(ex, n_tok)
    shape = dict(
        role=role, layout=layout.name, layers=cfg.num_layers, micro_batches=num_mb,
        microbatch=microbatch, batch=ex.batch, context=args.context,
    )  # fmt: skip
    row = harness.measure(
        lambda: ex.step(tokens, pos, sel),
        bytes=nbytes,
        flops=flops,
        name=f"{role}_{layout.name}_mb{num_mb}x{microbatch}",
        shape=shape,
        reps=args.reps,
        warmup=2,
        policy=str(_policy(args)),
        weights=args.weights,
        cache=args.cache,
        v_transposed=args.v_transposed,
        arena_gib=ex.arena.bytes_per_device() / 2**30,
        memory_gib={
            "before": mem_before,
            "filled": mem_filled,
            "timed": harness.memory_gib(device),
        },
    )
    out = row.to_dict()
    out["us_per_layer_item"] = out["time_us"] / (cfg.num_layers * num_mb)
    if args.trace:  # where the step's time goes: kernels, and the device idle between them
        step = lambda: ex.step(tokens, pos, sel)  # noqa: E731
        hlo = ex.compiled().as_text()  # reads each kernel's HLO op back to its name scope
        out["trace"] = harness.trace_breakdown(step, warmup=0, top=40, hlo_text=hlo)
    ex.arenas = None
    return out


def role_runs(args, cfg, layout, device, plan) -> tuple[list[dict], list[dict]]:
    """The role(s) at each (micro-batches, micro-batch) of ``plan``: harness rows and, for
    ``--role both``, the ``runs`` the simulator reads (per-layer times; the exchange cannot be
    measured on one GPU: ``--transfer-us`` stands in) with its predicted step for the layout."""
    rows, runs = [], []
    roles = ("attention", "ffn") if args.role == "both" else (args.role,)
    for m, bm in plan:
        got = {}
        for role in roles:
            _guard(
                rows,
                f"{role}_mb{m}x{bm}",
                lambda r=role, m=m, bm=bm: run_role(args, cfg, layout, device, r, m, bm),
            )
            if "error" not in rows[-1]:
                got[role] = rows[-1]["us_per_layer_item"]
        if len(got) < 2:
            continue
        run = {
            "name": f"roles_{layout.name}_mb{m}x{bm}",
            "layout": layout.name,
            "num_layers": cfg.num_layers,
            "micro_batches": m,
            "batch": layout.num_attention * m * bm,
            "attn_us_per_layer": got["attention"],
            "ffn_us_per_layer": got["ffn"],
            "transfer_us_per_layer": args.transfer_us,
            "source": "one-GPU role benchmarks (bench_afd.py --role both)",
        }
        run["simulated"] = [
            simulator.compare_measured(
                simulator.parse_run({**run, "micro_batches": mm, "batch": mm * run["batch"]})
            )
            | {"micro_batches": mm}
            for mm in (1, 2, 3)
        ]
        runs.append(run)
        print(json.dumps(run), flush=True)
    return rows, runs


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
        policy=_policy(args),
        dtypes=ArenaDtypes(weight=args.weights, cache=args.cache),
    )
    ex.load_random(seed=1)
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
    p.add_argument(
        "--moe-impl",
        default="auto",
        choices=["auto", "pallas", "xla", "dense"],
        help="KernelPolicy.moe (auto: the kernels' dispatch rule)",
    )
    p.add_argument(
        "--gemm-impl",
        default="auto",
        choices=["auto", "pallas", "xla", "xla_fp8"],
        help="KernelPolicy.gemm",
    )
    p.add_argument("--baseline-batches", default="128,256,512")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    p.add_argument("--full", action="store_true", help="the real 61-layer Step-3")
    p.add_argument("--cache", default="bfloat16", choices=["bfloat16", "float8_e4m3fn"])
    p.add_argument(
        "--trace",
        action="store_true",
        help="--role: add a profiler breakdown of one step (busy vs idle, top kernels)",
    )
    p.add_argument(
        "--v-transposed",
        action="store_true",
        help="FP8 cache: V stored [Bm, H, S], P.V as an FP8 wgmma (AFD arenas only)",
    )
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=["auto", "xla", "pallas"],
        help="KernelPolicy.attention",
    )
    p.add_argument(
        "--o-quant",
        default="auto",
        choices=["auto", "attention", "gemm"],
        help="KernelPolicy.o_quant (attention: the MFA epilogue writes o_proj's FP8 input)",
    )
    p.add_argument(
        "--shared-expert",
        default="auto",
        choices=["auto", "routed", "own"],
        help="KernelPolicy.shared_expert (routed: one more group of the routed launches)",
    )
    p.add_argument(
        "--role",
        default=None,
        choices=["attention", "ffn", "both"],
        help="one device's side of the layout on ONE GPU (see the module docstring)",
    )
    p.add_argument(
        "--transfer-us",
        type=float,
        default=0.0,
        help="--role both: exchange time per layer for the simulator's prediction",
    )
    p.add_argument("--experts-copied", action="store_true", help="control: slice experts")
    p.add_argument(
        "--moe-dispatch",
        default="auto",
        choices=["auto", "sort"],
        help="control: 'sort' orders the MoE (token, k) pairs by a sort kernel at every size "
        "(the compare-and-count rank is used up to moe.RANK_BY_COUNT_MAX_PAIRS pairs)",
    )
    p.add_argument("--qkv-order", default="auto", choices=QKV_ORDERS, help=QKV_HELP)
    p.add_argument(
        "--runs", default="", help="'MxBm,...' (micro-batches x sequences each); overrides "
        "--micro-batches/--microbatch"
    )  # fmt: skip
    p.add_argument("--stage-runs", type=int, default=99, help="stage breakdown for the first N")
    args = p.parse_args(argv)
    set_qkv_order(args.qkv_order)
    if args.moe_dispatch == "sort":
        grouped_moe.RANK_BY_COUNT_MAX_PAIRS = 0
    layout = AfdLayout.parse(args.layout, ffn_ep=args.ffn_ep)
    devices = jax.devices()[: 1 if args.role else layout.num_devices]
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
    if args.role:
        rows, runs = role_runs(args, cfg, layout, jax.devices()[0], plan)
        extra = dict(jax_version=jax.__version__, config=vars(args), runs=runs)
        if args.out:
            result = harness.write_results(args.out, rows, bench="afd_roles", **extra)
        else:
            result = harness.results("afd_roles", rows, **extra)
        print(json.dumps(result))
        return result
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
