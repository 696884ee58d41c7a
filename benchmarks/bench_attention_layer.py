"""The attention half of ONE Step-3 decoder layer, linears included, at decode time.

Times `DecoderLayer.attention_half` (input norm, q_proj -> inter_norm -> wq, k/v proj, RoPE,
KV-cache write, MFA decode attention, o_proj, residual, post-attention norm, router top-k) for
B sequences at context S, against the paper's 281 us per layer (Step-3's MFA layer, 64 x 8K on an
H800, BF16 attention). The FFN of the layer is shrunk (experts of width 128): it is not timed.

Bytes the step must read: attention weights (bf16 2 B/param, or FP8 1 B/param + scales) plus
the KV cache of B x S tokens (512 B FP8 + 8 B scales, or 1024 B bf16). Last stdout line: JSON.

Variants (``name`` in each row): ``fp8_pallas_fused_qkv`` stores q/k/v as ONE FP8 weight
(`MFAttention.fuse_qkv`, what ``quantize_model`` does by default where the rows fuse exactly);
``fp8_pallas_separate_qkv`` keeps three weights and runs three GEMMs (the per-call fusion that
used to concatenate them into one GEMM on
every call (the form measured as 281.2 us on an H100); the others run the three projections.

    python3 benchmarks/bench_attention_layer.py --out results.json
    python3 benchmarks/bench_attention_layer.py --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax import KVCache, Step3Config  # noqa: E402
from step3_jax.model import DecoderLayer  # noqa: E402
from step3_jax.policy import KernelPolicy  # noqa: E402
from step3_jax.quant_model import quantize_model, weight_bytes  # noqa: E402

# (name, precision mode, KernelPolicy.gemm, weight granularity, KernelPolicy.attention,
# fuse_qkv)
VARIANTS = [
    ("fp8_pallas_fused_qkv", "fp8+kv8", "pallas", "block", "pallas", True),
    ("fp8_pallas_separate_qkv", "fp8+kv8", "pallas", "block", "pallas", False),
    ("bf16", "bf16", "xla", "block", "pallas", False),
    ("fp8_xla_block", "fp8+kv8", "xla", "block", "pallas", False),
    ("fp8_xla_channel", "fp8+kv8", "xla", "channel", "pallas", False),
    ("bf16_xla_attention", "bf16", "xla", "block", "xla", False),
]
# --tiny: Step-3's layer shrunk for a CPU smoke run (R and H stay multiples of 128 so the
# fused FP8 weight is exact; 4 heads, so attention runs the XLA path).
TINY = dict(hidden_size=512, share_q_dim=256, num_heads=4, head_dim=128, vocab_size=256)


def build_layer(mode, gemm, granularity, fuse, tiny=False) -> tuple[DecoderLayer, Step3Config]:
    cfg = dataclasses.replace(
        Step3Config.step3(),
        num_layers=1,
        moe_layer_ids=(0,),
        moe_intermediate_size=128,
        share_expert_dim=128,
        **(TINY if tiny else {}),
    )
    layer = DecoderLayer(
        cfg,
        0,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        rngs=nnx.Rngs(0),
    )
    if mode != "bf16":
        quantize_model(layer, "fp8", granularity=granularity, fuse_qkv=fuse)
    elif fuse:
        layer.self_attn.fuse_qkv()
    if layer.self_attn.fused_qkv != fuse:
        raise RuntimeError(f"asked for fuse_qkv={fuse}, got {layer.self_attn.fused_qkv}")
    return layer, cfg


def time_mode(variant, batch, ctx, reps=30, tiny=False):
    name, mode, gemm, granularity, attention, fuse = variant
    if tiny:  # the Pallas decode kernel needs Step-3's 64 heads of 256: not the tiny layer
        attention = "xla"
        gemm = None if gemm == "pallas" else gemm  # a CPU smoke run: the kernels' rule picks
    layer, cfg = build_layer(mode, gemm, granularity, fuse, tiny)
    policy = KernelPolicy(attention=attention, gemm=gemm, moe="dense")
    attn_bytes = weight_bytes(layer.self_attn) + 4 * cfg.hidden_size  # + the two norms (bf16)
    kv_dtype = jnp.float8_e4m3fn if mode == "fp8+kv8" else jnp.bfloat16
    cache = KVCache.create(1, batch, ctx + 64, cfg.head_dim, kv_dtype)
    keys = jax.random.split(jax.random.key(1), 3)
    # Random, non-zero cache contents; each sequence is ctx - 1 tokens long before the step.
    cache = cache.replace(
        k=jax.random.normal(keys[0], cache.k.shape, jnp.float32).astype(kv_dtype),
        v=jax.random.normal(keys[1], cache.v.shape, jnp.float32).astype(kv_dtype),
        lengths=jnp.full((batch,), ctx - 1, jnp.int32),
    )
    x = jax.random.normal(keys[2], (batch, 1, cfg.hidden_size), jnp.bfloat16)
    graphdef, state = nnx.split(layer)

    @functools.partial(jax.jit, donate_argnums=2)  # the cache is updated in place
    def step(state, x, cache):
        lay = nnx.merge(graphdef, state)
        positions = cache.lengths[:, None]
        x_mid, h2, routing, cache = lay.attention_half(x, positions, cache, 0, policy)
        return x_mid, h2, routing, cache.replace(lengths=cache.lengths)  # keep length fixed

    carry = [cache]

    def one():  # the donated cache threads through the calls
        out = step(state, x, carry[0])
        carry[0] = out[3]
        return out

    kv_per_tok = 2 * cfg.head_dim * (1 if mode == "fp8+kv8" else 2) + (
        8 if mode == "fp8+kv8" else 0
    )
    shape = {"batch": batch, "context": ctx}
    row = harness.measure(
        one, reps=reps, bytes=attn_bytes + batch * ctx * kv_per_tok, name=name, shape=shape,
        mode=mode, gemm=gemm, qkv="fused" if fuse else "separate",
        granularity=granularity, attention=attention, batch=batch, context=ctx,
        kernels_us=_kernels(one), weight_bytes=int(attn_bytes),
        kv_bytes=int(batch * ctx * kv_per_tok), paper_h800_us=281,
    )  # fmt: skip
    return row.to_dict()


def _kernels(one):
    """Per-kernel device times (us) of one call, summed by name, those >= 1 us, largest first:
    where the attention half spends its time, without the dispatch the host time includes."""
    per: dict[str, float] = {}
    for name, us in harness.kernel_times(one):
        per[name[:60]] = per.get(name[:60], 0.0) + us
    return [(n, round(t, 1)) for n, t in sorted(per.items(), key=lambda kv: -kv[1]) if t >= 1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="128:4096,64:8192")
    p.add_argument("--out", default=None)
    p.add_argument("--first", type=int, default=99, help="run only the first N variants")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--tiny", action="store_true", help="small layer, small pairs: CPU smoke")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    if args.tiny and args.pairs == p.get_default("pairs"):
        args.pairs = "4:256"
    variants = VARIANTS[: args.first]
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {v[0] for v in VARIANTS})
        if unknown:
            raise SystemExit(
                f"unknown --only variants {unknown}; known: {[v[0] for v in VARIANTS]}"
            )
        variants = [v for v in variants if v[0] in names]
    harness.print_json({"copy_probe": harness.copy_probe()})
    rows = []
    for pair in args.pairs.split(","):
        b, s = (int(v) for v in pair.split(":"))
        for variant in variants:
            name, mode, gemm, gran, attn, _ = variant
            try:
                row = time_mode(variant, b, s, args.reps, args.tiny)
            except Exception as e:  # noqa: BLE001 - record and keep going
                row = harness.error_row(
                    name, {"batch": b, "context": s}, e, mode=mode, gemm=gemm, granularity=gran,
                    attention=attn, batch=b, context=s,
                )  # fmt: skip
            rows.append(row)
            harness.print_json(row)
    harness.finish("attention_layer", rows, args.out, tiny=args.tiny)


if __name__ == "__main__":
    main()
