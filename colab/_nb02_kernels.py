"""Cells of colab/02_kernels.ipynb (built by _build_notebooks.py)."""

from _build_notebooks import INSTALL

CELLS = [
    (
        "md",
        """\
# 02 · The two kernels: MFA decode attention and the FP8 grouped GEMM

step3_jax has two Pallas kernels for NVIDIA Hopper (H100 / H200), each beside a portable XLA
implementation and a plain float32 reference:

* `mfa_decode_attention`: one decode step of attention for 64 query heads sharing ONE 256-wide
  K/V head, against an FP8 (e4m3 + per-token scales) or bf16 KV cache;
* `grouped_matmul` / `grouped_swiglu`: the MoE experts' FP8 GEMMs over tokens sorted by expert.

Decode is memory-bound, so the figure of merit is achieved bandwidth against the device's own
copy bandwidth. This notebook checks each available implementation against the reference and
times it on the device you have (on CPU or a non-Hopper GPU only the XLA path runs), then
plots the H100 / H200 results recorded in `benchmarks/results/`.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import step3_jax
from step3_jax import quant
from step3_jax.kernels.grouped_gemm import grouped_matmul
from step3_jax.kernels.grouped_gemm import reference as gemm_ref
from step3_jax.kernels.mfa_decode import mfa_decode_attention, mfa_decode_reference

dev = jax.devices()[0]
HOPPER = dev.platform == "gpu" and any(h in dev.device_kind for h in ("H100", "H200"))
IMPLS = ["xla", "pallas"] if HOPPER else ["xla"]
print(f"device: {dev.device_kind} ({dev.platform}); implementations run here: {IMPLS}")


def timed(fn, *args, reps=5):
    \"\"\"Median wall time (s) of fn(*args) after a warm-up call, with device sync.\"\"\"
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(mbytes=256 if HOPPER else 64):
    \"\"\"Device-to-device copy, bytes read + written per second (the roofline we compare to).\"\"\"
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    return 2 * x.nbytes / timed(jax.jit(lambda a: a + 1), x)


COPY = copy_bandwidth()
print(f"copy bandwidth here: {COPY / 1e9:.1f} GB/s")""",
    ),
    (
        "md",
        """\
## MFA decode attention

Random q `[B, N=64, H=256]` bf16 and an FP8 cache `[B, S, 256]` with per-token scales, ragged
lengths, and NaN in every slot past a sequence's length (an out-of-bounds read would show).
Error is relative L2 against the float32 reference; bytes are KV + scales + q.""",
    ),
    (
        "code",
        """\
def mfa_inputs(b, s, seed=0):
    kq, kk, kv, kl = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, 64, 256), jnp.bfloat16)
    lengths = jax.random.randint(kl, (b,), s // 2, s + 1).astype(jnp.int32)
    past_end = jnp.arange(s)[None, :, None] >= lengths[:, None, None]
    k, k_scale = quant.quantize_kv(jax.random.normal(kk, (b, s, 256), jnp.float32))
    v, v_scale = quant.quantize_kv(jax.random.normal(kv, (b, s, 256), jnp.float32))
    nan = jnp.where(past_end[..., 0], jnp.nan, 1.0)
    return q, k, v, lengths, k_scale * nan, v_scale * nan


shapes = [(4, 1024), (16, 1024), (4, 4096)] if not HOPPER else [
    (32, 4096), (128, 4096), (64, 8192), (32, 32768), (128, 32768)]
mfa_rows = []
for b, s in shapes:
    q, k, v, lengths, ks, vs = mfa_inputs(b, s)
    ref = mfa_decode_reference(q, k, v, lengths, k_scale=ks, v_scale=vs).astype(jnp.float32)
    nbytes = k.nbytes + v.nbytes + ks.nbytes + vs.nbytes + q.nbytes
    for impl in IMPLS:
        fn = jax.jit(lambda *a, impl=impl: mfa_decode_attention(
            *a[:4], k_scale=a[4], v_scale=a[5], implementation=impl))
        out = fn(q, k, v, lengths, ks, vs).astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        sec = timed(fn, q, k, v, lengths, ks, vs)
        mfa_rows.append(dict(impl=impl, B=b, S=s, us=sec * 1e6, GBps=nbytes / sec / 1e9, err=err))
        print(f"{impl:>6} B={b:<4} S={s:<6} {sec * 1e6:9.1f} us  {nbytes / sec / 1e9:8.1f} GB/s "
              f"({nbytes / sec / COPY:6.1%} of copy)  rel. L2 error {err:.1e}")
        # Same FP8 cache bytes on both sides; the kernels quantize q to FP8 (the reference
        # does not), which dominates this error.
        assert err < 0.05
""",
    ),
    (
        "md",
        """\
## FP8 grouped GEMM

Tokens sorted by expert with random (sometimes empty) group sizes, FP8 activations with
per-token-per-128 scales, FP8 weights with 128x128 block scales; bf16 output with float32
accumulation. GB/s counts the FP8 bytes of the experts that received tokens.""",
    ),
    (
        "code",
        """\
def gemm_inputs(m, g, n, k, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x, x_scale = quant.quantize_activations(jax.random.normal(kx, (m, k), jnp.float32))
    w, w_scale = quant.quantize_weight_blocks(jax.random.normal(kw, (g, n, k), jnp.float32) / k**0.5)
    cuts = jnp.sort(jax.random.randint(kg, (g - 1,), 0, m + 1))
    sizes = jnp.diff(jnp.concatenate([jnp.zeros(1, jnp.int32), cuts, jnp.full(1, m, jnp.int32)]))
    return x, x_scale, w, w_scale, sizes.astype(jnp.int32)


gemm_shapes = [(64, 8, 512, 1024), (256, 8, 512, 1024)] if not HOPPER else [
    (64 * 3, 16, 10240, 7168), (512 * 3, 16, 10240, 7168)]  # Step-3's gate/up, a 16-expert shard
gemm_rows = []
for m, g, n, k in gemm_shapes:
    x, x_scale, w, w_scale, sizes = gemm_inputs(m, g, n, k)
    ref = gemm_ref.grouped_matmul(x, w, sizes, x_scale=x_scale, w_scale=w_scale).astype(jnp.float32)
    active = int(jnp.sum(sizes > 0))
    nbytes = active * (w.nbytes + w_scale.nbytes) // g + x.nbytes + x_scale.nbytes
    for impl in IMPLS:
        fn = jax.jit(lambda x, xs, w, ws, sz, impl=impl: grouped_matmul(
            x, w, sz, x_scale=xs, w_scale=ws, implementation=impl))
        out = fn(x, x_scale, w, w_scale, sizes).astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        sec = timed(fn, x, x_scale, w, w_scale, sizes)
        gemm_rows.append(dict(impl=impl, M=m, G=g, us=sec * 1e6, GBps=nbytes / sec / 1e9, err=err))
        print(f"{impl:>6} M={m:<5} G={g:<3} N={n} K={k}: {sec * 1e6:9.1f} us  {nbytes / sec / 1e9:8.1f} GB/s "
              f"({nbytes / sec / COPY:6.1%} of copy)  rel. L2 error {err:.1e}")
        assert err < 1e-2, 'same FP8 inputs: only the bf16 output rounding differs'""",
    ),
    (
        "md",
        """\
## This device: achieved bandwidth against copy bandwidth""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, rows, label in ((axes[0], mfa_rows, lambda r: f"B={r['B']}\\nS={r['S']}"),
                        (axes[1], gemm_rows, lambda r: f"M={r['M']}\\nG={r['G']}")):
    for impl in IMPLS:
        sel = [r for r in rows if r["impl"] == impl]
        ax.plot([label(r) for r in sel], [r["GBps"] for r in sel], "o-", label=impl)
    ax.axhline(COPY / 1e9, color="k", ls="--", lw=1, label="copy bandwidth")
    ax.set_ylabel("GB/s"); ax.set_ylim(bottom=0); ax.legend(fontsize=8)
axes[0].set_title(f"MFA decode on {dev.device_kind}"); axes[1].set_title(f"grouped GEMM on {dev.device_kind}")
plt.tight_layout(); plt.show()""",
    ),
    (
        "md",
        """\
## Recorded H100 / H200 results

Kernel time is CUPTI time summed over every kernel of the call (q quantization and the split-K
combine included); the copy bandwidth was measured in the same run (bytes read + written, so a
read-mostly kernel can exceed it). The JSON files live in the repository's
`benchmarks/results/` (the install cell's checkout, or this clone). Each run's dashed line is
the copy bandwidth that run measured: the grouped-GEMM benchmark's copy figure on the H200
(3.16 TB/s) is lower than the MFA benchmark's (4.29 TB/s), so the H200 weight stream sits above
its own line.""",
    ),
    (
        "code",
        """\
def results_dir() -> pathlib.Path | None:
    here = pathlib.Path(step3_jax.__file__).resolve().parents[1]
    for base in (pathlib.Path(STEP3_JAX_SOURCE).expanduser(), pathlib.Path("step3_jax_src"), here,
                 pathlib.Path.cwd()):
        if (base / "benchmarks" / "results").is_dir():
            return base / "benchmarks" / "results"
    return None


RESULTS = results_dir()
assert RESULTS, "benchmarks/results/ not found: set STEP3_JAX_SOURCE to a checkout or git URL"
print(f"{len(list(RESULTS.glob('*.json')))} recorded runs in benchmarks/results/")
load = lambda name: json.loads((RESULTS / name).read_text())
runs = {"H100": load("mfa_decode_H100_sweep_98b0a31.json"), "H200": load("mfa_decode_h200_tune.json")}
styles = {"pallas_fp8": "o-", "pallas_bf16": "s-", "xla_fp8": "x--", "xla_bf16": "+--",
          "torch_sdpa_bf16": "^:", "jax_triton_example_bf16": "v:"}
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, (name, run) in zip(axes, runs.items()):
    shapes = sorted({(r["B"], r["ctx"]) for r in run["rows"]}, key=lambda bs: (bs[1], bs[0]))
    shapes = [bs for bs in shapes if bs[0] >= 8]
    for impl, style in styles.items():
        got = {(r["B"], r["ctx"]): r["GBps"] for r in run["rows"] if r["impl"] == impl}
        if got:
            ax.plot(range(len(shapes)), [got.get(bs, np.nan) / 1e3 for bs in shapes], style, label=impl, ms=4)
    ax.axhline(run["copy_GBps"] / 1e3, color="k", ls="--", lw=1, label="copy bandwidth")
    ax.set_xticks(range(len(shapes)), [f"{b}x{c // 1024}K" for b, c in shapes], rotation=60, fontsize=7)
    ax.set_title(f"MFA decode, {run['device']} (commit {run['commit']})"); ax.set_xlabel("batch x context")
axes[0].set_ylabel("TB/s"); axes[0].legend(fontsize=7)
plt.tight_layout(); plt.show()
r = next(r for r in runs["H100"]["rows"] if (r["impl"], r["B"], r["ctx"]) == ("pallas_fp8", 128, 4096))
print(f"H100 FP8 Pallas at 128 x 4K: {r['us']} us = {r['GBps'] / 1e3:.2f} TB/s ({r['pct_copy']}% of copy)")""",
    ),
    (
        "code",
        """\
fig, ax = plt.subplots(figsize=(6, 3.6))
# H100: the first run, with T=1024 re-measured (tuned tile table) in the second run.
for name, files in (("H100", ("moe_h100.json", "moe_h100_shards.json")), ("H200", ("moe_h200_tune.json",))):
    by_t = {r["T"]: r for f in files for r in load(f)["results"] if r["E_local"] == 48}
    run, rows = load(files[0]), [by_t[t] for t in sorted(by_t)]
    line, = ax.plot([r["T"] for r in rows], [r["layer_weight_GBs"] / 1e3 for r in rows], "o-",
                    label=f"{name}: whole MoE layer")
    ax.axhline(run["meta"]["copy_GBs"] / 1e3, color=line.get_color(), ls="--", lw=1,
               label=f"{name} copy bandwidth")
ax.set_xscale("log", base=2); ax.set_xlabel("tokens T (48 experts, top-3 + shared)")
ax.set_ylabel("TB/s of FP8 expert weights"); ax.set_ylim(bottom=0); ax.legend(fontsize=7)
ax.set_title("Grouped GEMM: weight streaming (memory-bound at small T)")
plt.tight_layout(); plt.show()""",
    ),
]
