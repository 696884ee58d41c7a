"""FP8 fidelity: each precision mode against the unquantized model on the same weights.

Per mode (``fp8``, ``fp8+kv8``) against the reference (the model before `quantize_model`):

* teacher-forced top-1 agreement: fraction of positions where both argmax tokens agree;
* mean and max KL(p_ref || p_mode) of the next-token distributions, in nats;
* perplexity of the token stream under each model and its relative change;
* greedy-decode agreement length: tokens generated greedily (one at a time, through the KV
  cache of the mode) before the first disagreement, per prompt, capped at ``--gen``.

All forwards go through the KV cache (prefill) so ``fp8+kv8`` really reads an FP8 cache.

Models: ``demo`` (``step3_jax.checkpoints.load_demo()``, scored on its own corpus text when the tokenizer
is there) and ``random-step3`` (random weights with Step-3's attention and FFN widths: D 7168,
R 2048, 64 heads x 256, dense F 18432 and 5120-wide experts; a dense and an MoE layer, few
experts and a small vocab so it runs on a CPU). ``tiny`` is the CI-sized config.

    python benchmarks/bench_fp8_fidelity.py --model demo,random-step3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from step3_jax.quant_model import Precision, quantize_model  # noqa: E402


def random_step3_config() -> Step3Config:
    """Step-3 layer widths, 2 layers (dense + MoE), 4 experts, vocab 4096: CPU-sized."""
    return dataclasses.replace(
        Step3Config.step3(),
        vocab_size=4096,
        num_layers=2,
        moe_layer_ids=(1,),
        num_experts=4,
        top_k=3,
        max_position_embeddings=4096,
    )


def load_model(name: str, dtype):
    """``(model, token batch [B, T] int32, description)``."""
    if name == "demo":
        from step3_jax import checkpoints

        model, tok = checkpoints.load_demo()
        tokens = _demo_tokens(model, tok)
        return model, tokens, "demo checkpoint"
    cfg = Step3Config.tiny() if name == "tiny" else random_step3_config()
    model = Step3Model(
        cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, moe_implementation="dense"
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (4, 64 if name == "tiny" else 32), dtype=np.int32)
    return model, tokens, f"random weights, {name}"


def _demo_tokens(model, tok, batch: int = 8, length: int = 128) -> np.ndarray:
    """``batch`` windows of ``length`` tokens from the END of persuasion.txt in data/austen/
    (the last part of a book, the least likely to be in a train split), else random tokens."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "data", "austen", "persuasion.txt")
    if tok is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()[-200_000:]
        ids = tok.encode(text)
        ids = np.asarray(getattr(ids, "ids", ids), np.int32)
        n = min(batch, len(ids) // length)
        if n > 0:
            return ids[-n * length :].reshape(n, length)
    rng = np.random.default_rng(0)
    return rng.integers(0, model.config.vocab_size, (batch, length), dtype=np.int32)


def cached_logits(model, tokens, cache_dtype) -> np.ndarray:
    """Teacher-forced float32 logits [B, T, V] through a prefill into a cache."""
    b, t = tokens.shape
    cache = KVCache.for_config(model.config, b, t, cache_dtype)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache=cache)[0]

    return np.asarray(fwd(state, jnp.asarray(tokens), cache), np.float64)


def greedy(model, prompts: np.ndarray, steps: int, cache_dtype) -> np.ndarray:
    """Greedy continuation [B, steps] through the cache, one token per jitted step."""
    b, t = prompts.shape
    cache = KVCache.for_config(model.config, b, t + steps, cache_dtype)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    @jax.jit
    def step(state, tok, cache):
        logits, cache = nnx.merge(graphdef, state)(tok[:, None], cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    tok, cache = prefill(state, jnp.asarray(prompts), cache)
    out = [tok]
    for _ in range(steps - 1):
        tok, cache = step(state, tok, cache)
        out.append(tok)
    return np.stack([np.asarray(o) for o in out], 1)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref_logits, logits, tokens) -> dict:
    lp_ref, lp = _log_softmax(ref_logits), _log_softmax(logits)
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp), -1)  # [B, T]
    nxt = tokens[:, 1:]
    nll_ref = -np.take_along_axis(lp_ref[:, :-1], nxt[..., None], -1).mean()
    nll = -np.take_along_axis(lp[:, :-1], nxt[..., None], -1).mean()
    return {
        "top1_agreement": float(np.mean(ref_logits.argmax(-1) == logits.argmax(-1))),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "ppl_ref": float(np.exp(nll_ref)),
        "ppl": float(np.exp(nll)),
        "ppl_rel_change": float(np.exp(nll - nll_ref) - 1),
    }


def agreement_lengths(a: np.ndarray, b: np.ndarray) -> list[int]:
    same = a == b
    return [int(np.argmin(r)) if not r.all() else len(r) for r in same]


def evaluate(name: str, modes, gen: int, dtype, granularity: str = "block") -> dict:
    model, tokens, desc = load_model(name, dtype)
    t0 = time.perf_counter()
    ref_dtype = model.dtype
    ref = cached_logits(model, tokens, ref_dtype)
    prompts = tokens[:, : max(4, tokens.shape[1] // 4)]
    ref_gen = greedy(model, prompts, gen, ref_dtype)
    # fp8 and fp8+kv8 share the weights; only the cache differs
    quantize_model(model, "fp8", granularity=granularity)
    res = {"model": name, "description": desc, "tokens_shape": list(tokens.shape)}
    res["granularity"] = granularity
    res["reference_dtype"] = jnp.dtype(ref_dtype).name
    for mode in modes:
        cache_dtype = Precision(mode).cache_dtype or ref_dtype
        r = compare(ref, cached_logits(model, tokens, cache_dtype), tokens)
        lens = agreement_lengths(ref_gen, greedy(model, prompts, gen, cache_dtype))
        r.update(greedy_agreement=lens, greedy_agreement_mean=float(np.mean(lens)), gen=gen)
        res[mode] = r
        print(json.dumps({"model": name, "mode": mode, **r}), flush=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo,random-step3", help="demo, random-step3, tiny")
    p.add_argument("--modes", default="fp8,fp8+kv8")
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--granularity", default="block", help="weight scales: block or channel")
    p.add_argument("--dtype", default="float32", help="reference/compute dtype of random models")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny model, 4 tokens")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.gen = "tiny", 4
    result = {"results": []}
    for name in a.model.split(","):
        try:
            result["results"].append(
                evaluate(name, a.modes.split(","), a.gen, jnp.dtype(a.dtype), a.granularity)
            )
        except (ImportError, AttributeError, FileNotFoundError) as e:  # no demo checkpoint yet
            result["results"].append({"model": name, "skipped": repr(e)[:200]})
            print(f"skipped {name}: {e!r}", flush=True)
    # No timing here: provenance only (no copy probe); one row per model.
    doc = harness.results("fp8_fidelity", result["results"], copy=False)
    if a.out:
        harness.write_results(a.out, result["results"], bench="fp8_fidelity", copy=False)
    summary = [
        {
            "model": r["model"],
            **{
                m: {
                    k: r[m][k]
                    for k in (
                        "top1_agreement",
                        "kl_mean",
                        "kl_max",
                        "ppl_rel_change",
                        "greedy_agreement_mean",
                    )
                }
                for m in a.modes.split(",")
                if m in r
            },
        }
        for r in result["results"]
        if "skipped" not in r
    ]
    harness.print_json({"device": doc["device"], "commit": doc["commit"], "summary": summary})
    return doc


if __name__ == "__main__":
    main()
