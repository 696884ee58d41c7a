"""Benchmark MFA decode attention (64 heads, one 256-wide K/V head) against its baselines.

For each B x context (timed by ``benchmarks.harness``: device time, host times beside it,
rotated input sets larger than L2): effective GB/s over all bytes the kernel must read
(KV + scales + q), and % of the copy probe of the same process. Side by side: our Pallas kernel
(FP8 and bf16 cache), the XLA implementation (FP8 and bf16), the JAX Triton decode-attention
example (bf16), torch SDPA (bf16) and cuDNN through jax.nn.dot_product_attention (bf16) when it
runs. ``--splits`` adds Pallas rows at fixed split-K factors (the small-batch sweep of issue
16); ``--breakdown`` records the per-kernel times of chosen shapes. ``--ragged on|both`` times
ragged batches (lengths uniform in [S/2, S], seeded per shape, bytes over the KV actually
needed) and adds the ``pallas_*_ragged`` impls (the api's config with ``ragged=True``).
``pallas_fp8_pv``: the FP8 cache with V stored transposed, P.V as an FP8 wgmma (issue 16 item
1; same bytes as ``pallas_fp8``); ``pallas_fp8[_pv]_paged64``: both on 64-token pages.

    python3 benchmarks/bench_mfa_decode.py --out /tmp/res
    python3 benchmarks/bench_mfa_decode.py --tiny --out /tmp/res   # CPU smoke run (XLA rows)

Last stdout line: one JSON object (the file is --out/mfa_decode_<device>.json).
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
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from step3_jax.kernels.mfa_decode import config as cfg_lib  # noqa: E402
from step3_jax.kernels.mfa_decode import mfa_decode_attention  # noqa: E402
from step3_jax.quant import quantize_kv  # noqa: E402

N, H = 64, 256


def ragged_lengths(b, s):
    """Lengths uniform in [S/2, S], the same for every input set of a shape (seeded by it)."""
    return np.random.default_rng(1000 * b + s).integers(s // 2, s + 1, b).astype(np.int32)


def make_inputs(seed, b, s, fp8, lengths=None, v_transposed=False, page=None):
    """Random call arguments; ``v_transposed``: V stored [B, H, S] (FP8 P.V layout);
    ``page``: the same cache cut into pages of ``page`` tokens (identity block table)."""
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, 1, N, H), jnp.bfloat16)
    k = jax.random.normal(kk, (b, s, H), jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, H), jnp.bfloat16)
    # Default: full contexts, every byte is read.
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths)
    if fp8:
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        d = dict(q=q, k=k, v=v, lengths=lengths, k_scale=ks, v_scale=vs)
    else:
        d = dict(q=q, k=k, v=v, lengths=lengths)
    if page:  # [B, S, ...] -> [B * S / page, page, ...]; table row b = pages of sequence b
        for name in ("k", "v", "k_scale", "v_scale"):
            if name in d:
                d[name] = d[name].reshape(b * s // page, page, *d[name].shape[2:])
        d["block_table"] = jnp.arange(b * s // page, dtype=jnp.int32).reshape(b, s // page)
    if v_transposed:  # [.., S or page, H] -> [.., H, S or page]: each page's V^T contiguous
        d["v"] = jnp.swapaxes(d["v"], 1, 2)
    return d


def bytes_read(b, s, fp8, lengths=None):
    """Bytes the call must read: K, V (+ scales) of the VISIBLE tokens, and q."""
    tokens = b * s if lengths is None else int(np.sum(lengths))
    kv = 2 * tokens * H * (1 if fp8 else 2)
    scales = 2 * tokens * 4 if fp8 else 0
    return kv + scales + b * N * H * 2


def flops(b, s, lengths=None):
    """QK and P.V: 2 * 2 * N * H per visible token."""
    return 4 * N * H * (b * s if lengths is None else int(np.sum(lengths)))


def _arg_sets(b, s, fp8, lengths=None, v_transposed=False, page=None):
    n = harness.num_sets(bytes_read(b, s, fp8))  # the whole cache rotates, read or not
    return [(make_inputs(i, b, s, fp8, lengths, v_transposed, page),) for i in range(n)]


def auto_splits(b, s, block_s=64):
    """The split-K factor the api picks for B x S on this device (T = 1)."""
    dev = jax.devices()[0]
    sms = getattr(dev, "core_count", 132) or 132
    return cfg_lib.choose_num_splits(b, s, block_s, sms, cfg_lib.split_costs(dev.device_kind))


def _ours(impl, config=None, v_transposed=False):
    return jax.jit(
        lambda d: mfa_decode_attention(
            **d, implementation=impl, config=config, v_transposed=v_transposed
        )
    )


def bench_ours(b, s, fp8, impl, config=None, lengths=None, v_transposed=False, page=None):
    fn = _ours(impl, config, v_transposed)
    return fn, _arg_sets(b, s, fp8, lengths, v_transposed, page)


def resolved_config(b, s, fp8, **changes):
    """The config the api would pick for this call, with ``changes`` (e.g. ``ragged=True``:
    the work list on; ``longest_first=False``: the unsplit grid's CTAs in index order)."""
    from step3_jax.kernels.mfa_decode import api

    kv = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    cfg, _, _ = api._resolve_config(_config(fp8), kv, b, s, None)
    return dataclasses.replace(cfg, **changes)


def kernel_breakdown(b, s, fp8, config=None, lengths=None):
    """Per-kernel device times (us) of one Pallas call: the Mosaic kernel, the split-K combine
    fusions, q quantization (with a ragged config: the work-list pre-pass), in launch order."""
    return harness.kernel_times(_ours("pallas", config), (make_inputs(0, b, s, fp8, lengths),))


VARIANTS = {  # name -> (fp8, TuningConfig kwargs); measured side by side at the target shapes
    "pallas_fp8[head,8bit,stages=4]": (True, dict(v_load="8bit", num_stages=4)),
    "pallas_fp8[seq,8bit,stages=4]": (True, dict(wg_split="seq", num_stages=4)),
    "pallas_fp8[seq,wgmma,stages=4]": (True, dict(wg_split="seq", v_load="wgmma", num_stages=4)),
    "pallas_fp8[seq,8bit,stages=2]": (True, dict(wg_split="seq", num_stages=2)),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel"),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,q_tma]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,ring_epi]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel", ring_epilogue=True),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,q_tma,ring_epi]": (
        True,
        dict(wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True, ring_epilogue=True),
    ),
    "pallas_bf16[head,stages=2]": (False, dict(num_stages=2)),
    "pallas_bf16[seq,stages=2]": (False, dict(wg_split="seq", num_stages=2)),
}
# Further variants, measured only when named in --extra-variants (the H200 tuning run): the
# q-in-kernel form of the other FP8 choices, since q_in_kernel is the H100 default.
EXTRA_VARIANTS = {
    "pallas_fp8[seq,wgmma,stages=4,q_in_kernel]": (
        True,
        dict(wg_split="seq", v_load="wgmma", num_stages=4, q_quant="kernel"),
    ),
    "pallas_fp8[seq,8bit,stages=2,q_in_kernel]": (
        True,
        dict(wg_split="seq", num_stages=2, q_quant="kernel"),
    ),
    "pallas_fp8[head,8bit,stages=4,q_in_kernel]": (True, dict(num_stages=4, q_quant="kernel")),
    "pallas_fp8[head,8bit,stages=3,q_in_kernel]": (True, dict(num_stages=3, q_quant="kernel")),
    # The tuned FP8 default with the e4m3 -> f16 V conversion done by the memory warpgroup
    # (v_convert="memory"), with and without q staged by TMA (benchmarks/gpu_vconvert_check.sh).
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,q_tma,ring_epi,vcvt_mem]": (
        True,
        dict(
            wg_split="seq",
            num_stages=4,
            q_quant="kernel",
            q_tma=True,
            ring_epilogue=True,
            v_convert="memory",
        ),
    ),
    "pallas_fp8[seq,8bit,stages=4,q_in_kernel,ring_epi,vcvt_mem]": (
        True,
        dict(
            wg_split="seq", num_stages=4, q_quant="kernel", ring_epilogue=True, v_convert="memory"
        ),
    ),
}
FP8_CONFIG = {}  # TuningConfig kwargs for the sweep's pallas_fp8 rows (--fp8-split)
BF16_CONFIG = {}  # same for pallas_bf16 rows; set only by --config-from-variants


