"""`generate` with images: preprocess, run the vision tower once per view, prefill the text model
on the merged embeddings, then the text model's usual on-device decode loop.

The vision tower never runs inside the decode loop: image features exist only at prefill (they
become K/V in the cache like any prompt token). The decode loop, sampling and result
collection are `step3_jax.decode`'s own (`_decode_loop`, `_collect`): only the prefill differs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step3_jax import decode
from step3_jax.sampling import sample
from step3_jax.vision.model import Step3VLModel
from step3_jax.vision.preprocess import (
    IMAGE_TYPES,
    ImageSpecialTokens,
    expand_prompt,
    preprocess_images,
)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, features, prompt_lengths, image_lengths, cache):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    # Placeholders count only in the first ``image_lengths`` tokens: past them (a reply being
    # continued) an ``<im_patch>`` id is a generated token with its text embedding, as the
    # decode loop embeds it.
    x = model.embed(tokens, features, image_lengths)
    logits, cache = model.forward_embeds(x, positions, cache)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache.replace(lengths=prompt_lengths)


def prepare(model: Step3VLModel, prompts, images, special: ImageSpecialTokens):
    """Expanded prompts (lists of ids) and the image feature rows ``[I, M]`` (or None)."""
    expanded, pre = expand(model, prompts, images, special)
    return expanded, (model.image_features(pre) if pre else None)


def expand(model: Step3VLModel, prompts, images, special: ImageSpecialTokens):
    """The host half of `prepare`: expanded prompts and the preprocessed images (or None),
    the vision tower not run yet (the serving engine runs it when it admits the request)."""
    if images is None:
        images = [()] * len(prompts)
    if isinstance(images, IMAGE_TYPES) or not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a list with one list of images per prompt (images[b]: prompt b's "
            f"images), got {type(images).__name__}; one image for one prompt: images=[[image]]"
        )
    for b, per in enumerate(images):
        if isinstance(per, IMAGE_TYPES) or not isinstance(per, Sequence):
            raise TypeError(
                f"images[{b}] must be the list of prompt {b}'s images (images[b]: prompt b's "
                f"images), got {type(per).__name__}; one image for one prompt: images=[[image]]"
            )
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
    return expanded, pre


def generate(
    model: Step3VLModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    images: Sequence[Sequence] | None = None,
    special: ImageSpecialTokens,
    **kwargs,
) -> decode.GenerationResult:
    """Generates for each prompt; ``images[b]`` lists prompt b's images (paths, bytes, PIL
    images or uint8 arrays; any sizes), one ``special.image`` token per image in the prompt.

    Same sampling, stopping and cache sizing as `step3_jax.generate` (``kwargs``: those of
    `generate_prepared`).
    """
    t0 = time.perf_counter()
    expanded, features = prepare(model, list(prompts), images, special)
    res = generate_prepared(model, expanded, features, max_new_tokens, **kwargs)
    # prefill time includes preprocessing and the vision tower
    return dataclasses.replace(res, prefill_seconds=time.perf_counter() - t0 - res.decode_seconds)


def generate_prepared(
    model: Step3VLModel,
    prompts: Sequence[Sequence[int]],
    features: jax.Array | None,
    max_new_tokens: int,
    *,
    image_lengths: Sequence[int] | None = None,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    max_cache_len: int | None = None,
    cache_dtype=None,
    v_transposed: bool = False,
) -> decode.GenerationResult:
    """`generate` on prompts already expanded by `prepare` and their feature rows ``[I, M]``
    (None without images): no preprocessing and no vision tower here, so a caller that
    continues the same prompt several times (chat's chunked replies) runs the tower once.

    ``image_lengths[b]``: only the first ``image_lengths[b]`` tokens of prompt b may hold
    placeholders (default: all of it); later ``<im_patch>`` ids (a generated reply fed back)
    keep their text embedding, as in the decode loop.
    """
    cfg = model.config
    stops = decode._check_args(cfg, max_new_tokens, stop_tokens, seed, max_cache_len)
    clock = (decode._compile_clock["seconds"], time.perf_counter())
    tokens, lengths = decode._prepare_prompts([list(p) for p in prompts], cfg.vocab_size)
    limits = lengths if image_lengths is None else np.asarray(image_lengths, np.int32)
    if limits.shape != lengths.shape or np.any(limits > lengths) or np.any(limits < 0):
        raise ValueError(
            f"image_lengths={limits.tolist()} must give one length in [0, the prompt's length] "
            f"per prompt (prompt lengths {lengths.tolist()})"
        )
    # Step3VLModel.embed cannot count under jit (`_prefill`): the same check, on the host.
    model.check_features(model.image_mask(tokens[: len(limits)], limits), features)
    plan = decode._plan(cfg, tokens, lengths, max_new_tokens, (temperature, top_k, top_p), stops,
                        max_cache_len, cache_dtype or model.dtype, v_transposed)  # fmt: skip
    all_limits = np.zeros(len(plan.lengths), np.int32)  # padding rows: no placeholders
    all_limits[: len(limits)] = limits
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(
        graphdef, state, plan.tokens, features, plan.lengths, all_limits, plan.cache
    )
    first = sample(logits, jax.random.key(seed), plan.params)
    text_def, text_state = nnx.split(model.text)
    return decode._decode_and_collect(
        text_def, text_state, plan, cache, first, seed, max_new_tokens, clock
    )


__all__ = ["expand", "generate", "generate_prepared", "prepare"]
