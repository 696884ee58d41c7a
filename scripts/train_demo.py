"""Trains the shipped demo model: a small Step-3-architecture LM on Jane Austen's novels.

Reproducible end to end (fixed seed, deterministic data order, CPU XLA):

    .venv/bin/python scripts/train_demo.py                 # ~30 min on 2 busy CPU cores
    .venv/bin/python scripts/train_demo.py --export-only   # re-export from the saved state

Steps: read data/austen/*.txt (see data/PROVENANCE.md), unwrap paragraphs, hold out the last
``--holdout`` fraction of every novel, train a byte-level BPE on the training text, train the
model with AdamW (linear warmup + cosine decay, gradient clipping) on random windows, then write
into ``--out`` (default checkpoints/demo/): the HF-format checkpoint (``save_hf``, bf16),
tokenizer.json, train_metrics.json (loss curve, held-out loss of the SHIPPED bf16 weights,
samples) and the loss plot docs/figures/demo_loss.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step3_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer, train_bpe  # noqa: E402
from step3_jax.cli_common import (  # noqa: E402
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from step3_jax.config import Step3Config  # noqa: E402
from step3_jax.model import Step3Model  # noqa: E402
from step3_jax.policy import KernelPolicy  # noqa: E402

STATE_FILE = "train_state_f32.npz"  # full-precision params, kept out of git (re-export source)


def demo_config(vocab_size: int) -> Step3Config:
    """Step3Config.tiny()'s structure (low-rank q + inter_norm, one K/V head, dense first and
    last layers, MoE with a shared expert in between) at a size that trains in ~25 CPU minutes
    and ships in a few MB."""
    return Step3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_layers=6,
        num_heads=4,
        head_dim=32,
        share_q_dim=64,
        intermediate_size=384,
        moe_layer_ids=(1, 2, 3, 4),
        num_experts=8,
        top_k=2,
        moe_intermediate_size=64,
        share_expert_dim=64,
        rope_theta=10000.0,  # short contexts: the standard base resolves them better than 5e5
        max_position_embeddings=1024,
    )


# ----------------------------------------------------------------------------- data
def paragraphs(raw: str) -> list[str]:
    """Unwraps the hard-wrapped Gutenberg lines: one string per blank-line-separated block."""
    blocks = re.split(r"\n\s*\n", raw)
    out = [re.sub(r"\s+", " ", b).strip() for b in blocks]
    return [p for p in out if p]


def read_corpus(data_dir: Path, holdout: float) -> tuple[list[str], list[str]]:
    """(train_texts, heldout_texts), one text per novel; the held-out part of each novel is
    its last ``holdout`` fraction of paragraphs (so no held-out sentence is seen in training)."""
    train, held = [], []
    for path in sorted(data_dir.glob("*.txt")):
        paras = paragraphs(path.read_text(encoding="utf-8"))
        cut = int(round(len(paras) * (1.0 - holdout)))
        train.append("\n\n".join(paras[:cut]))
        held.append("\n\n".join(paras[cut:]))
    if not train:
        raise FileNotFoundError(f"no *.txt corpus files in {data_dir}")
    return train, held


def encode_all(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """One int32 token stream: each text followed by eos."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t))
        ids.append(tok.eos_id)
    return np.asarray(ids, np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Non-overlapping [n, seq_len + 1] windows covering the start of ``stream``."""
    n = min(max_windows, (len(stream) - 1) // seq_len)
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


# ----------------------------------------------------------------------------- model
def loss_fn(model: Step3Model, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``batch [B, T+1]``."""
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_steps(graphdef, tx):
    @jax.jit
    def train_step(params, rest, opt_state, batch):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    @jax.jit
    def eval_step(params, rest, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)

    return train_step, eval_step


def heldout_loss(eval_step, params, rest, windows: np.ndarray, batch: int) -> float:
    losses = [
        float(eval_step(params, rest, jnp.asarray(windows[i : i + batch])))
        for i in range(0, len(windows) - batch + 1, batch)
    ]
    return float(np.mean(losses))


def schedule(args) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=args.warmup,
        decay_steps=args.steps,
        end_value=args.lr * 0.1,
    )


def train(args, cfg: Step3Config, train_ids: np.ndarray, windows: np.ndarray, out: Path):
    model = Step3Model(
        cfg,
        rngs=nnx.Rngs(args.seed),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        policy=KernelPolicy.reference(),  # the autodiff-able oracle; fast grouped path not needed
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule(args), b1=0.9, b2=0.95, weight_decay=args.weight_decay),
    )
    opt_state = tx.init(params)
    train_step, eval_step = make_steps(graphdef, tx)
    rng = np.random.default_rng(args.seed)
    history = {"step": [], "train_loss": [], "eval_step": [], "heldout_loss": [], "lr": []}
    t0, run = time.time(), []
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(train_ids) - args.seq_len - 1, size=args.batch)
        batch = np.stack([train_ids[s : s + args.seq_len + 1] for s in starts])
        params, opt_state, loss, gnorm = train_step(params, rest, opt_state, jnp.asarray(batch))
        run.append(float(loss))
        if step % args.log_every == 0 or step == args.steps:
            history["step"].append(step)
            history["train_loss"].append(float(np.mean(run)))
            history["lr"].append(float(schedule(args)(step)))
            print(
                json.dumps(
                    {
                        "step": step,
                        "train_loss": round(float(np.mean(run)), 4),
                        "grad_norm": round(float(gnorm), 3),
                        "elapsed_s": round(time.time() - t0, 1),
                    }
                ),
                flush=True,
            )
            run = []
        if step % args.eval_every == 0 or step == args.steps:
            hl = heldout_loss(eval_step, params, rest, windows, args.batch)
            history["eval_step"].append(step)
            history["heldout_loss"].append(hl)
            print(json.dumps({"step": step, "heldout_loss": round(hl, 4)}), flush=True)
            # Snapshot so an interrupted run can still be exported (--export-only).
            save_state(nnx.merge(graphdef, params, rest), out / STATE_FILE)
            (out / "history.json").write_text(json.dumps(history))
    history["train_seconds"] = time.time() - t0
    return nnx.merge(graphdef, params, rest), history