def variants(shapes, table=None):
    """Time every variant of ``table`` (default VARIANTS) at each (B, S) of ``shapes``."""
    from step3_jax.kernels.mfa_decode import TuningConfig

    rows = []
    for b, s in shapes:
        for name, (fp8, kw) in (table or VARIANTS).items():
            cfg = TuningConfig(**kw)
            rows.append(
                _row(name, b, s, fp8, functools.partial(bench_ours, b, s, fp8, "pallas", cfg))
            )
    return rows


def _shape_key(r):
    return r["shape"]["B"], r["shape"]["ctx"]


def best_variant(rows, table, fp8):
    """Name of the ``fp8`` variant of ``table`` with the lowest mean of time / (best time at
    that shape) over the shapes where it ran; only variants that ran at every shape count."""
    names = [n for n, (f, _) in table.items() if f == fp8]
    ok = [r for r in rows if r["name"] in names and "time_us" in r]
    shapes = {_shape_key(r) for r in ok}
    if not shapes:
        return None
    best = {sh: min(r["time_us"] for r in ok if _shape_key(r) == sh) for sh in shapes}
    score = {}
    for n in names:
        mine = [r for r in ok if r["name"] == n]
        if len(mine) == len(shapes):
            score[n] = sum(r["time_us"] / best[_shape_key(r)] for r in mine) / len(mine)
    return min(score, key=score.get) if score else None


