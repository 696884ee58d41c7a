"""Cells of colab/04_afd.ipynb (built by _build_notebooks.py)."""

from _build_notebooks import INSTALL

CELLS = [
    (
        "md",
        """\
# 04 · Attention-FFN Disaggregation on 8 (fake) devices

Step-3 decodes with attention (and its KV cache) on one set of devices and the MoE FFN on
another; every layer, each attention device sends its tokens to the FFN devices and gets the
FFN output back, with micro-batches pipelined so both sides stay busy. This notebook builds a
**2A6F** layout (2 attention devices, 6 FFN devices as 2 expert-parallel x 3 tensor-parallel)
on 8 CPU devices that XLA fakes for us, shows who holds what, draws the pipeline schedule,
checks that the disaggregated decode produces exactly the tokens of single-device decode, and
ends with the cost model's throughput-vs-latency curve for real hardware.

The fake devices must be requested before jax is imported: if jax was already imported in this
runtime, restart it and run from the top.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"  # compare CPU with CPU (an accelerator would round differently)

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import step3_jax as s3
from step3_jax.sharding import AfdConfig, AfdExecutor, AfdLayout, ArenaDtypes, ArenaLayout, pipeline_schedule

devices = jax.devices()
assert len(devices) >= 8, f"need 8 devices, got {len(devices)}: restart the runtime, run from the top"
# Float32 matmuls at full precision, so the two decodes below can agree bit for bit.
jax.config.update("jax_default_matmul_precision", "highest")
print(len(devices), "devices:", devices[0].device_kind)""",
    ),
    (
        "md",
        """\
## 1. The layout and who holds what

`AfdLayout.parse("2A6F", ffn_ep=2)`: attention devices first, then the FFN devices as an
expert-parallel x tensor-parallel grid. Each attention device serves its own sequences
(data-parallel) and holds every layer's attention weights, the router, the embedding, the LM
head and its sequences' KV cache. Each FFN device holds a slice of the experts (EP) and a
slice of each expert's hidden width (TP), plus a slice of the shared expert and dense FFNs.""",
    ),
    (
        "code",
        """\
cfg = s3.Step3Config.tiny()
layout = AfdLayout.parse("2A6F", ffn_ep=2)
MICROBATCH, NUM_MB, MAX_LEN = 2, 3, 64  # sequences per micro-batch per attention device
batch = layout.num_attention * NUM_MB * MICROBATCH
e_local, f_local = cfg.num_experts // layout.ffn_ep, cfg.moe_intermediate_size // layout.ffn_tp

print(f"{layout.name}: {layout.num_attention} attention + {layout.num_ffn} FFN devices "
      f"(ep={layout.ffn_ep} x tp={layout.ffn_tp}); tiny config: {cfg.num_layers} layers, "
      f"{cfg.num_experts} experts of width {cfg.moe_intermediate_size}\\n")
for d in range(layout.num_devices):
    if d < layout.num_attention:
        first = d * NUM_MB * MICROBATCH
        what = (f"attention: sequences {first}..{first + NUM_MB * MICROBATCH - 1} "
                f"({NUM_MB} micro-batches of {MICROBATCH}) + their KV cache, all layers")
    else:
        ep, tp = layout.ffn_coords(d - layout.num_attention)
        what = (f"FFN (ep {ep}, tp {tp}): experts {ep * e_local}..{(ep + 1) * e_local - 1}, "
                f"hidden columns {tp * f_local}..{(tp + 1) * f_local - 1} of each")
    print(f"device {d}: {what}")""",
    ),
    (
        "md",
        """\
In one SPMD program every device gets a same-shaped piece of every argument, so giving each
role its own tensors would make every device hold BOTH roles' shares. Instead each device owns
one byte arena per dtype that its role lays out its tensors in (`ArenaLayout`): a device holds
`max(attention, FFN)` bytes. For the real Step-3 in FP8 as 2A6F with all six FFN devices
expert-parallel (3-way TP does not divide its 5,120-wide experts), 64 sequences per micro-batch
at 4K context:""",
    ),
    (
        "code",
        """\
fp8 = ArenaDtypes("float8_e4m3fn", "bfloat16", "bfloat16", "float8_e4m3fn")
big = ArenaLayout.build(s3.Step3Config.step3(), AfdLayout.parse("2A6F"), microbatch=64, num_microbatches=3,
                        max_len=4096, dtypes=fp8)
gib = 2.0**30
print(f"attention role uses {big.used_bytes('attention') / gib:6.1f} GiB per device")
print(f"FFN role uses       {big.used_bytes('ffn') / gib:6.1f} GiB per device")
print(f"arena per device    {big.bytes_per_device() / gib:6.1f} GiB "
      f"(one array per tensor would cost {big.naive_bytes_per_device() / gib:.1f} GiB)")""",
    ),
    (
        "md",
        """\
## 2. The pipeline schedule

`pipeline_schedule(layers, micro_batches)` is the static plan the compiled step scans over:
at each tick the attention side works on one (layer, micro-batch) item and the FFN side on an
earlier one whose tokens have arrived. With 3 micro-batches both sides are busy every tick
except the first and last.""",
    ),
    (
        "code",
        """\
sched = pipeline_schedule(cfg.num_layers, NUM_MB)  # [ticks, 6]: a_ok, a_layer, a_mb, f_ok, f_layer, f_mb
colors = plt.cm.tab10.colors
fig, ax = plt.subplots(figsize=(10, 2.2))
for tick, (a_ok, a_l, a_m, f_ok, f_l, f_m) in enumerate(sched):
    for lane, ok, layer, mb in ((1, a_ok, a_l, a_m), (0, f_ok, f_l, f_m)):
        if ok:
            ax.broken_barh([(tick, 0.95)], (lane - 0.4, 0.8), color=colors[mb])
            ax.text(tick + 0.47, lane, f"L{layer}", ha="center", va="center", fontsize=8, color="w")
ax.set_yticks([0, 1], ["FFN", "attention"]); ax.set_xlabel("tick")
ax.set_title(f"{cfg.num_layers} layers x {NUM_MB} micro-batches: {len(sched)} ticks (colour = micro-batch)")
plt.tight_layout(); plt.show()
busy = sched[:, [0, 3]].mean(0)
print(f"busy: attention {busy[0]:.0%}, FFN {busy[1]:.0%} of {len(sched)} ticks")""",
    ),
    (
        "md",
        """\
## 3. Same tokens as single-device decode

A tiny Step-3 model with random float32 weights, 12 prompts of 1-8 tokens. `s3.generate`
decodes greedily on one device; `AfdExecutor` compiles ONE program per step over the 8
devices (`step(tokens, positions, select) -> logits`), and a short greedy loop drives it.
The FP8 transfer of activations to the FFN side is switched off here so the two must agree
token for token (with it on, they agree with an oracle that applies the same rounding; see
`tests/sharding/test_afd_equality.py`).""",
    ),
    (
        "code",
        """\
REF = s3.KernelPolicy.reference()  # XLA attention and linears, the dense MoE oracle
model = s3.Step3Model(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, policy=REF)
rng = np.random.default_rng(0)
prompts = [list(map(int, rng.integers(0, cfg.vocab_size, n))) for n in rng.integers(1, 9, batch)]
NEW = 6
single = np.array(s3.generate(model, prompts, NEW, max_cache_len=MAX_LEN).tokens)

afd = AfdExecutor(
    cfg, layout, devices[: layout.num_devices],
    AfdConfig(MICROBATCH, NUM_MB, MAX_LEN, fp8_transfer=False, policy=REF,
              compiler_options=(("xla_backend_optimization_level", 0),)),  # faster CPU compile
    dtypes=ArenaDtypes("float32", "float32", "float32", "float32"), act_dtype=jnp.float32,
)
afd.load_model(model)


def greedy(step, prompts, new):
    \"\"\"Prefill all prompts (right-padded), then one step per new token.\"\"\"
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = max(8, 1 << int(lengths.max() - 1).bit_length())
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    out = [np.asarray(jnp.argmax(step(tokens, positions, lengths - 1), -1), np.int32)]
    for i in range(new - 1):
        logits = step(out[-1][:, None], (lengths + i)[:, None], np.zeros(len(prompts), np.int32))
        out.append(np.asarray(jnp.argmax(logits, -1), np.int32))
    return np.stack(out, 1)


disagg = greedy(afd.step, prompts, NEW)
print("single device:", single[:3].tolist(), "...")
print("2A6F AFD     :", disagg[:3].tolist(), "...")
assert (disagg == single).all(), "AFD decode differs from single-device decode"
print(f"all {batch} sequences x {NEW} tokens identical")""",
    ),
    (
        "md",
        """\
## 4. Throughput against latency on real hardware

The cost model's simulator plays the same pipeline with roofline stage times for the real
Step-3 (FP8, 4K context, 3 micro-batches, 8-GPU instances), one efficiency factor calibrated
on the paper's 2A2F run. For each time-per-output-token budget it picks the largest batch that
fits and reports tokens/s per GPU. Where a curve turns flat, the batch is capped by memory
(weights plus KV cache per GPU), not by the budget.""",
    ),
    (
        "code",
        """\
from step3_jax import cost
from step3_jax.cost import simulator as sim

eta = sim.calibrate_uniform_efficiency(sim.PAPER_AFD_RUNS[0], cost.H800)
spec = cost.from_step3_config(s3.Step3Config.step3(), kv_bytes=1)
tpots = np.arange(20, 101, 5)
fig, ax = plt.subplots(figsize=(7, 4))
for lay_name, hw in (("2A2F", cost.H800), ("2A2F", cost.H200), ("3A2F", cost.H200), ("2A2F", cost.B200)):
    setup = sim.AFDSetup(spec, sim.AFDLayout.parse(lay_name), 4096, 3, hw,
                         efficiency=sim.Efficiency.uniform(eta))
    tput = []
    for t in tpots:
        try:
            tput.append(sim.predict(setup, t * 1e-3).tokens_per_s_per_gpu)
        except ValueError:  # no batch meets this budget
            tput.append(np.nan)
    ax.plot(tpots, tput, "o-", ms=3, label=f"{lay_name} on {hw.name}")
ax.axvline(50, color="k", ls=":", lw=1)
ax.scatter([50], [4039], marker="*", s=120, color="k", zorder=3, label="paper: 2A2F H800, 4,039")
ax.set_xlabel("TPOT budget (ms)"); ax.set_ylabel("tokens / s / GPU"); ax.set_ylim(bottom=0)
ax.set_title(f"Step-3 FP8, 4K context (efficiency {eta:.2f} calibrated on the paper's 2A2F)")
ax.legend(fontsize=8); plt.tight_layout(); plt.show()""",
    ),
]
