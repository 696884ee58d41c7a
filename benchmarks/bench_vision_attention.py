"""The vision tower's attention block at its real shape (one 728 px view: 2,712 padded tokens,
2,708 real, width 1,792, 16 heads of 112): where its ~230 us a layer goes and what two changes
could save.

    python3 benchmarks/bench_vision_attention.py --out attn.json

Rows (harness device time, per-kernel CUPTI times beside):
* ``block``: `step3_jax.vision.layers.VisionAttention` as the tower runs it (q/k/v as three
  block GEMMs over the fused weight, cuDNN attention with the padding mask, out_proj), compiled
  with the project's GPU options; ``block_no_dot_merger``: the same with XLA's dot merger off
  (``xla_gpu_dot_merger_threshold_mb=0``). XLA merges the three q/k/v GEMMs back into one
  whose cuBLAS kernel cannot take the three biases in its epilogue; unmerged, each GEMM adds
  its bias itself and writes q, k or v dense. The cuBLAS calls' epilogues are read from the
  optimized HLO.
* ``cudnn_hd112``: the attention alone at the tower's head_dim 112; ``cudnn_hd128``: the same
  with q, k, v zero-padded to 128 (scale still 112**-0.5: the same logits, the output's extra
  columns zero). Does cuDNN run head_dim 128 enough faster to pay for 14% more FLOPs and the
  padded GEMM outputs that would feed it?
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
from step3_jax.policy import compiler_options  # noqa: E402
from step3_jax.vision.layers import VisionAttention  # noqa: E402


def cublas_epilogues(hlo_text: str) -> list[str]:
    """``target: epilogue`` of each cuBLAS call in an optimized HLO (DEFAULT, BIAS, ...)."""
    calls = harness.cublas_calls(hlo_text)
    return [f"{c['target']}: {c['epilogue']}" for c in calls if c["epilogue"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2712, help="rows (the padded 728 px view)")
    p.add_argument("--real", type=int, default=2708, help="real tokens (keys not masked)")
    p.add_argument("--dim", type=int, default=1792)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    t, d, n, kv_len = args.tokens, args.dim, args.heads, args.real
    hd = d // n
    impl = "cudnn" if on_gpu else "xla"
    attn = VisionAttention(d, n, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    # nonzero biases, so that a dropped bias would show in the outputs' agreement
    for lin in (attn.qkv_proj, attn.out_proj):
        lin.bias[...] = 0.1 * jax.random.normal(jax.random.key(3), lin.bias.shape, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32).astype(jnp.bfloat16)
    shape = {"tokens": t, "real": kv_len, "dim": d, "heads": n, "head_dim": hd}
    linear_flops = 2 * t * d * 4 * d
    rows, outputs = [], {}

    def add(name, fn, args_, flops, row_shape=None, hlo=False, **extra):
        """One row; ``hlo``: the cuBLAS calls' epilogues from the optimized HLO beside it.
        Returns the output (None when the form failed: an error row records it)."""
        row_shape = row_shape or shape
        try:
            if hlo:
                extra["cublas"] = cublas_epilogues(fn.lower(*args_).compile().as_text())
            out = fn(*args_)
            row = harness.measure(fn, [args_], flops=flops, name=name, reps=args.reps,
                                  shape=row_shape, copy=False,
                                  kernels=harness.kernel_times(fn, args_), **extra)  # fmt: skip
            row = row.to_dict()
        except Exception as e:  # noqa: BLE001 - a form that does not run is a data point
            row, out = harness.error_row(name, row_shape, e), None
        rows.append(row)
        harness.print_json(row)
        return out

    attn_flops = 4 * t * kv_len * hd * n
    for name, overrides in (
        ("block", ()),
        ("block_no_dot_merger", (("xla_gpu_dot_merger_threshold_mb", 0),)),
    ):
        opts = compiler_options(on_gpu, overrides)
        fn = jax.jit(lambda m, x: m(x, impl, None, kv_len), compiler_options=opts)
        outputs[name] = add(name, fn, (attn, x), linear_flops + attn_flops, hlo=True)
    if all(o is not None for o in outputs.values()):
        ref = outputs["block"].astype(jnp.float32)
        diff = jnp.linalg.norm(outputs["block_no_dot_merger"].astype(jnp.float32) - ref)
        rows[-1]["rel_diff_vs_block"] = float(diff / jnp.linalg.norm(ref))

    if on_gpu:
        keys = jax.random.split(jax.random.key(2), 3)
        q, k, v = (jax.random.normal(kk, (1, t, n, hd), jnp.bfloat16) for kk in keys)
        lengths = jnp.full((1,), kv_len, jnp.int32)

        def cudnn(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, scale=hd**-0.5, key_value_seq_lengths=lengths, implementation="cudnn"
            )

        fn = jax.jit(cudnn)
        o112 = add("cudnn_hd112", fn, (q, k, v), attn_flops)
        pad = ((0, 0), (0, 0), (0, 0), (0, 128 - hd))
        qp, kp, vp = (jnp.pad(a, pad) for a in (q, k, v))
        o128 = add("cudnn_hd128", fn, (qp, kp, vp), attn_flops * 128 // hd,
                   row_shape={**shape, "head_dim": 128}, flops_useful=attn_flops)  # fmt: skip
        if o112 is not None and o128 is not None:
            o112, o128 = o112.astype(jnp.float32), o128[..., :hd].astype(jnp.float32)
            rows[-1]["rel_diff_vs_hd112"] = float(
                jnp.linalg.norm(o128 - o112) / jnp.linalg.norm(o112)
            )
    harness.finish("vision_attention", rows, args.out, copy=on_gpu)


if __name__ == "__main__":
    main()