def bench_triton_example(b, s, lengths=None):
    from jax.experimental.pallas.ops.gpu import decode_attention as da

    # block_k=64: the example's default 256 needs 272 KiB of shared memory at head dim 256.
    fn = jax.jit(
        lambda d: da.mqa(d["q"][:, 0], d["k"], d["v"], kv_seq_len=d["lengths"], block_k=64)
    )
    return fn, _arg_sets(b, s, False, lengths)


def bench_cudnn(b, s, lengths=None):
    def f(d):
        return jax.nn.dot_product_attention(
            d["q"],
            d["k"][:, :, None],
            d["v"][:, :, None],
            key_value_seq_lengths=d["lengths"],
            implementation="cudnn",
        )

    return jax.jit(f), _arg_sets(b, s, False, lengths)


def bench_torch_sdpa(b, s, lengths=None):
    if lengths is not None:
        raise NotImplementedError("the torch SDPA baseline reads full contexts only")
    import torch
    import torch.nn.functional as F

    n_sets = harness.num_sets(bytes_read(b, s, False))
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    sets = [(mk(b, N, 1, H), mk(b, 1, s, H), mk(b, 1, s, H)) for _ in range(n_sets)]
    call = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return call, sets, lambda _: torch.cuda.synchronize()


def _row(name, b, s, fp8, make, lengths=None, **extra):
    """Times ``make() -> (fn, arg_sets[, sync])``; a failure is recorded as an error row.
    ``lengths``: a ragged batch (bytes and flops over the visible tokens only)."""
    shape = {"B": b, "ctx": s, "kv": "fp8" if fp8 else "bf16"}
    if lengths is not None:
        shape.update(lengths="ragged", mean_len=round(float(np.mean(lengths)), 1))
    try:
        fn, sets, *sync = make()
        kw = {"sync": sync[0]} if sync else {}
        row = harness.measure(
            fn, sets, bytes=bytes_read(b, s, fp8, lengths), flops=flops(b, s, lengths),
            name=name, shape=shape, **kw, **extra,
        ).to_dict()  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a failing baseline is recorded, not fatal
        row = harness.error_row(name, shape, e, **extra)
    harness.print_json(row)
    return row


def sweep(batches, contexts, impls, rows, flush, splits=(), ragged="off"):
    """Every impl at every B x S (<= 12 GiB of KV); with ``splits``, also the Pallas kernels at
    each fixed split-K factor that leaves each split >= one 64-token block. ``ragged``: "off"
    (full contexts), "on" (lengths uniform in [S/2, S]) or "both"."""
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[ragged]
    for s in contexts:
        for b in batches:
            if bytes_read(b, s, False) > 12 * 2**30:
                continue
            for rag in modes:
                lens = ragged_lengths(b, s) if rag else None
                _sweep_shape(b, s, lens, impls, rows, flush, splits)
    return rows


