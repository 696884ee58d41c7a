"""The MoE router's logits GEMM at the attention role's shape (M = 256 tokens, 7,168 ->
48 experts, bf16 in, float32 logits) in the forms XLA can be given: one skinny GEMM, or the
contraction split into S pieces (a batched GEMM with S times the CTAs, then a sum).

    python3 benchmarks/bench_router.py --out router.json

The attention role's trace gave the router scope 17.5 us a layer on an H100, 12.1 of them in
one cuBLAS kernel with 8 x 64 tiles for a GEMM whose operands (4.4 MB) need ~1.5 us at the
copy rate (docs/LOG.md). Each row: device time, per-kernel CUPTI times, the largest
difference from the float64 logits.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax.layers.linear import project  # noqa: E402
from step3_jax.policy import compiler_options  # noqa: E402


def split_k_logits(h, w, pieces: int):
    """``h @ w^T`` in float32 as ``pieces`` partial products over K (one batched GEMM), summed."""
    m, k = h.shape
    e = w.shape[0]
    hs = h.reshape(m, pieces, k // pieces)
    ws = w.reshape(e, pieces, k // pieces)
    parts = jnp.einsum("MSK,ESK->SME", hs, ws, preferred_element_type=jnp.float32)
    return parts.sum(axis=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=7168)
    p.add_argument("--experts", type=int, default=48)
    p.add_argument("--pieces", default="2,4,7,14,28", help="split-K piece counts")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    m, k, e = args.tokens, args.dim, args.experts
    kh, kw = jax.random.split(jax.random.key(0))
    sets = []
    for i in range(8):  # rotate a few input sets (the operands are L2-sized)
        h = jax.random.normal(jax.random.fold_in(kh, i), (m, k), jnp.float32)
        w = jax.random.normal(jax.random.fold_in(kw, i), (e, k), jnp.float32) / np.sqrt(k)
        sets.append((h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)))
    h0, w0 = (np.asarray(a.astype(jnp.float32), np.float64) for a in sets[0])
    exact = h0 @ w0.T
    opts = compiler_options(on_gpu)
    forms = {"project": lambda h, w: project(h, w, "...D,ED->...E", out_dtype=jnp.float32)}
    for s in (int(v) for v in args.pieces.split(",") if v):
        if k % s == 0:
            forms[f"split_k_{s}"] = lambda h, w, s=s: split_k_logits(h, w, s)
    rows = []
    for name, fn in forms.items():
        f = jax.jit(fn, compiler_options=opts)
        err = float(np.max(np.abs(np.asarray(f(*sets[0]), np.float64) - exact)))
        row = harness.measure(f, sets, bytes=(m * k + e * k) * 2 + m * e * 4,
                              flops=2 * m * k * e, name=name, reps=args.reps, copy=False,
                              shape={"m": m, "k": k, "e": e}, max_abs_err=err,
                              kernels=harness.kernel_times(f, sets[0]))  # fmt: skip
        rows.append(row.to_dict())
        harness.print_json(rows[-1])
    harness.finish("router", rows, args.out, copy=on_gpu)


if __name__ == "__main__":
    main()
