"""Builds the colab/ notebooks from source cells kept here (reviewable diffs, no outputs).

    .venv/bin/python colab/_build_notebooks.py            # writes colab/01_quickstart.ipynb

Each notebook is a list of ("md" | "code", source) cells. Notebooks are written without
outputs; CI executes them (tests/test_notebooks.py). Other notebooks in colab/ may be built by
their own scripts; add yours to NOTEBOOKS to build it here.
"""

from __future__ import annotations

import pathlib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

# The install cell: a no-op wherever step3_jax already imports (CI, the GPU machines, a clone),
# so running the notebook never touches the network there.
INSTALL = """\
# Install step3_jax if it is not importable yet (e.g. on a fresh Colab runtime).
# REPO_URL is a placeholder: set it to the git URL of your copy of this repository.
REPO_URL = "https://github.com/YOUR-ORG/step3_jax.git"

import importlib.util

if importlib.util.find_spec("step3_jax") is None:
    get_ipython().run_line_magic("pip", f"install -q 'step3-jax[cpu] @ git+{REPO_URL}'")
"""

QUICKSTART = [
    (
        "md",
        """\
# step3_jax quick start

Step-3's text decoder in JAX / Flax NNX, at toy size: build the tiny model, generate tokens
with the on-device decode loop, drive the KV cache one step at a time, and reuse the
`MFAttention` layer inside your own Flax model. Runs on CPU in well under a minute.""",
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

print("jax", jax.__version__, "| devices:", jax.devices()[:2], "| step3_jax", s3.__version__)""",
    ),
    (
        "md",
        """\
## 1. The tiny model

`Step3Config.tiny()` keeps Step-3's structure (MFA attention with ONE shared K/V head, dense
first/last layers, MoE layers with a shared expert, top-k routing without renormalization) at a
size that runs anywhere. `Step3Config.step3()` is the real 316B configuration.""",
    ),
    (
        "code",
        """\
cfg = s3.Step3Config.tiny()
big = s3.Step3Config.step3()
kv_fp8 = big.kv_bytes_per_token(bytes_per_value=1, per_layer=True)
print(f"tiny : {cfg.param_count():,} parameters, MoE layers {cfg.moe_layer_ids}")
print(f"step3: {big.param_count() / 1e9:.2f}B total, "
      f"{big.activated_param_count() / 1e9:.2f}B activated per token, "
      f"{kv_fp8:.0f} B of FP8 KV per token per layer")

# Random weights (seeded), bf16. "dense" runs every expert on every token: the readable MoE
# oracle; the default "grouped" sorts tokens by expert (Pallas grouped GEMM on Hopper GPUs).
model = s3.Step3Model(cfg, rngs=nnx.Rngs(0), policy=s3.KernelPolicy.reference())""",
    ),
    (
        "md",
        """\
## 2. Generate

`generate` takes prompts of different lengths, prefills them in one call and runs every decode
step inside one jitted `lax.while_loop`. Shapes are bucketed, so a second call with another
`max_new_tokens` reuses the compiled loop. Sampling: `temperature=`, `top_k=`, `top_p=`, `seed=`;
`stop_tokens=` ends a sequence early; `cache_dtype=jnp.float8_e4m3fn` stores the KV cache in
FP8. For step-by-step research loops, `s3.make_decode_step(model)` returns one jitted step
over a `s3.KVCache`.""",
    ),
    (
        "code",
        """\
prompts = [[11, 42, 7], [5, 6, 7, 8, 9]]
out = s3.generate(model, prompts, max_new_tokens=12)
print("tokens :", out.tokens)
print("finish :", out.finish_reasons)""",
    ),
    (
        "md",
        """\
Greedy decoding must equal the argmax of one teacher-forced forward over prompt + generated
tokens (the model without a cache returns logits `[B, T, V]` for every position):""",
    ),
    (
        "code",
        """\
forward = nnx.jit(lambda m, tokens: m(tokens))
seq = prompts[1] + out.tokens[1]
logits = forward(model, jnp.array([seq], jnp.int32))  # [1, T, V] float32
teacher = logits[0, len(prompts[1]) - 1 : -1].argmax(-1)
assert teacher.tolist() == out.tokens[1]
print("logits", logits.shape, logits.dtype, "| greedy == teacher-forced argmax")""",
    ),
    (
        "md",
        """\
## 3. `MFAttention` inside your own Flax model

The layers take explicit arguments (no `Step3Config`), so they drop into any NNX model. Here a
one-block language model with MFA attention, trained for a few steps to copy a pattern.""",
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

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives an identical file
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