def _sweep_shape(b, s, lens, impls, rows, flush, splits):
    plan = _plan(b, s, lens)
    for name in impls:
        fp8, make = plan[name]
        extra = {"splits": auto_splits(b, s)} if name in ("pallas_fp8", "pallas_bf16") else {}
        rows.append(_row(name, b, s, fp8, make, lens, **extra))
        flush()
        if name not in ("pallas_fp8", "pallas_bf16") or not splits:
            continue
        for j in splits:
            if j * 64 > s:
                continue
            cfg = forced_splits_config(b, s, fp8, j)
            make_j = functools.partial(bench_ours, b, s, fp8, "pallas", cfg, lens)
            rows.append(_row(f"{name}[splits={j}]", b, s, fp8, make_j, lens, splits=j))
            flush()


def forced_splits_config(b, s, fp8, splits):
    """The config the api would pick for this call (sweep config or tuned table, its ring
    shrunk to fit f32 partials: ``api._resolve_config``), with ``num_splits`` forced."""
    from step3_jax.kernels.mfa_decode import api

    kv = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    cfg, _, _ = api._resolve_config(_config(fp8), kv, b, s, None)
    return dataclasses.replace(cfg, num_splits=splits)


def _config(fp8):
    """The sweep's config: None (the api's tuned table) unless --fp8-split or
    --config-from-variants set one."""
    from step3_jax.kernels.mfa_decode import TuningConfig

    kw = FP8_CONFIG if fp8 else BF16_CONFIG
    return TuningConfig(**kw) if kw else None


