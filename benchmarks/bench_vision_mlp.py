"""The vision tower's MLP at its real shape (one 728 px view: 2,712 padded tokens x 1,792 ->
15,360 -> 1,792, bf16): where its time goes and what a fused quick_gelu could save.

    python3 benchmarks/bench_vision_mlp.py --out mlp.json

Rows (harness device time, TFLOP/s over the GEMMs' FLOPs, per-kernel CUPTI times beside):
* ``mlp_model``: `step3_jax.vision.layers.VisionMLP` unfused (``implementation="xla"``: cuBLAS
  GEMMs through the project's GPU compiler options, quick_gelu one XLA pass), with the output
  types of its cuBLAS calls read from the optimized HLO (does fc1 write float32 or bf16?);
  ``mlp_model_default``: the same module as the default policy runs it (on Hopper fc1, its
  bias and quick_gelu as one Pallas launch);
* ``fc1_xla``: fc1 + bias alone, as `Linear` runs it;
* ``fc1_pallas_<config>`` / ``fc2_pallas_<config>``: the same GEMM through the grouped-GEMM
  kernel's bf16 path with one group, per tile config: can a Pallas GEMM (which could carry
  quick_gelu in its epilogue) keep up with cuBLAS at this shape?
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.bench_dense_fp8 import CONFIGS  # noqa: E402
from step3_jax.kernels.grouped_gemm import grouped_matmul  # noqa: E402
from step3_jax.policy import compiler_options  # noqa: E402
from step3_jax.vision.layers import VisionMLP  # noqa: E402

# The grouped kernel's tile configs tried at these shapes (named as in `bench_dense_fp8`).
SWEEP = ("2wg_n_64x256", "2wg_m_128x128", "1wg_128x128", "2wg_n_128x256", "2wg_m_256x128")


def cublas_outputs(hlo_text: str) -> list[str]:
    """The result types of a program's cuBLAS custom calls, e.g. ``(f32[2712,15360], s8[..])``."""
    return [f"{c['target']}: {c['result']}" for c in harness.cublas_calls(hlo_text)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2712, help="rows (the padded 728 px view)")
    p.add_argument("--dim", type=int, default=1792)
    p.add_argument("--hidden", type=int, default=15360)
    p.add_argument("--configs", default=",".join(SWEEP), help="Pallas tile configs ('' none)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    t, d, f = args.tokens, args.dim, args.hidden
    mlp = VisionMLP(d, f, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32).astype(jnp.bfloat16)
    opts = compiler_options(on_gpu)
    gemm_flops = 2 * t * d * f
    rows = []

    def add(name, fn, args_, flops, **extra):
        try:
            row = harness.measure(fn, [args_], flops=flops, name=name, reps=args.reps,
                                  shape={"tokens": t, "dim": d, "hidden": f}, copy=False,
                                  kernels=harness.kernel_times(fn, args_), **extra)  # fmt: skip
            row = row.to_dict()
        except Exception as e:  # noqa: BLE001 - a config that does not fit is a data point
            row = harness.error_row(name, {"tokens": t}, e)
        rows.append(row)
        harness.print_json(row)

    for impl in ("xla", None):  # fc1 + quick_gelu unfused, then as the default picks
        model_fn = jax.jit(lambda m, x, impl=impl: m(x, implementation=impl), compiler_options=opts)
        hlo = model_fn.lower(mlp, x).compile().as_text()
        add("mlp_model" if impl == "xla" else "mlp_model_default", model_fn, (mlp, x),
            2 * gemm_flops, cublas_outputs=cublas_outputs(hlo))  # fmt: skip
    fc1 = jax.jit(lambda m, x: m.fc1(x), compiler_options=opts)
    add("fc1_xla", fc1, (mlp, x), gemm_flops)
    fc2_in = jax.random.normal(jax.random.key(2), (t, f), jnp.float32).astype(jnp.bfloat16)
    fc2 = jax.jit(lambda m, h: m.fc2(h), compiler_options=opts)
    add("fc2_xla", fc2, (mlp, fc2_in), gemm_flops)
    if on_gpu:
        gs = jnp.asarray([t], jnp.int32)
        w1, w2 = mlp.fc1.weight[...][None], mlp.fc2.weight[...][None]
        for name in filter(None, args.configs.split(",")):
            cfg = CONFIGS[name]
            for which, w, xin in (("fc1", w1, x[0]), ("fc2", w2, fc2_in)):
                fn = jax.jit(lambda x, w, cfg=cfg: grouped_matmul(  # noqa: E731
                    x, w, gs, implementation="pallas", config=cfg))  # fmt: skip
                add(f"{which}_pallas_{name}", fn, (xin, w), gemm_flops, config=name)
    harness.finish("vision_mlp", rows, args.out, copy=on_gpu)


if __name__ == "__main__":
    main()
