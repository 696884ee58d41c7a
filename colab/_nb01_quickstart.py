"""Cells of colab/01_quickstart.ipynb (built by _build_notebooks.py)."""

from _build_notebooks import INSTALL

CELLS = [
    (
        "md",
        """\
# 01 · step3_jax quick start

Step-3's text decoder in JAX / Flax NNX. This notebook loads the small demo model shipped with
the package (Step-3's architecture at 2M parameters, trained on Jane Austen), generates text,
compares FP8 with bf16 side by side, checks the decode loop against a teacher-forced forward,
and reuses the `MFAttention` layer inside a model of your own. Runs on CPU in about a minute;
on a GPU runtime the same cells use the GPU.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import step3_jax as s3
from step3_jax import checkpoints

print("jax", jax.__version__, "| devices:", jax.devices()[:2], "| step3_jax", s3.__version__)""",
    ),
    (
        "md",
        """\
## 1. Generate with the demo model

`checkpoints.load_demo()` returns `(model, tokenizer)`. `s3.generate` prefills a batch of
prompts of different lengths in one call, then runs every decode step inside one jitted
`lax.while_loop`. The first call compiles; a second call with the same shapes reuses it, so
its time is the decode speed.""",
    ),
    (
        "code",
        """\
model, tok = checkpoints.load_demo(dtype=jnp.bfloat16)
prompts = ["It is a truth universally acknowledged, that", "The next morning"]
ids = [tok.encode(p) for p in prompts]
sampling = dict(temperature=0.8, top_p=0.9, seed=0, stop_tokens=[tok.eos_id] if tok.eos_id is not None else [])

first = s3.generate(model, ids, 40, **sampling)
for p, new in zip(prompts, first.tokens):
    print(f">>> {p}{tok.decode(new)}\\n")

warm = s3.generate(model, ids, 40, **sampling)
compile_s = getattr(first, "compile_seconds", None)  # reported by newer step3_jax versions
if compile_s is None:
    compile_s = (first.prefill_seconds + first.decode_seconds) - (warm.prefill_seconds + warm.decode_seconds)
print(f"compile ~{compile_s:.1f} s (first call only); decode {warm.decode_tokens_per_second:,.0f} tokens/s "
      f"(batch {len(ids)}, {warm.decode_steps} steps), prefill {warm.prefill_seconds * 1e3:.1f} ms")""",
    ),
    (
        "md",
        """\
## 2. FP8 next to bf16

`quantize_model(model, "fp8")` replaces every linear weight except the router with FP8
(e4m3) values and 128x128 block scales; activations are quantized per token per 128 columns
inside each projection. `cache_dtype=jnp.float8_e4m3fn` stores the KV cache in FP8 too. Below:
the same greedy prompts through the three precisions, then how often the FP8 model's next-token
choice agrees with bf16's on the bf16 model's own continuation.""",
    ),
    (
        "code",
        """\
from step3_jax.quant_model import quantize_model, weight_bytes

fp8_model, _ = checkpoints.load_demo(dtype=jnp.bfloat16)
quantize_model(fp8_model, "fp8")
print(f"weights: bf16 {weight_bytes(model) / 1e6:.2f} MB, fp8 {weight_bytes(fp8_model) / 1e6:.2f} MB")

runs = {
    "bf16": s3.generate(model, ids, 40),  # greedy; same shapes as above: no recompile
    "fp8": s3.generate(fp8_model, ids, 40),
    "fp8 + FP8 KV cache": s3.generate(fp8_model, ids, 40, cache_dtype=jnp.float8_e4m3fn),
}
for i, p in enumerate(prompts):
    print(f">>> {p}")
    for name, res in runs.items():
        print(f"  {name:>19}: ...{tok.decode(res.tokens[i])}")""",
    ),
    (
        "code",
        """\
forward = nnx.jit(lambda m, tokens: m(tokens))
seq = jnp.array([ids[0] + runs["bf16"].tokens[0]], jnp.int32)
ref_logits, fp8_logits = forward(model, seq)[0], forward(fp8_model, seq)[0]  # [T, V] float32
agree = float(jnp.mean(ref_logits.argmax(-1) == fp8_logits.argmax(-1)))
p_ref = jax.nn.log_softmax(ref_logits)
kl = float(jnp.mean(jnp.sum(jnp.exp(p_ref) * (p_ref - jax.nn.log_softmax(fp8_logits)), -1)))
print(f"fp8 vs bf16 over {seq.shape[1]} positions: top-1 agreement {agree:.1%}, mean KL {kl:.1e} nats")""",
    ),
    (
        "md",
        """\
## 3. Chat

The demo tokenizer carries a chat template in the release's format, so the same call works on
the real Step-3 checkpoint: `chat_generate` renders it (jinja2's sandbox), stops on every eos
id plus the end-of-turn token, and streams text to `on_text` as it is produced. The demo model
was trained on novels, not on conversations: expect prose, not answers.""",
    ),
    (
        "code",
        """\
reply = s3.chat_generate(
    model, tok, [{"role": "user", "content": "Who is Mr. Knightley?"}],
    max_new_tokens=40, temperature=0.0,
)
print(repr(reply.text))
print(f"{reply.finish_reason}, first text after {reply.first_token_seconds:.2f} s")""",
    ),
    (
        "md",
        """\
## 4. The decode loop is exact

`Step3Config.tiny()` keeps Step-3's structure (MFA attention with ONE shared K/V head, dense
first and last layers, MoE layers with a shared expert, top-k routing without renormalization)
at toy size; `Step3Config.step3()` is the real 316B configuration. Greedy decoding through the
KV cache must equal the argmax of one teacher-forced forward over prompt + generated tokens.""",
    ),
    (
        "code",
        """\
cfg, big = s3.Step3Config.tiny(), s3.Step3Config.step3()
print(f"tiny : {cfg.param_count():,} parameters, MoE layers {cfg.moe_layer_ids}")
print(f"step3: {big.param_count() / 1e9:.2f}B total, {big.activated_param_count() / 1e9:.2f}B "
      f"active per token, {big.kv_bytes_per_token(1, per_layer=True):.0f} B of FP8 KV per token per layer")

# Random (seeded) float32 weights. KernelPolicy picks the kernels in one place; reference():
# XLA attention and linears, and the dense MoE oracle (every expert on every token).
tiny = s3.Step3Model(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
                     policy=s3.KernelPolicy.reference())
tiny_prompts = [[11, 42, 7], [5, 6, 7, 8, 9]]
out = s3.generate(tiny, tiny_prompts, max_new_tokens=12)  # temperature 0: greedy
seq = tiny_prompts[1] + out.tokens[1]
logits = forward(tiny, jnp.array([seq], jnp.int32))  # [1, T, V] float32
teacher = logits[0, len(tiny_prompts[1]) - 1 : -1].argmax(-1)
assert teacher.tolist() == out.tokens[1]
print("greedy decode == teacher-forced argmax:", out.tokens[1])""",
    ),
    (
        "md",
        """\
## 5. `MFAttention` inside your own Flax model

The layers take explicit arguments (no `Step3Config`), so they drop into any NNX model. A
one-block language model with MFA attention learns to continue a repeating pattern.""",
    ),
    (
        "code",
        """\
import optax

from step3_jax.layers import MFAttention, RMSNorm


class TinyLM(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.norm = RMSNorm(dim)
        # 4 query heads from a 32-wide shared low-rank query, ONE K/V head of width 16.
        self.attn = MFAttention(dim, share_q_dim=32, num_heads=4, head_dim=16, rngs=rngs, **f32)
        self.out = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.norm(x))  # causal, RoPE positions 0..T-1
        return self.out(x)


lm = TinyLM(vocab=16, dim=32, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(lm, optax.adam(1e-2), wrt=nnx.Param)
data = jnp.tile(jnp.arange(8, dtype=jnp.int32), (4, 3))  # [4, 24]: 0..7 repeated


@nnx.jit
def train_step(lm, optimizer, batch):
    def loss_fn(lm):
        logits = lm(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(lm)
    optimizer.update(lm, grads)
    return loss


losses = [float(train_step(lm, optimizer, data)) for _ in range(40)]
print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < 0.5 * losses[0]""",
    ),
]
