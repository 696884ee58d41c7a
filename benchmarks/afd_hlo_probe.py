"""Where does an AFD role program copy its arena? A compile-only report (any backend).

Compiles one role's step (`AfdExecutor(role=...)`, the program `bench_afd.py --role` times)
and reports XLA's memory analysis (temp bytes against the arena's bytes: a temp as large as
an arena is a copy of it) and every instruction of the optimized HLO whose result is as large
as one of the arenas (copies, converts, bitcast-converts, scatters, fusions), with the HLO text
saved for reading. ``--cond`` adds what a `lax.cond` / `lax.switch` per scan tick costs (the
full AFD program's tick has one of each). ``--scatter`` adds the micro-probe behind `quant.set_at`: a 1-byte scatter
into a donated buffer as (a) a float8 ``.at[].set``, (b) the same bytes through a uint8
bitcast of the float8 buffer, (c) a uint8 buffer: temp bytes and time per call.

    python3 benchmarks/afd_hlo_probe.py --role attention --layers 8 --out $OUT/probe.json \\
        --scatter
    python3 benchmarks/afd_hlo_probe.py --tiny --role attention   # CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.bench_afd import QKV_HELP, QKV_ORDERS, bench_config, set_qkv_order  # noqa: E402
from step3_jax import quant  # noqa: E402
from step3_jax.policy import KernelPolicy  # noqa: E402
from step3_jax.sharding.afd import AfdConfig, AfdExecutor  # noqa: E402
from step3_jax.sharding.layout import ALIGN, AfdLayout, ArenaDtypes  # noqa: E402

_HLO_DTYPE = {"float8_e4m3fn": "f8e4m3fn", "bfloat16": "bf16", "float32": "f32", "uint8": "u8",
              "float16": "f16", "int32": "s32"}  # fmt: skip
_HLO_ITEMSIZE = {hlo: np.dtype(name).itemsize for name, hlo in _HLO_DTYPE.items()}
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([0-9,]*)\]\{?[^ ]* ([\w-]+)\(")


def _plain_set(buf, index, values, mode=None):
    """`quant.set_at` before the uint8 route (``--fp8-set plain``): a float8 scatter."""
    return buf.at[index].set(values.astype(buf.dtype), mode=mode)


def role_report(args) -> dict:
    cfg = bench_config(args.layers, args.tiny, args.full)
    layout = AfdLayout.parse(args.layout, 1 if args.tiny else None)
    policy = KernelPolicy(attention="xla", gemm="xla", moe="xla") if args.tiny else KernelPolicy()
    cfg_afd = AfdConfig(args.microbatch, 1, args.context, fp8_transfer=True, policy=policy)
    dtypes = ArenaDtypes(weight=args.weights, cache=args.cache, v_transposed=args.v_transposed)
    ex = AfdExecutor(cfg, layout, [jax.devices()[0]], cfg_afd, dtypes=dtypes, role=args.role)
    t0 = time.perf_counter()
    compiled = ex.compiled()  # abstract arenas: compiling needs no device memory
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if args.out:
        with open(os.path.splitext(args.out)[0] + f"_{args.role}.hlo.txt", "w") as f:
            f.write(hlo)
    arena_bytes = {k: n * np.dtype(k).itemsize for k, n in ex.arena.sizes.items()}
    big = min(arena_bytes.values()) // 2  # anything half the smallest arena or more
    ops = collections.Counter()
    for line in hlo.splitlines():
        m = _OP.match(line)
        if not m or not m.group(3):
            continue
        dtype, dims, op = m.group(2), m.group(3), m.group(4)
        size = int(np.prod([int(d) for d in dims.split(",")]))
        itemsize = _HLO_ITEMSIZE.get(dtype, 4)
        if size * itemsize >= big and op not in ("parameter", "get-tuple-element", "bitcast"):
            ops[f"{op} {dtype}[{dims}]"] += 1
    return {
        "role": args.role,
        "layers": cfg.num_layers,
        "batch": ex.batch,
        "context": args.context,
        "cache": args.cache,
        "weights": args.weights,
        "v_transposed": args.v_transposed,
        "fp8_set": args.fp8_set,
        "qkv_order": args.qkv_order,
        "compile_s": compile_s,
        "arena_bytes": arena_bytes,
        "arena_hlo_shapes": {
            k: f"{_HLO_DTYPE.get(k, k)}[{n // ALIGN},{ALIGN}]" for k, n in ex.arena.sizes.items()
        },
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "arena_sized_ops": dict(ops),
    }


def scatter_probe(nbytes: int) -> dict:
    """One 128-row scatter into a donated [n/512, 512] 1-byte buffer, three forms."""
    rows = nbytes // 512
    idx = jnp.arange(128, dtype=jnp.int32) * 7
    vals = jnp.ones((128, 512), jnp.float32)
    fp8 = jnp.float8_e4m3fn

    def as_fp8(buf, idx, vals):
        return buf.at[idx].set(vals.astype(fp8))

    def via_uint8_view(buf, idx, vals):
        raw = lax.bitcast_convert_type(buf, jnp.uint8)
        new = lax.bitcast_convert_type(vals.astype(fp8), jnp.uint8)
        return lax.bitcast_convert_type(raw.at[idx].set(new), fp8)

    def uint8_buffer(buf, idx, vals):
        return buf.at[idx].set(lax.bitcast_convert_type(vals.astype(fp8), jnp.uint8))

    out = {"bytes": nbytes}
    forms = (("fp8_set", as_fp8, fp8), ("uint8_view", via_uint8_view, fp8))
    for name, fn, dtype in (*forms, ("uint8_buffer", uint8_buffer, jnp.uint8)):
        buf = jnp.zeros((rows, 512), dtype)
        step = jax.jit(fn, donate_argnums=0)
        temp = step.lower(buf, idx, vals).compile().memory_analysis().temp_size_in_bytes
        for _ in range(2):
            buf = step(buf, idx, vals)
        buf.block_until_ready()
        t0, reps = time.perf_counter(), 10
        for _ in range(reps):
            buf = step(buf, idx, vals)
        buf.block_until_ready()
        out[name] = {"temp_bytes": int(temp), "us": (time.perf_counter() - t0) / reps * 1e6}
        print(name, out[name], flush=True)
        del buf
    return out


def cond_probe(ticks: int = 61, kernels: int = 12) -> dict:
    """What a `lax.cond` per scan tick costs: ``ticks`` ticks, each ``kernels`` dependent small
    kernels (a 256 x 7168 bf16 activation through a 7168 x 256 matmul and back, ~15 us of
    work), run (a) plainly, (b) under ``lax.cond(pred, work, skip)`` with a traced ``pred``
    (XLA:GPU's conditional reads the predicate on the host unless command buffers hold it),
    (c) under a `lax.switch` of three branches. Per-tick time and the extra over (a)."""
    x0 = jnp.ones((256, 7168), jnp.bfloat16)
    w = jnp.full((7168, 256), 1e-3, jnp.bfloat16)

    def work(x):
        for _ in range(kernels // 2):
            x = jnp.tanh((x @ w) @ w.T)
        return x

    def run(kind):
        def tick(x, p):
            if kind == "plain":
                return work(x), None
            if kind == "cond":
                return lax.cond(p > 0, work, lambda x: x, x), None
            return lax.switch(p, (work, lambda x: x, lambda x: -x), x), None

        return jax.jit(lambda x, ps: lax.scan(tick, x, ps)[0])

    preds = jnp.zeros((ticks,), jnp.int32)  # switch: branch 0 = work; cond: p > 0 below
    out = {"ticks": ticks, "kernels_per_tick": kernels}
    for kind in ("plain", "cond", "switch"):
        fn = run(kind)
        ps = preds + (1 if kind == "cond" else 0)
        t = harness.time_calls(lambda fn=fn, ps=ps: fn(x0, ps), reps=10, warmup=2)
        out[kind] = {"us_per_tick": t.host_loop_us / ticks, "timer": t.timer}
        print(kind, out[kind], flush=True)
    for kind in ("cond", "switch"):
        out[kind]["extra_us_per_tick"] = out[kind]["us_per_tick"] - out["plain"]["us_per_tick"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="attention", choices=["attention", "ffn"])
    p.add_argument("--layout", default="1A3F")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--full", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny dims, XLA kernels (CPU)")
    p.add_argument("--microbatch", type=int, default=256)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--cache", default="float8_e4m3fn")
    p.add_argument("--weights", default="float8_e4m3fn")
    p.add_argument("--v-transposed", action="store_true")
    p.add_argument("--fp8-set", default="bytes", choices=["bytes", "plain"])
    p.add_argument("--qkv-order", default="auto", choices=QKV_ORDERS, help=QKV_HELP)
    p.add_argument("--scatter", action="store_true", help="add the scatter micro-probe")
    p.add_argument("--scatter-bytes", type=int, default=2**30)
    p.add_argument("--cond", action="store_true", help="add the lax.cond-per-tick micro-probe")
    p.add_argument("--no-role", action="store_true", help="micro-probes only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.fp8_set == "plain":
        quant.set_at = _plain_set
    set_qkv_order(args.qkv_order)
    result = {**harness.environment(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if not args.no_role:
        result["role_program"] = role_report(args)
        print(json.dumps(result["role_program"]), flush=True)
    if args.scatter:
        result["scatter"] = scatter_probe(args.scatter_bytes)
    if args.cond:
        result["cond"] = cond_probe()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
