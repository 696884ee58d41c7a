"""The shipped demo model: loads offline, its tokenizer inverts, it reproduces its metrics."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from step3_jax.checkpoints import load_demo, load_tokenizer
from step3_jax.checkpoints.demo import DEMO_DIR
from step3_jax.decode import generate


def test_demo_loads_and_beats_its_unigram_floor():
    model, tok = load_demo()
    # 2048 trained BPE ids + 12 chat tokens of the release's format (ids 2048..2059, whose
    # rows copy <|endoftext|>'s: scripts/add_demo_chat_tokens.py).
    assert tok.vocab_size == model.config.vocab_size == 2060
    text = 'Mr. Darcy said, "It is a truth universally acknowledged."'
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(
        "It is a truth universally acknowledged, that a single man in possession "
        "of a good fortune, must be in want of a wife."
    )
    logits = np.asarray(model(jnp.asarray([ids], jnp.int32)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    nll = -np.mean([logp[0, t, ids[t + 1]] for t in range(len(ids) - 1)])
    # A uniform guess costs log(2048) = 7.62 nats; the trained model must do far better.
    assert nll < 5.0, nll


def test_demo_greedy_generation_is_text_and_metrics_are_recorded():
    model, tok = load_demo()
    res = generate(model, [tok.encode("The next morning")], 24)
    out = tok.decode(res.tokens[0])
    words = out.split()
    assert len(words) >= 8 and sum(w.strip('.,;"!?').isalpha() for w in words) >= 0.7 * len(words)
    metrics = json.loads((DEMO_DIR / "train_metrics.json").read_text())
    assert 3.0 < metrics["heldout_loss_bf16_checkpoint"] < 4.5


def test_user_tokenizer_json_with_config_eos(tmp_path):
    tok = load_tokenizer(DEMO_DIR / "tokenizer.json")
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    user = load_tokenizer(tmp_path)
    assert user.eos_id == 0  # the user's config wins over the demo's (<｜end▁of▁sentence｜>)
    assert tok.eos_id == tok.hf.token_to_id("<｜end▁of▁sentence｜>") == 2049
    assert user.encode("Emma Woodhouse") == tok.encode("Emma Woodhouse")