# ----------------------------------------------------------------------------- export
def save_state(model: Step3Model, path: Path) -> None:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    np.savez(path, **{".".join(map(str, k)): np.asarray(v[...]) for k, v in flat})


def load_state(model: Step3Model, path: Path) -> None:
    data = np.load(path)
    state = nnx.state(model, nnx.Param)
    for key, var in nnx.to_flat_state(state):
        var[...] = jnp.asarray(data[".".join(map(str, key))])
    nnx.update(model, state)


def plot(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["train_loss"], label="train (mean over log interval)")
    ax.plot(history["eval_step"], history["heldout_loss"], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def export(args, cfg, tok: Tokenizer, history: dict, windows: np.ndarray) -> None:
    """Writes the shipped bf16 HF checkpoint and measures what it ships (held-out loss,
    samples) by loading it back through the public loader."""
    import importlib

    from step3_jax import checkpoints

    importlib.reload(checkpoints)  # the package may have grown since this process imported it
    from step3_jax.checkpoints import load_hf, save_hf
    from step3_jax.checkpoints.demo import sample_texts

    out = Path(args.out)
    model = Step3Model(
        cfg,
        rngs=nnx.Rngs(0),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        policy=KernelPolicy.reference(),
    )
    load_state(model, out / STATE_FILE)
    save_hf(model, out, dtype=jnp.bfloat16)
    tok.save(out / "tokenizer.json")
    shipped = load_hf(
        out, dtype=jnp.float32, param_dtype=jnp.float32, policy=KernelPolicy.reference()
    )
    graphdef, params, rest = nnx.split(shipped, nnx.Param, ...)
    _, eval_step = make_steps(graphdef, optax.identity())
    hl = heldout_loss(eval_step, params, rest, windows, args.batch)
    samples = sample_texts(shipped, tok, seed=args.seed)
    metrics = {
        "config": dataclasses.asdict(cfg),
        "params": cfg.param_count(),
        "args": {k: v for k, v in vars(args).items() if k != "export_only"},
        "heldout_loss_bf16_checkpoint": hl,
        "heldout_perplexity_bf16_checkpoint": math.exp(hl),
        "heldout_tokens": int(windows.shape[0] * args.seq_len),
        "history": history,
        "samples": samples,
        "jax_version": jax.__version__,
        "device": jax.devices()[0].device_kind,
    }
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot(
        history,
        ROOT / "docs/figures/demo_loss.png",
        f"step3_jax demo model ({cfg.param_count() / 1e6:.1f}M params), held-out {hl:.3f}",
    )
    print(json.dumps({"heldout_loss_bf16_checkpoint": round(hl, 4), "samples": samples}))


def holdout_fraction(text: str) -> float:
    """In (0, 1): 0 leaves no held-out text, and the evaluation then had no window."""
    value = positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data/austen"))
    p.add_argument("--out", default=str(ROOT / "checkpoints/demo"))
    p.add_argument("--vocab-size", type=positive_int, default=2048)
    p.add_argument("--holdout", type=holdout_fraction, default=0.05)
    p.add_argument("--steps", type=positive_int, default=1400)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--warmup", type=non_negative_int, default=100)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=25)
    p.add_argument("--eval-every", type=positive_int, default=200)
    p.add_argument("--eval-windows", type=positive_int, default=96)
    p.add_argument("--export-only", action="store_true", help="re-export from the saved state")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:  # the cosine decay after the warm-up needs steps of its own
        p.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = read_corpus(Path(args.data), args.holdout)
    if args.export_only:
        tok = load_tokenizer(out / "tokenizer.json")
        history = json.loads((out / "history.json").read_text())
    else:
        tok = train_bpe(train_texts, args.vocab_size)
        tok.save(out / "tokenizer.json")
    cfg = demo_config(tok.vocab_size)
    train_ids, held_ids = encode_all(tok, train_texts), encode_all(tok, held_texts)
    windows = eval_windows(held_ids, args.seq_len, args.eval_windows)
    print(
        json.dumps(
            {
                "train_tokens": len(train_ids),
                "heldout_tokens": len(held_ids),
                "params": cfg.param_count(),
                "eval_windows": len(windows),
            }
        ),
        flush=True,
    )
    if not args.export_only:
        model, history = train(args, cfg, train_ids, windows, out)
        save_state(model, out / STATE_FILE)
        (out / "history.json").write_text(json.dumps(history))
    export(args, cfg, tok, history, windows)


if __name__ == "__main__":
    main()
