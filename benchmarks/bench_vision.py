"""Step3-VL vision tower + downsamplers + projector: time per image, FLOP/s, % of peak.

    python3 benchmarks/bench_vision.py --out benchmarks/results/vision_h200.json   # GPU, real size
    JAX_PLATFORMS=cpu python3 benchmarks/bench_vision.py --tiny                    # CPU smoke run

Runs the real-size model (random bf16 weights; ``--tiny``: `Step3VisionConfig.tiny()`) on
``--images`` views of ``--size`` px (default one 728 x 728 image): bf16 linears, then FP8
linears (`step3_jax.quant_model.Fp8Weight`, 128x128 block scales, activations per token per 128,
``--fp8-gemm``: the `KernelPolicy.gemm` of that run) where the project's FP8 path
applies (the ViT's qkv/out/fc1/fc2 and the projector; convolutions and attention stay bf16).
FLOPs are counted analytically: every linear, the patch-embedding and both downsampler convolutions, attention (QK^T and PV over
all 4 + G^2 tokens). With torch (and a GPU) importable, the same tower in torch/cuDNN (SDPA,
cuDNN convs) runs on the SAME weights (shared through DLPack) beside it, and its output is
compared with ours (cosine). The share of a 4K-token request's prefill is an analytic FLOP
ratio against the 316B text model (the text prefill itself does not fit one GPU).
As the model runs it: the layers see the tokens padded to a multiple of ``--token-multiple``
(8; padded keys masked; FLOPs count the real tokens only), and on a GPU every JAX call compiles
with `step3_jax.policy.GPU_COMPILER_OPTIONS` (cuBLAS GEMMs; ``--triton-gemm``: XLA's defaults).
JAX calls are timed with the project's harness (`benchmarks/harness.time_calls`): ``*_ms`` is
the GPU device time (CUPTI, the sum of the call's kernels; the host loop elsewhere) and
``*_host_ms`` the wall time of one blocked call beside it (``*_host_loop_ms``: calls enqueued
back to back, one sync: what a stream of views would see); the torch twin's ``torch_bf16_ms``
is its CUDA-event span. The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.provenance import git_commit  # noqa: E402
from step3_jax.config import Step3Config  # noqa: E402
from step3_jax.policy import KernelPolicy, compiler_options  # noqa: E402
from step3_jax.vision.config import NUM_PREFIX_TOKENS, Step3VisionConfig  # noqa: E402
from step3_jax.vision.encoder import (  # noqa: E402
    TOKEN_MULTIPLE,
    Step3VisionModel,
    quantize_linears,
)
from step3_jax.vision.layers import padded_length  # noqa: E402
from step3_jax.vision.model import flatten_tower, tower_program  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s; FP8 is twice these on Hopper.
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "H100 PCIe": 756.0e12}


def flops(c: Step3VisionConfig, size: int) -> dict[str, float]:
    """Analytic FLOPs of one view (2 per multiply-add)."""
    g = c.grid(size)
    t = NUM_PREFIX_TOKENS + g * g
    d, f, o, m = c.hidden_size, c.intermediate_size, c.output_hidden_size, c.text_hidden_size
    g1 = (g - 2) // c.projector_stride + 1
    g2 = (g1 - 1) // 2 + 1
    return {
        "patch_embed": 2.0 * g * g * c.num_channels * c.patch_size**2 * d,
        "linears": c.num_layers * 2.0 * t * (4 * d * d + 2 * d * f),
        "attention": c.num_layers * 4.0 * t * t * d,
        "downsampler_convs": 2.0 * g1 * g1 * o * d * 4 + 2.0 * g2 * g2 * 2 * o * o * 9,
        "projector": 2.0 * g2 * g2 * 2 * o * m,
    }


def text_prefill_flops(text: Step3Config, tokens: int) -> float:
    """Analytic FLOPs of a ``tokens``-long prefill of the text model (linears of the activated
    parameters incl. lm_head on every token, causal attention)."""
    linears = 2.0 * tokens * text.activated_param_count(include_embeddings=False)
    head = 2.0 * tokens * text.vocab_size * text.hidden_size
    attn = text.num_layers * 4.0 * text.num_heads * text.head_dim * tokens * tokens / 2
    return linears + head + attn


def build(c: Step3VisionConfig, seed: int = 0) -> Step3VisionModel:
    """Random bf16 weights without an eager per-parameter init: abstract model, then one jitted
    random fill per leaf shape (weights ~ N(0, 1/fan_in), norms ~1, biases small)."""
    abstract = nnx.eval_shape(
        lambda: Step3VisionModel(c, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    graphdef, state = nnx.split(abstract)
    fill = jax.jit(
        lambda k, scale, shift, shape: (scale * jax.random.normal(k, shape) + shift).astype(
            jnp.bfloat16
        ),
        static_argnums=3,
    )
    key = jax.random.key(seed)
    for path, leaf in nnx.to_flat_state(state):
        shape = tuple(leaf.get_value().shape)
        name = ".".join(map(str, path))
        key, sub = jax.random.split(key)
        if "layer_norm" in name and name.endswith("weight"):
            scale, shift = 0.05, 1.0
        elif name.endswith("bias") or len(shape) == 1:
            scale, shift = 0.02, 0.0
        else:
            scale, shift = 1.0 / np.sqrt(np.prod(shape[1:])), 0.0
        leaf.set_value(fill(sub, scale, shift, shape))
    return nnx.merge(graphdef, state)


def jitted(model, pixels, gpu_options: bool):
    """The tower as `Step3VLModel.embed_images` runs it: the module flattened
    (`flatten_tower`), then the jitted `tower_program` (``gpu_options``: compiled with the
    project's GPU options); and its arguments."""
    program = tower_program(gpu_options)
    return (lambda m, px: program(*flatten_tower(m), px)), (model, pixels)


def run_jax(model, pixels, iters, gpu_options: bool):
    """(`harness.Timing` of one tower call: GPU device time with the host time beside it,
    the output)."""
    fn, args = jitted(model, pixels, gpu_options)
    timing = harness.time_calls(fn, [args], reps=iters, warmup=2)
    return timing, fn(*args)


def host_costs(model, pixels, gpu_options: bool, calls: int = 5, top: int = 15) -> dict:
    """Where a tower call's host time goes: the median time for the jitted call to RETURN
    (dispatch: argument flattening, the runtime enqueueing every kernel; the device is idle
    before each call), the module's pytree flatten alone, the same program with the module
    flattened once beforehand (its device, blocked and back-to-back times), and a cProfile of
    one dispatch (the ``top`` entries by own time, ms)."""
    import cProfile
    import pstats

    fn, args = jitted(model, pixels, gpu_options)
    jax.block_until_ready(fn(*args))
    dispatch, flatten = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = fn(*args)
        dispatch.append(time.perf_counter() - t0)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        flatten_tower(model)
        flatten.append(time.perf_counter() - t0)
    # The same program with the module flattened once beforehand (as `image_features` runs
    # its several tower calls): what the per-call flatten costs the host and the device's
    # idle time between calls.
    program = tower_program(gpu_options)
    flat_timing = harness.time_calls(
        program, [(*flatten_tower(model), pixels)], reps=calls, warmup=2
    )
    prof = cProfile.Profile()
    prof.enable()
    out = fn(*args)
    prof.disable()
    jax.block_until_ready(out)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, own, cumulative, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "dispatch_ms": round(1e3 * statistics.median(dispatch), 3),
        "module_flatten_ms": round(1e3 * statistics.median(flatten), 3),
        "flat_leaves_ms": round(flat_timing.time_us / 1e3, 3),
        "flat_leaves_host_ms": round(flat_timing.host_us / 1e3, 3),
        "flat_leaves_host_loop_ms": round(flat_timing.host_loop_us / 1e3, 3),
        "dispatch_profile_own_ms": [
            [f"{Path(f).name}:{line}:{name}", round(1e3 * v[2], 3), v[1]]
            for (f, line, name), v in rows
        ],
    }


