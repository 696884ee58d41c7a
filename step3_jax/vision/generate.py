"""`generate` with images: preprocess, run the vision tower once per view, prefill the text model
on the merged embeddings, then the text model's usual on-device decode loop.

The vision tower never runs inside the decode loop: image features exist only at prefill (they
become K/V in the cache like any prompt token). The decode loop, sampling and result
collection are `step3_jax.decode`'s own (`_decode_loop`, `_collect`): only the prefill differs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from step3_jax import decode
from step3_jax.sampling import sample
from step3_jax.vision.model import Step3VLModel
from step3_jax.vision.preprocess import ImageSpecialTokens, expand_prompt, preprocess_images


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, features, prompt_lengths, cache):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = model.embed(tokens, features, prompt_lengths)
    logits, cache = model.forward_embeds(x, positions, cache)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache.replace(lengths=prompt_lengths)


def prepare(model: Step3VLModel, prompts, images, special: ImageSpecialTokens):
    """Expanded prompts (lists of ids) and the image feature rows ``[I, M]`` (or None)."""
    if images is None:
        images = [()] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"images must give one list per prompt: {len(images)} for {len(prompts)}")
    if special.image != model.vision_config.image_token_id:
        raise ValueError(
            f"special.image={special.image} but the model's image_token_id is "
            f"{model.vision_config.image_token_id}"
        )
    flat = [img for per in images for img in per]
    pre = preprocess_images(flat, model.vision_config) if flat else None
    layouts = iter(pre.layouts if pre else ())
    expanded = []
    for prompt, per in zip(prompts, images, strict=True):
        mine = [next(layouts) for _ in per]
        expanded.append(expand_prompt(prompt, mine, special).tolist())
    return expanded, (model.image_features(pre) if pre else None)


def generate(
    model: Step3VLModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    images: Sequence[Sequence] | None = None,
    special: ImageSpecialTokens,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    max_cache_len: int | None = None,
    cache_dtype=None,
) -> decode.GenerationResult:
    """Generates for each prompt; ``images[b]`` lists prompt b's images (paths, bytes, PIL
    images or uint8 arrays; any sizes), one ``special.image`` token per image in the prompt.

    Same sampling, stopping and cache sizing as `step3_jax.generate`.
    """
    cfg = model.config
    stops = decode._check_args(cfg, max_new_tokens, stop_tokens, seed, max_cache_len)
    clock = (decode._compile_clock["seconds"], time.perf_counter())  # includes the vision tower
    expanded, features = prepare(model, list(prompts), images, special)
    tokens, lengths = decode._prepare_prompts(expanded, cfg.vocab_size)
    plan = decode._plan(cfg, tokens, lengths, max_new_tokens, (temperature, top_k, top_p), stops,
                        max_cache_len, cache_dtype or model.dtype)  # fmt: skip
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, plan.tokens, features, plan.lengths, plan.cache)
    first = sample(logits, jax.random.key(seed), plan.params)
    text_def, text_state = nnx.split(model.text)
    return decode._decode_and_collect(
        text_def, text_state, plan, cache, first, seed, max_new_tokens, clock
    )


__all__ = ["generate", "prepare"]
