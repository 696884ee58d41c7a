"""The shipped demo model: a ~2M-parameter Step-3-architecture LM trained on Jane Austen.

``load_demo()`` needs no download: the checkpoint (HF safetensors, bf16), its config and
tokenizer live in ``checkpoints/demo/`` (trained by ``scripts/train_demo.py``; see
``docs/demo_model.md`` and ``checkpoints/demo/MODEL_CARD.md``).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from step3_jax.checkpoints.hf_load import load_hf
from step3_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer
from step3_jax.decode import generate
from step3_jax.model import Step3Model
from step3_jax.policy import KernelPolicy

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_PROMPTS = (
    "It is a truth universally acknowledged, that",
    '"My dear Emma," said Mr. Knightley,',
    "The next morning",
)


def load_demo(
    dtype=jnp.float32, policy: KernelPolicy | None = None
) -> tuple[Step3Model, Tokenizer]:
    """``(model, tokenizer)`` of the shipped demo checkpoint.

    Defaults suit a CPU: float32 compute, and (``policy=None``) the dense MoE oracle with the
    device's best attention and GEMMs (the model has 8 experts, so running them all costs
    little and needs no grouped kernels).
    """
    policy = policy or KernelPolicy(moe="dense")
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {DEMO_DIR}; rebuild it with "
            "`python scripts/train_demo.py`"
        )
    model = load_hf(DEMO_DIR, dtype=dtype, param_dtype=dtype, policy=policy)
    return model, load_tokenizer(DEMO_DIR / "tokenizer.json")


def sample_texts(
    model: Step3Model,
    tokenizer: Tokenizer,
    prompts=DEMO_PROMPTS,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int = 0,
) -> list[str]:
    """Prompt + continuation for each prompt (nucleus sampling, fixed seed)."""
    ids = [tokenizer.encode(p) for p in prompts]
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    res = generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_tokens=stops,
        seed=seed,
    )
    return [p + tokenizer.decode(t) for p, t in zip(prompts, res.tokens, strict=False)]


__all__ = ["DEMO_DIR", "DEMO_PROMPTS", "load_demo", "sample_texts"]