def torch_reference(model: Step3VisionModel, pixels, iters: int):
    """The same tower in torch on the same weights (DLPack, no copy): time and output."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        return None
    c = model.config
    t = lambda a: torch.from_dlpack(a)  # noqa: E731
    v, emb = model.vision_model, model.vision_model.embeddings

    def linear(lin, x):
        return F.linear(x, t(lin.weight[...]), None if lin.bias is None else t(lin.bias[...]))

    def forward(px):
        x = F.conv2d(px, t(emb.patch_embedding.weight[...]), t(emb.patch_embedding.bias[...]),
                     stride=c.patch_size).flatten(2).transpose(1, 2)  # fmt: skip
        pos = t(emb.position_embedding[...])
        g = int(round(x.shape[1] ** 0.5))
        if g != c.position_grid:
            grid = pos[1:].view(1, c.position_grid, c.position_grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(g, g), mode="bicubic", antialias=True,
                                 align_corners=False).to(pos.dtype)  # fmt: skip
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(g * g, -1)])
        cls = t(emb.class_embedding[...]).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + pos
        x = torch.cat([x[:, :1].repeat(1, NUM_PREFIX_TOKENS - 1, 1), x], 1)
        for layer in v.layers:
            a = layer.self_attn
            q, k, vv = linear(a.qkv_proj, x).chunk(3, -1)
            sh = lambda z: z.view(z.shape[0], z.shape[1], c.num_heads, -1).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(sh(q), sh(k), sh(vv)).transpose(1, 2).flatten(2)
            ln1, ln2 = layer.layer_norm1, layer.layer_norm2
            x = x + F.layer_norm(linear(a.out_proj, o), (x.shape[-1],), t(ln1.weight[...]),
                                 t(ln1.bias[...]), c.layer_norm_eps)  # fmt: skip
            h = linear(layer.mlp.fc1, x)
            h = linear(layer.mlp.fc2, h * torch.sigmoid(1.702 * h))
            x = x + F.layer_norm(h, (x.shape[-1],), t(ln2.weight[...]), t(ln2.bias[...]),
                                 c.layer_norm_eps)  # fmt: skip
        x = x[:, NUM_PREFIX_TOKENS:]
        f = x.transpose(1, 2).reshape(x.shape[0], -1, g, g)
        d1, d2 = model.vit_downsampler, model.vit_downsampler2
        f = F.conv2d(f, t(d1.weight[...]), t(d1.bias[...]), stride=c.projector_stride)
        f = F.conv2d(f, t(d2.weight[...]), t(d2.bias[...]), stride=2, padding=1)
        return linear(model.vit_large_projector, f.flatten(2).transpose(1, 2))

    px = torch.from_dlpack(pixels)
    with torch.inference_mode():
        for _ in range(2):
            out = forward(px)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(px)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), out.float().cpu().numpy()


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="Step3VisionConfig.tiny() (CPU smoke run)")
    p.add_argument("--size", type=int, default=728, help="view side in pixels (728 or 504)")
    p.add_argument("--images", type=int, default=1, help="views per call")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--fp8-gemm", default="auto", choices=("auto", "pallas", "xla", "xla_fp8"),
        help="KernelPolicy.gemm of the FP8 run (auto: Pallas where it applies, else XLA)",
    )  # fmt: skip
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument(
        "--triton-gemm", action="store_true",
        help="compile with XLA's defaults (Triton GEMM fusions) rather than the GPU options "
        "the model uses (step3_jax.policy.GPU_COMPILER_OPTIONS: cuBLAS GEMMs)",
    )  # fmt: skip
    p.add_argument(
        "--token-multiple", type=int, default=TOKEN_MULTIPLE,
        help="pad the tower's tokens to a multiple of this (padded keys masked); 1: no padding",
    )  # fmt: skip
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--host-costs", action="store_true",
        help="add where a call's host time goes (`host_costs`; compiles the tower once more)",
    )  # fmt: skip
    p.add_argument(
        "--trace", action="store_true",
        help="add a profiler breakdown of one bf16 call (busy vs idle, top kernels)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="JSON file (its folder is created)")
    return p.parse_args()


def header(c: Step3VisionConfig, args, model, fl: dict, peak) -> dict:
    dev = jax.devices()[0]
    per_view = sum(fl.values())
    tokens = NUM_PREFIX_TOKENS + c.grid(args.size) ** 2
    return {
        "bench": "vision_tower",
        "config": "tiny" if args.tiny else "step3",
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "images": args.images,
        "size": args.size,
        "tokens_per_view": tokens,
        # the token count the layers run on (FLOPs and TFLOP/s count the real tokens only)
        "padded_tokens_per_view": padded_length(tokens, model.token_multiple),
        "token_multiple": model.token_multiple,
        "output_tokens_per_view": c.tokens_per_view(args.size),
        "params": c.param_count(),
        "attention_implementation": model.attention_implementation,
        "gflop": {k: round(v * args.images / 1e9, 3) for k, v in fl.items()},
        "gflop_total": round(per_view * args.images / 1e9, 3),
        "bf16_peak_tflops": None if peak is None else peak / 1e12,
        # one view's FLOPs over a 4K-token Step-3 text prefill's (real size only)
        "share_of_4k_prefill_flops": None
        if args.tiny
        else round(per_view / text_prefill_flops(Step3Config.step3(), 4096), 4),
    }


def bf16_runs(model, pixels, iters: int, res: dict, record, gpu_options: bool, host: bool = False):
    """JAX bf16 with the default attention (cuDNN on a GPU; XLA if that fails), then XLA
    attention beside it; keeps the faster for what follows. Returns the first output."""
    try:
        timing, out = run_jax(model, pixels, iters, gpu_options)
    except Exception as e:  # noqa: BLE001 - e.g. no cuDNN attention for this shape: use XLA's
        if model.attention_implementation == "xla":
            raise
        res["cudnn_attention_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        model.attention_implementation = res["attention_implementation"] = "xla"
        timing, out = run_jax(model, pixels, iters, gpu_options)
    record("jax_bf16", timing.time_us / 1e6, timing)
    if host:
        res["jax_bf16_host_costs"] = host_costs(model, pixels, gpu_options)
    res["vision_mlp"] = model.policy.vision_mlp
    if model.policy.vision_mlp != "xla":  # the MLP's fc1 + quick_gelu unfused, same run
        policy = model.policy
        model.policy = dataclasses.replace(policy, vision_mlp="xla")
        mlp_timing, out_mlp = run_jax(model, pixels, iters, gpu_options)
        record("jax_bf16_mlp_xla", mlp_timing.time_us / 1e6, mlp_timing)
        res["mlp_xla_vs_default_cosine"] = round(cosine(out_mlp, out), 6)
        model.policy = policy
    if model.attention_implementation != "xla":
        model.attention_implementation = "xla"
        xla_timing, out_xla = run_jax(model, pixels, iters, gpu_options)
        record("jax_bf16_xla_attention", xla_timing.time_us / 1e6, xla_timing)
        res["xla_vs_cudnn_attention_cosine"] = round(cosine(out_xla, out), 6)
        # Same timer in both runs (CUPTI on a GPU) or the host times, never one against the other.
        key = "time_us" if xla_timing.timer == timing.timer else "host_us"
        if getattr(xla_timing, key) > getattr(timing, key):
            model.attention_implementation = res["attention_implementation"]
    return out


def torch_run(model, pixels, iters: int, res: dict, record, out_bf16) -> None:
    try:
        got = torch_reference(model, pixels, iters)
    except ImportError:
        return
    except Exception as e:  # noqa: BLE001 - the JAX numbers stand without the twin
        res["torch_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return
    if got is not None:
        record("torch_bf16", got[0])
        res["torch_vs_jax_cosine"] = round(cosine(got[1], out_bf16), 6)


def main():
    args = parse_args()
    c = Step3VisionConfig.tiny() if args.tiny else Step3VisionConfig.step3()
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in sorted(BF16_PEAK.items(), key=lambda kv: -len(kv[0]))
                 if k in kind), None)  # fmt: skip
    fl = flops(c, args.size)
    total = sum(fl.values()) * args.images
    model = build(c)
    model.token_multiple = args.token_multiple
    gpu_options = jax.default_backend() == "gpu" and not args.triton_gemm
    options = compiler_options(gpu_options)
    pixels = jax.random.normal(jax.random.key(1), (args.images, 3, args.size, args.size))
    pixels = pixels.astype(jnp.bfloat16)
    res = header(c, args, model, fl, peak)
    res["compiler_options"] = options
    res["timer_note"] = harness.TIMER_NOTE

    def record(name, secs, timing=None):
        """``timing`` (JAX runs): ``secs`` is its device time; the host's beside it."""
        res[f"{name}_ms"] = round(secs * 1e3, 3)
        if timing is not None:
            res[f"{name}_timer"] = timing.timer
            res[f"{name}_host_ms"] = round(timing.host_us / 1e3, 3)
            res[f"{name}_host_loop_ms"] = round(timing.host_loop_us / 1e3, 3)
        res[f"{name}_tflops"] = float(f"{total / secs / 1e12:.4g}")
        if peak:
            res[f"{name}_pct_bf16_peak"] = round(100 * total / secs / peak, 1)
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name)}), flush=True)

    out_bf16 = bf16_runs(model, pixels, args.iters, res, record, gpu_options, args.host_costs)
    if args.trace:  # where the bf16 tower's time goes (GPU only; {} elsewhere)
        res["jax_bf16_trace"] = harness.trace_breakdown(*jitted(model, pixels, gpu_options), top=25)
    if not args.no_torch:
        torch_run(model, pixels, args.iters, res, record, out_bf16)
    if not args.no_fp8:
        model.policy = KernelPolicy(gemm=None if args.fp8_gemm == "auto" else args.fp8_gemm)
        res["fp8_linears"] = quantize_linears(model)
        res["fp8_gemm"] = args.fp8_gemm
        timing, out_fp8 = run_jax(model, pixels, args.iters, gpu_options)
        record("jax_fp8", timing.time_us / 1e6, timing)
        res["fp8_vs_bf16_cosine"] = round(cosine(out_fp8, out_bf16), 6)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
