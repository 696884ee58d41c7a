"""Dense FP8 block-scaled GEMMs of the Step-3 attention half (M = B*T rows) through the
grouped-GEMM kernel with one group, per tuning config: CUPTI kernel time and weight GB/s.

    python3 benchmarks/bench_dense_fp8.py --m 128 --out dense.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import jax
import jax.numpy as jnp

from benchmarks.provenance import git_commit
from step3_jax import quant
from step3_jax.kernels.grouped_gemm import TuningConfig, grouped_matmul

SHAPES = {  # name: (N, K) of the [N, K] weight view
    "q_proj": (2048, 7168),
    "k_proj": (256, 7168),
    "wq": (16384, 2048),
    "o_proj": (7168, 16384),
}
CONFIGS = {
    "small_1wg_64x128": TuningConfig(block_m=64, block_n=128, max_concurrent_steps=4),
    "1wg_64x64": TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6),
    "2wg_m_128x128": TuningConfig(
        block_m=64, block_n=128, num_compute_wgs=2, wg_dim="m", max_concurrent_steps=6
    ),
    "2wg_n_64x256": TuningConfig(block_m=64, block_n=128, num_compute_wgs=2, wg_dim="n"),
    "2wg_m_128x64": TuningConfig(
        block_m=64, block_n=64, num_compute_wgs=2, wg_dim="m", max_concurrent_steps=6
    ),
}


def measure(m: int, n: int, k: int, cfg: TuningConfig) -> float:
    from jax.experimental.mosaic.gpu import profiler

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    xq, xs = quant.quantize_activations(x)
    wq, ws = quant.quantize_weight_blocks(jax.random.normal(kw, (n, k), jnp.float32))
    gs = jnp.asarray([m], jnp.int32)
    fn = jax.jit(
        lambda xq, xs, w, s: grouped_matmul(
            xq, w[None], gs, x_scale=xs, w_scale=s[None], implementation="pallas", config=cfg
        )
    )
    times = []
    for _ in range(5):
        _, t = profiler.measure(fn)(xq, xs, wq, ws)
        times.append(t * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        for cname, cfg in CONFIGS.items():
            try:
                us = measure(args.m, n, k, cfg)
                row = dict(shape=name, n=n, k=k, config=cname, us=round(us, 1))
                row["weight_GBps"] = round(n * k * (1 + 4 / 128 / 128) / us / 1e3, 1)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a data point
                row = dict(shape=name, config=cname, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {
        "bench": "dense_fp8",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "m": args.m,
        "configs": {k: dataclasses.asdict(v) for k, v in CONFIGS.items()},
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