def _plan(b, s, lens=None):
    def ours(fp8, impl, cfg=None, vt=False, page=None):
        return lambda: bench_ours(b, s, fp8, impl, cfg() if cfg else None, lens, vt, page)

    return {
        "pallas_fp8": (True, ours(True, "pallas", lambda: _config(True))),
        "pallas_fp8_pv": (True, ours(True, "pallas", lambda: _config(True), vt=True)),
        # 64-token pages (the engine's default): a V^T page is one contiguous 16 KiB box,
        # where the contiguous [B, H, S] layout makes each 64-token box 256 strided rows.
        "pallas_fp8_paged64": (True, ours(True, "pallas", lambda: _config(True), page=64)),
        "pallas_fp8_pv_paged64": (
            True,
            ours(True, "pallas", lambda: _config(True), vt=True, page=64),
        ),
        "pallas_bf16": (False, ours(False, "pallas", lambda: _config(False))),
        "pallas_fp8_ragged": (
            True,
            ours(True, "pallas", lambda: resolved_config(b, s, True, ragged=True)),
        ),
        "pallas_bf16_ragged": (
            False,
            ours(False, "pallas", lambda: resolved_config(b, s, False, ragged=True)),
        ),
        # The unsplit grid in index order (before `config.use_longest_first`).
        "pallas_fp8_index_order": (
            True,
            ours(True, "pallas", lambda: resolved_config(b, s, True, longest_first=False)),
        ),
        "xla_fp8": (True, ours(True, "xla")),
        "xla_bf16": (False, ours(False, "xla")),
        "jax_triton_example_bf16": (False, lambda: bench_triton_example(b, s, lens)),
        "torch_sdpa_bf16": (False, lambda: bench_torch_sdpa(b, s, lens)),
        "cudnn_bf16": (False, lambda: bench_cudnn(b, s, lens)),
    }


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="1024,4096,8192,32768")
    ap.add_argument(
        "--impls",
        default="pallas_fp8,pallas_bf16,xla_fp8,xla_bf16,"
        "jax_triton_example_bf16,torch_sdpa_bf16,cudnn_bf16",
    )
    ap.add_argument("--variants", default="128x4096,8x32768", help="BxS shapes, '' for none")
    ap.add_argument("--fp8-split", default="", help="'seq' or 'head': pallas_fp8 sweep config")
    ap.add_argument(
        "--extra-variants",
        default="",
        help="'all' or a '|'-separated list of further variants to time (names contain "
        f"commas): {' | '.join(EXTRA_VARIANTS)}",
    )
    ap.add_argument(
        "--config-from-variants",
        action="store_true",
        help="sweep pallas_fp8 / pallas_bf16 with the fastest variant (mean of time / best time "
        "over the --variants shapes) instead of the tuned table",
    )
    ap.add_argument(
        "--only-variants",
        default="",
        help="'|'-separated substrings: time only the variants whose names contain one",
    )
    ap.add_argument(
        "--splits",
        default="",
        help="comma list of split-K factors: also time the pallas impls at each (e.g. 1,2,4,8)",
    )
    ap.add_argument(
        "--breakdown",
        default="128x4096",
        help="BxS shapes whose per-kernel device times (FP8 pallas call) are recorded",
    )
    ap.add_argument(
        "--ragged",
        default="off",
        choices=("off", "on", "both"),
        help="lengths uniform in [S/2, S] ('on'), full contexts ('off') or each in turn",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: 2 x 256, XLA rows only")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batches, args.contexts, args.impls = "2", "256", "xla_fp8,xla_bf16"
        args.variants = args.breakdown = ""
    unknown = sorted(set(args.impls.split(",")) - set(_plan(1, 64)))
    if unknown:
        ap.error(f"--impls: unknown {unknown}; choose from {sorted(_plan(1, 64))}")
    return args


def _variant_table(args):
    table = dict(VARIANTS)
    if args.extra_variants:
        names = list(EXTRA_VARIANTS) if args.extra_variants == "all" else args.extra_variants
        names = [n for n in names.split("|") if n] if isinstance(names, str) else names
        unknown = [n for n in names if n not in EXTRA_VARIANTS]
        if unknown:
            raise SystemExit(
                f"--extra-variants: unknown {unknown}; choose from {list(EXTRA_VARIANTS)}"
            )
        table.update({n: EXTRA_VARIANTS[n] for n in names})
    if args.only_variants:
        keep = [w for w in args.only_variants.split("|") if w]
        table = {n: v for n, v in table.items() if any(w in n for w in keep)}
    return table


def _shapes(text):
    return [tuple(int(x) for x in v.split("x")) for v in text.split(",") if v]


def main(argv=None):
    args = parse_args(argv)
    table = _variant_table(args)
    if args.fp8_split:
        FP8_CONFIG.update(wg_split=args.fp8_split)
    harness.print_json({"copy_probe": harness.copy_probe(), "device": harness.device_tag()})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mfa_decode_{harness.device_tag()}.json")
    rows, extra = [], {"variants": [], "breakdown": {}}

    def flush():
        harness.write_results(path, rows, bench="mfa_decode", **extra)

    for b, s in _shapes(args.breakdown):
        try:
            extra["breakdown"][f"fp8_{b}x{s}"] = kernel_breakdown(b, s, True)
        except Exception as e:  # noqa: BLE001
            extra["breakdown"][f"fp8_{b}x{s}"] = f"{type(e).__name__}: {str(e)[:200]}"
        if args.ragged != "off":  # the ragged work list on ragged lengths: plan, kernel, merge
            key = f"fp8_ragged_{b}x{s}"
            try:
                cfg = resolved_config(b, s, True, ragged=True)
                extra["breakdown"][key] = kernel_breakdown(b, s, True, cfg, ragged_lengths(b, s))
            except Exception as e:  # noqa: BLE001
                extra["breakdown"][key] = f"{type(e).__name__}: {str(e)[:200]}"
    harness.print_json({"breakdown": extra["breakdown"]})
    extra["variants"] = variants(_shapes(args.variants), table)
    if args.config_from_variants:
        for fp8, cfg in ((True, FP8_CONFIG), (False, BF16_CONFIG)):
            name = best_variant(extra["variants"], table, fp8)
            if name:
                cfg.clear()
                cfg.update(table[name][1])
            extra["sweep_config_" + ("fp8" if fp8 else "bf16")] = name
        harness.print_json({k: v for k, v in extra.items() if k.startswith("sweep_config")})
    flush()
    sweep(_ints(args.batches), _ints(args.contexts), args.impls.split(","), rows, flush,
          _ints(args.splits), args.ragged)  # fmt: skip
    flush()
    doc = harness.results("mfa_decode", rows, **extra)
    harness.print_json({k: v for k, v in doc.items() if k not in ("rows", "variants")})


if __name__ == "__main__":
    main()
