"""Dense FP8 block-scaled GEMMs of the Step-3 attention half (M = B*T rows) and of an FFN
device's shared-expert slice (the fused gate/up SwiGLU and the down projection) through the
grouped-GEMM kernel with one group, per tuning config: harness device time and weight GB/s.

    python3 benchmarks/bench_dense_fp8.py --m 128,256 --out dense.json

Each shape is timed with every config of ``CONFIGS`` and with the one ``dense_config`` picks
for the device (``config="auto"``), so a sweep says whether the table's pick is the best.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax import quant  # noqa: E402
from step3_jax.kernels.grouped_gemm import (  # noqa: E402
    TuningConfig,
    grouped_matmul,
    grouped_swiglu,
)
from step3_jax.kernels.grouped_gemm.config import dense_config  # noqa: E402

SHAPES = {  # name: (N, K) of the [N, K] weight view
    "qkv_proj": (2560, 7168),  # q, k and v fused (the stored form the model runs)
    "q_proj": (2048, 7168),
    "k_proj": (256, 7168),
    "wq": (16384, 2048),
    "o_proj": (7168, 16384),
    # One FFN device's slice of the shared expert in the 1A3F layout (5120 over 3 devices,
    # rounded to 128: 1792): gate and up as ONE SwiGLU launch (`SWIGLU`), then down.
    "shared_gate_up": (1792, 7168),
    "shared_down": (7168, 1792),
}
SWIGLU = {"shared_gate_up", "tiny_gate_up"}  # two [N, K] weights through grouped_swiglu
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
    # 128-row warpgroup tiles: at M = 256 a 256 x 128 CTA streams each weight tile once for
    # every row and reads 3/4 of the SMEM-fill bytes of a 128 x 128 CTA ((1/bm + 1/bn) of
    # M*N*K); the 128 x 128 accumulator is 128 registers a thread.
    "1wg_128x128": TuningConfig(block_m=128, block_n=128, max_concurrent_steps=4),
    "2wg_m_256x128": TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="m"),
    "2wg_n_128x256": TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="n"),
}


def measure(m: int, n: int, k: int, cfg: TuningConfig, impl: str, name: str) -> dict:
    """One GEMM [M, K] x [N, K]^T through the grouped kernel (one group), or for a `SWIGLU`
    shape the fused silu(x W_gate^T) * (x W_up^T) with two such weights; bytes: the FP8
    weights and their 128 x 128 block scales."""
    n_w = 2 if name in SWIGLU else 1
    kx, *kw = jax.random.split(jax.random.key(0), 1 + n_w)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    xq, xs = quant.quantize_activations(x)
    ws = [quant.quantize_weight_blocks(jax.random.normal(kk, (n, k), jnp.float32)) for kk in kw]
    gs = jnp.asarray([m], jnp.int32)
    kw = dict(implementation=impl, config=cfg)
    if n_w == 1:
        fn = lambda xq, xs, w, s: grouped_matmul(  # noqa: E731
            xq, w[None], gs, x_scale=xs, w_scale=s[None], **kw
        )
    else:
        fn = lambda xq, xs, w, s, u, us: grouped_swiglu(  # noqa: E731
            xq, w[None], u[None], gs, x_scale=xs, w_gate_scale=s[None], w_up_scale=us[None], **kw
        )
    wbytes = n_w * (n * k + ws[0][1].size * 4)
    sets = [(xq, xs, *[a for pair in ws for a in pair])]  # the shapes here are L2-sized
    row = harness.measure(jax.jit(fn), sets, bytes=wbytes, flops=2 * n_w * m * n * k,
                          name=name, shape={"m": m, "n": n, "k": k, "weights": n_w})  # fmt: skip
    return row.to_dict()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="128", help="rows (B*T), comma-separated: 128,256,512")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: XLA path, one small shape")
    args = p.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"--shapes: unknown {sorted(unknown)}; choose from {list(SHAPES)}")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from {list(CONFIGS)}")
    shapes = {k: v for k, v in SHAPES.items() if k in args.shapes.split(",")}
    configs = {k: v for k, v in CONFIGS.items() if k in args.configs.split(",")}
    impl = "pallas"
    ms = [int(m) for m in args.m.split(",")]
    if args.tiny:
        shapes = {"tiny": (256, 512), "tiny_gate_up": (256, 512)}
        configs, impl = dict(list(CONFIGS.items())[:1]), "xla"
        ms = [16]
    kind = jax.devices()[0].device_kind
    rows = []
    for m in ms:
        for name, (n, k) in shapes.items():
            auto = {} if args.tiny else {"auto": dense_config(kind, m, n, k)}
            for cname, cfg in (configs | auto).items():
                try:
                    row = measure(m, n, k, cfg, impl, name)
                    row["config"] = cname
                    if cname == "auto":  # which config the table resolved to, by name
                        row["resolved"] = next(
                            (c for c, v in configs.items() if v == cfg), dataclasses.asdict(cfg)
                        )
                except Exception as e:  # noqa: BLE001 - a config that does not fit is a data point
                    row = harness.error_row(name, {"m": m, "n": n, "k": k}, e, config=cname)
                rows.append(row)
                harness.print_json(row)
    extra = {"m": ms, "configs": {k: dataclasses.asdict(v) for k, v in configs.items()}}
    harness.finish("dense_fp8", rows, args.out, **extra)


if __name__ == "__main__":
    main()
