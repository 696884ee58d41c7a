"""Decode-step benchmark: tokens/s, time per layer, bytes read, fraction of copy bandwidth.

One decode step = every sequence of the batch appends one token at context ``ctx``: embedding,
``L`` decoder layers (MFA with the cache write and attention over ``ctx`` cached tokens, MoE or
dense FFN), final norm, lm_head, greedy argmax. The step is ``jax.jit`` of a pure function of
(params, tokens, cache) with the cache donated, timed by ``benchmarks.harness`` (device time
of ``--steps`` steps after warm-up, host times beside it).

Bytes the step must read (the memory roofline): every weight byte a token batch touches
(attention linears, norms, router, shared expert, dense FFN, the routed experts it selects,
lm_head; the embedding rows are negligible) plus the KV cache (values + per-token scales) of
``ctx`` tokens per sequence per layer. Routed experts touched: the expected number of distinct
experts among ``B * top_k`` uniform draws, ``E * (1 - (1 - K/E)^B)``; the dense MoE oracle reads
all ``E`` anyway (reported as ``bytes_all``). The device ceiling is a measured device-to-device
copy (read + write): the harness's copy probe, same process.

    # CPU, tiny config
    python benchmarks/bench_decode.py --config tiny
    # GPU, Step-3 layer shapes (see benchmarks/gpu_decode.sh)
    python benchmarks/bench_decode.py --config step3 --layers 5 --batch 128 --context 4096 \
        --precision bf16,fp8,fp8+kv8

The last stdout line is JSON; ``--out`` also writes it (with device, jax version, commit, date).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax.cache import KVCache  # noqa: E402
from step3_jax.config import Step3Config  # noqa: E402
from step3_jax.model import Step3Model  # noqa: E402
from step3_jax.policy import KernelPolicy  # noqa: E402
from step3_jax.quant_model import _LINEARS, Fp8Weight, Precision  # noqa: E402


# ---------------------------------------------------------------------- model construction
def bench_config(name: str, layers: int | None, vocab: int | None) -> Step3Config:
    """``tiny`` or ``step3`` layer shapes; for step3 every layer is an MoE layer."""
    if name == "tiny":
        cfg = Step3Config.tiny()
        return dataclasses.replace(cfg, num_layers=layers or cfg.num_layers) if layers else cfg
    n = layers or 4
    return dataclasses.replace(
        Step3Config.step3(),
        num_layers=n,
        moe_layer_ids=tuple(range(n)),
        vocab_size=vocab or Step3Config.step3().vocab_size,
    )


@functools.partial(jax.jit, static_argnames=("shape", "std", "dtype"))
def _random_float(key, shape, std, dtype=jnp.bfloat16):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "std", "nb", "nc", "granularity"))
def _random_fp8(key, shape, std, nb, nc, granularity="block"):
    w = std * jax.random.normal(key, shape, jnp.float32)
    return Fp8Weight.quantize(w, num_batch=nb, num_contract=nc, granularity=granularity)


def _fp8_layout(model) -> dict[int, tuple[int, int]]:
    """id(param) -> (num_batch, num_contract) for every linear weight quantize_model would touch."""
    out = {}
    for _, node in nnx.iter_graph(model):
        for (cls_name, attr), layout in _LINEARS.items():
            if type(node).__name__ == cls_name and hasattr(node, attr):
                out[id(getattr(node, attr))] = layout
    return out


def random_model(
    cfg: Step3Config,
    precision: Precision,
    moe: str,
    attention,
    dtype=jnp.bfloat16,
    seed: int = 0,
    granularity: str = "block",
):
    """Random weights built leaf by leaf ON DEVICE (never a host copy, never the full bf16
    model next to its FP8 copy): norms are ones, the rest N(0, 1/fan_in)."""
    model = nnx.eval_shape(
        lambda: Step3Model(
            cfg,
            rngs=nnx.Rngs(seed),
            dtype=dtype,
            param_dtype=dtype,
            policy=KernelPolicy(attention=attention, moe=None if moe == "grouped" else moe),
        )
    )
    fp8 = _fp8_layout(model) if precision.fp8_weights else {}
    key = jax.random.key(seed)
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Param):
            continue
        shape = tuple(node.get_value().shape)
        if len(shape) == 1:  # norm weight
            node.set_value(jnp.ones(shape, dtype))
            continue
        fan_in = (
            shape[-1] if id(node) not in fp8 else math.prod(shape[len(shape) - fp8[id(node)][1] :])
        )
        std = float(fan_in) ** -0.5
        k = jax.random.fold_in(key, i)
        if id(node) in fp8:
            node.set_value(_random_fp8(k, shape, std, *fp8[id(node)], granularity))
        else:
            node.set_value(_random_float(k, shape, std, dtype))
    return model


V_TRANSPOSED = "+vT"  # --precision suffix: the transposed-V FP8 cache


def random_cache(
    cfg, batch: int, ctx: int, extra: int, dtype, seed: int = 1, v_transposed: bool = False
) -> KVCache:
    """A cache of ``ctx + extra`` slots whose first ``ctx`` hold random K/V (lengths = ctx);
    ``v_transposed``: the FP8 P.V layout (`KVCache.create`)."""
    cache = KVCache.create(cfg.num_layers, batch, ctx + extra, cfg.head_dim, dtype, v_transposed)

    @functools.partial(jax.jit, donate_argnums=0)
    def fill(c):
        kk, kv = jax.random.split(jax.random.key(seed))
        k = jax.random.normal(kk, c.k.shape, jnp.float32).astype(c.k.dtype)
        v = jax.random.normal(kv, c.v.shape, jnp.float32).astype(c.v.dtype)
        return c.replace(k=k, v=v, lengths=jnp.full((batch,), ctx, jnp.int32))

    return fill(cache)


# ---------------------------------------------------------------------- byte accounting
def _leaf_bytes(tree) -> int:
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def step_bytes(model, cfg: Step3Config, cache: KVCache, batch: int, ctx: int) -> dict:
    """Bytes one decode step must read (see the module docstring)."""
    total = _leaf_bytes(nnx.state(model, nnx.Param))
    embed = _leaf_bytes(model.embed_tokens[...])
    routed = 0
    for layer in model.layers:
        if layer.is_moe:
            ffn = layer.ffn
            routed += sum(_leaf_bytes(p[...]) for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
    e, k = cfg.num_experts, cfg.top_k
    touched = e * (1.0 - (1.0 - k / e) ** batch)
    weights_min = total - embed - routed + routed * touched / e
    kv_per_token_layer = (cache.nbytes() - 0) / (cache.num_layers * cache.batch * cache.max_len)
    kv = kv_per_token_layer * cfg.num_layers * batch * ctx
    return {
        "weight_bytes": int(weights_min),
        "weight_bytes_all": int(total - embed),
        "kv_bytes": int(kv),
        "bytes_min": int(weights_min + kv),
        "bytes_all": int(total - embed + kv),
        "experts_touched": touched,
    }


# ---------------------------------------------------------------------- timing
def make_step(graphdef):
    @functools.partial(jax.jit, donate_argnums=(2,))
    def step(state, tokens, cache):
        model = nnx.merge(graphdef, state)
        logits, cache = model(tokens[:, None], cache=cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    return step


def make_head(graphdef):
    @jax.jit
    def head(state, x):
        return nnx.merge(graphdef, state).logits(x)

    return head


def cache_copies(hlo: str, batch: int, max_len: int, head_dim: int) -> list[str]:
    """Copy/transpose HLO instructions whose shape holds a whole layer's K or V (dims B, S and
    H): a materialized per-layer cache slice or a transposed K costs an extra cache read+write."""
    found = []
    for line in hlo.splitlines():
        s = line.strip()
        if not any(f" {op}(" in s for op in ("copy", "copy-start", "transpose")):
            continue
        try:
            dims_txt = s.split("=", 1)[1].split("[", 1)[1].split("]", 1)[0]
            dims = [int(d) for d in dims_txt.split(",") if d.strip()]
        except (IndexError, ValueError):
            continue
        if {batch, max_len, head_dim} <= set(dims) and math.prod(dims) >= batch * max_len:
            found.append(s[:160])
    return found


def measure(model, cfg, precision: Precision, batch, ctx, steps, dump_hlo=None, v_transposed=False):
    """Times one decode-step configuration; returns its harness row (as a dict)."""
    graphdef, state = nnx.split(model)
    step = make_step(graphdef)
    warm = 2
    # Every timed call appends one token: the harness makes warm + 3 * steps calls (device,
    # blocked and loop passes); S stays a multiple of 64 (kernel block_s).
    extra = -(-(warm + 3 * steps + 1) // 64) * 64
    cache_dtype = precision.cache_dtype or model.dtype
    cache = random_cache(cfg, batch, ctx, extra, cache_dtype, v_transposed=v_transposed)
    tokens = jax.random.randint(jax.random.key(2), (batch,), 0, cfg.vocab_size, jnp.int32)
    bytes_ = step_bytes(model, cfg, cache, batch, ctx)
    t0 = time.perf_counter()
    compiled = step.lower(state, tokens, cache).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    copies = cache_copies(hlo, batch, cache.max_len, cfg.head_dim)
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(hlo)
    carry = [tokens, cache]

    def one():  # the donated cache threads through the calls
        carry[0], carry[1] = compiled(state, carry[0], carry[1])
        return carry[0]

    shape = {"batch": batch, "context": ctx, "layers": cfg.num_layers}
    row = harness.measure(
        one, reps=steps, warmup=warm, bytes=bytes_["bytes_min"], name=precision.name, shape=shape
    )
    # lm_head + final norm alone, to separate the per-layer time from the head.
    head = make_head(graphdef)
    x = jax.random.normal(jax.random.key(3), (batch, 1, cfg.hidden_size), model.dtype)
    head_us = harness.time_calls(head, [(state, x)], reps=steps).time_us
    carry.clear()
    step_us = row.time_us
    out = row.to_dict()
    out.update(
        precision=precision.name,
        batch=batch,
        context=ctx,
        step_ms=step_us / 1e3,
        head_ms=head_us / 1e3,
        per_layer_us=(step_us - head_us) / cfg.num_layers,
        tokens_per_s=batch / step_us * 1e6,
        compile_s=compile_s,
        cache_copies_in_hlo=len(copies),
        cache_copy_examples=copies[:3],
        **bytes_,
    )
    return out


def gemm_forms(m: int = 128, reps: int = 20) -> list[dict]:
    """XLA forms of one FP8 GEMM at decode shapes vs bf16: time and weight-read GB/s."""
    from step3_jax.layers.linear import project

    out = []
    shapes = [
        ("dense_ffn", "MD,FD->MF", (18432, 7168)),
        ("experts", "MD,EFD->MEF", (48, 5120, 7168)),
    ]

    def raw_fp8(x, wv, eqn):
        xq = x.astype(jnp.float8_e4m3fn)
        return jnp.einsum(eqn, xq, wv, preferred_element_type=jnp.float32).astype(x.dtype)

    for name, eqn, wshape in shapes:
        key = jax.random.key(0)
        w = _random_float(key, wshape, 0.01)
        x = jax.random.normal(key, (m, wshape[-1]), jnp.bfloat16)
        nb = len(wshape) - 2
        cands = {"bf16": w}
        for form in ("dequant", "fp8_blocks"):
            cands[f"fp8_{form}"] = dataclasses.replace(
                Fp8Weight.quantize(w, num_batch=nb), gemm=form
            )
        cands["fp8_channel_dequant"] = Fp8Weight.quantize(w, num_batch=nb, granularity="channel")
        # XLA's own FP8 x FP8 dot (per-tensor scaling only): the ceiling of XLA-alone FP8.
        cands["xla_fp8_dot_pertensor"] = cands["fp8_channel_dequant"].values
        for label, wt in cands.items():
            if label.startswith("xla_fp8_dot"):
                f = jax.jit(lambda x, wt, eqn=eqn: raw_fp8(x, wt, eqn))
            else:
                f = jax.jit(lambda x, wt, eqn=eqn: project(x, wt, eqn))
            shape = {"gemm": name, "form": label, "m": m}
            try:  # weights >> L2: one input set
                wbytes = _leaf_bytes(wt)
                row = harness.measure(
                    f, [(x, wt)], reps=reps, bytes=wbytes, flops=2 * m * wbytes, name=label,
                    shape=shape, gemm=name, form=label,
                ).to_dict()  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report and go on
                row = harness.error_row(label, shape, e, gemm=name, form=label)
            out.append(row)
            harness.print_json(row)
        del cands, w
    return out


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("tiny", "step3"), default="tiny")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny config, B=1, ctx 64")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="step3 only; default the real vocab")
    p.add_argument(
        "--precision",
        default="bf16,fp8,fp8+kv8",
        help=f"Precision modes; a '{V_TRANSPOSED}' suffix on an FP8-cache mode (fp8+kv8"
        f"{V_TRANSPOSED}) stores V transposed: P.V as an FP8 wgmma (issue 16 item 1)",
    )
    p.add_argument("--batch", default="1,8")
    p.add_argument("--context", default="64,256")
    p.add_argument("--pairs", default="", help="explicit B:ctx list, e.g. 128:4096,1:1024")
    p.add_argument("--moe", choices=("dense", "grouped"), default="dense")
    p.add_argument("--granularity", choices=("block", "channel"), default="block")
    p.add_argument("--attention", default="xla", help="xla | pallas | auto (kernel API)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--dtype",
        default=None,
        help="compute/param dtype; default bf16 on GPU, "
        "float32 on CPU (XLA:CPU lacks some bf16 x bf16 -> f32 dots)",
    )
    p.add_argument("--gemm-forms", action="store_true", help="also time the FP8 GEMM forms")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip configs after this time")
    p.add_argument("--hlo-dir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.config, a.pairs, a.precision, a.steps = "tiny", "1:64", "bf16,fp8+kv8", 3
    return a


SUMMARY_KEYS = ("name", "batch", "context", "per_layer_us", "tokens_per_s", "GBps",
                "pct_of_copy", "bytes_min", "error")  # fmt: skip


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.perf_counter()
    cfg = bench_config(a.config, a.layers, a.vocab)
    pairs = (
        [tuple(map(int, s.split(":"))) for s in a.pairs.split(",") if s]
        if a.pairs
        else [(b, c) for b in _ints(a.batch) for c in _ints(a.context)]
    )
    attention = None if a.attention == "auto" else a.attention
    extra = {"config": a.config, "layers": cfg.num_layers, "moe": a.moe}
    extra.update(attention=a.attention, granularity=a.granularity)
    harness.print_json({"copy_probe": harness.copy_probe()})
    if a.gemm_forms:
        extra["gemm_forms"] = gemm_forms()
    runs = []
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(a.dtype or ("bfloat16" if gpu else "float32"))
    extra["dtype"] = dtype.name
    # Pairs outer, precisions inner: the must-have pair runs in every mode before the budget
    # can cut anything; one model is alive at a time (a Step-3 layer stack fills the GPU).
    for b, c in pairs:
        for name in a.precision.split(","):
            shape = {"batch": b, "context": c, "layers": cfg.num_layers}
            if time.perf_counter() - t_start > a.budget_s:
                runs.append({"name": name, "shape": shape, "skipped": "budget"})
                continue
            hlo = None
            if a.hlo_dir and (b, c) == pairs[0] and name != "fp8":
                hlo = os.path.join(a.hlo_dir, f"decode_{name.replace('+', '_')}_b{b}_s{c}.hlo")
            mode, v_t = name.removesuffix(V_TRANSPOSED), name.endswith(V_TRANSPOSED)
            try:
                model = random_model(
                    cfg, Precision(mode), a.moe, attention, dtype, granularity=a.granularity
                )
                r = measure(model, cfg, Precision(mode), b, c, a.steps, hlo, v_transposed=v_t)
                r["name"] = name
            except Exception as e:  # noqa: BLE001 - keep the sweep going, report the failure
                r = harness.error_row(name, shape, e, batch=b, context=c)
            model = None  # free the weights before the next model is built
            runs.append(r)
            harness.print_json(r)
            if a.out:
                harness.write_results(a.out, runs, bench="decode", **extra)
    doc = harness.results("decode", runs, **extra)
    if a.out:
        harness.write_results(a.out, runs, bench="decode", **extra)
    summary = {k: doc[k] for k in ("device", "jax", "commit", "config", "layers", "copy_GBps")}
    summary["runs"] = [{k: r.get(k) for k in SUMMARY_KEYS} for r in runs]
    harness.print_json(summary)
    return doc


if __name__ == "__main__":
    main()
