"""`Step3VLModel`: the vision half's image embeddings merged into the text model's prompt.

As vLLM's ``Step3VLForConditionalGeneration`` does: the prompt's token embeddings are looked up
as usual, then every position holding ``image_token_id`` (``<im_patch>``) is REPLACED by the next
image-feature row (row-major over the batch, features in prompt order); the other image markup
tokens (``<im_start>``, ``<patch_start>``, ...) keep their text embeddings. The text model then
runs on these embeddings exactly as `Step3Model.__call__` runs on its own (its public `embed`,
``layers`` and `logits`), so a prompt without images gives the text-only model's logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from step3_jax.cache import KVCache
from step3_jax.config import Step3Config
from step3_jax.kernels.checks import concrete
from step3_jax.model import Step3Model, cache_positions, check_tokens
from step3_jax.policy import compiler_options
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.encoder import Step3VisionModel
from step3_jax.vision.preprocess import PreprocessedImages


def _tower(treedef, leaves, pixel_values):
    return jax.tree.unflatten(treedef, leaves)(pixel_values)


_PROGRAMS: dict[bool, object] = {}  # tower_program's jitted functions, by on_gpu


def tower_program(on_gpu: bool):
    """The jitted tower ``(treedef, leaves, pixel_values) -> [B, T, M]`` over the vision
    module flattened (`flatten_tower`; ``treedef`` static). ``on_gpu``: compile with
    `step3_jax.policy.GPU_COMPILER_OPTIONS`, so its linears become cuBLAS GEMMs rather than
    XLA's slower Triton GEMM fusions (docs/LOG.md, "Vision tower"). Built on first use: the
    options depend on the backend, which must not be initialized at import.

    Why flat: flax NNX flattens the 63-layer tower's 766 leaves in Python, 4.8 ms a call on
    an H100 machine (docs/LOG.md, "Host time around a tower call, measured"), while a list of
    arrays and the static treedef's hash cost ~0.2 ms. So a caller that runs the tower
    several times (`Step3VLModel.image_features`: once per view in the serving engine)
    flattens the module once."""
    on_gpu = bool(on_gpu)
    if on_gpu not in _PROGRAMS:
        _PROGRAMS[on_gpu] = jax.jit(
            _tower, static_argnums=0, compiler_options=compiler_options(on_gpu)
        )
    return _PROGRAMS[on_gpu]


def tower_compile_count() -> int:
    """Tower programs compiled in this process so far (every model structure and input
    shape; the engine's no-recompilation check)."""
    return sum(p._cache_size() for p in _PROGRAMS.values())


def flatten_tower(vision: Step3VisionModel) -> tuple:
    """``(treedef, leaves)`` of the vision module as `tower_program` takes them: its arrays as
    they are now (a later change to the module's weights needs a new flatten)."""
    leaves, treedef = jax.tree.flatten(vision)
    return treedef, leaves


def _embed_images(flat: tuple, pixel_values):
    """The tower on ``pixel_values`` with the module given flattened (`flatten_tower`)."""
    treedef, leaves = flat
    return tower_program(jax.default_backend() == "gpu")(treedef, leaves, pixel_values)


def _in_fixed_batches(tower, pixels: np.ndarray, batch: int) -> np.ndarray:
    """``tower`` in calls of exactly ``batch`` views (zero rows pad the last one, their outputs
    dropped); the result on the host."""
    out = []
    for s in range(0, pixels.shape[0], batch):
        chunk = pixels[s : s + batch]
        real = chunk.shape[0]
        if real < batch:
            pad = np.zeros((batch - real, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        out.append(np.asarray(tower(chunk))[:real])
    return np.concatenate(out)


class Step3VLModel(nnx.Module):
    """``text`` (a `Step3Model`) + ``vision`` (a `Step3VisionModel`)."""

    def __init__(self, text: Step3Model, vision: Step3VisionModel):
        tc, vc = text.config, vision.config
        if vc.text_hidden_size != tc.hidden_size:
            raise ValueError(
                f"vision projector outputs {vc.text_hidden_size} but the text model is "
                f"{tc.hidden_size} wide"
            )
        if not 0 <= vc.image_token_id < tc.vocab_size:
            raise ValueError(
                f"image_token_id={vc.image_token_id} outside the vocab {tc.vocab_size}"
            )
        self.text, self.vision = text, vision

    @classmethod
    def create(
        cls, config: Step3Config, vision_config: Step3VisionConfig, *, rngs: nnx.Rngs,
        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **text_kwargs,
    ) -> Step3VLModel:  # fmt: skip
        """Random weights (tests, benchmarks); ``text_kwargs`` (e.g. ``policy=``) go to
        `Step3Model`, whose policy the vision half shares."""
        text = Step3Model(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **text_kwargs)
        vision = Step3VisionModel(
            vision_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, policy=text.policy
        )
        return cls(text, vision)

    @property
    def config(self) -> Step3Config:
        return self.text.config

    @property
    def vision_config(self) -> Step3VisionConfig:
        return self.vision.config

    @property
    def dtype(self):
        return self.text.dtype

    # ------------------------------------------------------------------ images
    def embed_images(self, pixel_values: Float[Array, "B C P P"]) -> Float[Array, "B T M"]:
        """Normalized pixels ``[N, 3, P, P]`` -> projector output ``[N, tokens, M]`` (jitted)."""
        return _embed_images(flatten_tower(self.vision), jnp.asarray(pixel_values))

    def image_features(
        self, images: PreprocessedImages, batch: int | None = None
    ) -> Float[Array, "I M"]:
        """All images' feature rows in prompt order: per image its crops' rows, then its global
        view's. The tower runs once per view: one batched call per resolution.

        ``batch`` (the serving engine's mode): the tower runs on ``batch`` views at a time, the
        last call zero-padded, and the rows are assembled on the host (a NumPy array), so any
        number of images and crops uses one compiled program per view resolution. The vision
        module is flattened once for all of this call's tower runs (`tower_program`)."""
        flat = flatten_tower(self.vision)

        def tower(pixels):
            return _embed_images(flat, jnp.asarray(pixels))

        xp = jnp
        if batch is not None:
            if int(batch) < 1:
                raise ValueError(f"batch must be None or >= 1, got {batch}")
            tower, xp = functools.partial(_in_fixed_batches, tower, batch=int(batch)), np
        views = tower(images.pixel_values)
        crops = None
        if images.crop_pixel_values.shape[0]:
            crops = tower(images.crop_pixel_values)
        rows, start = [], 0
        for i, n in enumerate(images.num_crops):
            if n:
                rows.append(crops[start : start + n].reshape(-1, crops.shape[-1]))
            rows.append(views[i])
            start += n
        return xp.concatenate(rows, axis=0)

    # ------------------------------------------------------------------ prompt
    def image_mask(self, tokens: Int[Array, "B T"], lengths=None) -> Bool[Array, "B T"]:
        """Placeholder positions (``image_token_id``), ignoring padding past ``lengths``."""
        mask = tokens == self.vision_config.image_token_id
        if lengths is not None:
            mask &= jnp.arange(tokens.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
        return mask

    def check_features(self, mask: Bool[Array, "B T"], features) -> None:
        """``features`` fit the placeholders of ``mask`` (`image_mask`): ``[I, hidden_size]``
        (always), one row per placeholder (when the mask is concrete: under jit a caller
        checks on the host first, as `step3_jax.vision.generate.generate_prepared` does)."""
        width = self.config.hidden_size
        if features is not None and (len(features.shape) != 2 or features.shape[1] != width):
            raise ValueError(
                f"features must be [I, hidden_size={width}] (one row per image placeholder), "
                f"got shape {tuple(features.shape)}"
            )
        if not concrete(mask):
            return
        count, num = int(np.sum(np.asarray(mask))), 0 if features is None else features.shape[0]
        if count != num:
            raise ValueError(
                f"the prompt has {count} image placeholder positions (id "
                f"{self.vision_config.image_token_id}) but {num} image feature rows were given"
            )

    def embed(
        self, tokens: Int[Array, "B T"], features: Float[Array, "I M"] | None = None, lengths=None
    ) -> Float[Array, "B T M"]:
        """Token embeddings with the k-th placeholder position replaced by ``features[k]``."""
        x = self.text.embed(tokens)
        mask = self.image_mask(tokens, lengths)
        self.check_features(mask, features)
        if features is None:
            return x
        num = features.shape[0]
        idx = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, num - 1).reshape(mask.shape)
        return jnp.where(mask[..., None], features.astype(x.dtype)[idx], x)

    def forward_embeds(
        self,
        x: Float[Array, "B T M"],
        positions: Int[Array, "B T"],
        cache: KVCache | None = None,
    ):
        """The text model on embeddings: its layers, final norm and lm_head (float32 logits)."""
        text = self.text
        for layer in text.layers:
            x, cache = layer(x, positions, cache, text.policy)
        return text.logits(x), cache

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        images: PreprocessedImages | None = None,
        *,
        features: Float[Array, "I M"] | None = None,
        cache: KVCache | None = None,
        positions: Int[Array, "B T"] | None = None,
    ):
        """Like `Step3Model.__call__`, with ``images`` (or precomputed ``features``) merged at
        the placeholder positions of ``tokens`` (already expanded: `expand_prompt`)."""
        check_tokens(tokens, self.config.vocab_size)
        positions = cache_positions(self.config, tokens, cache, positions)
        if images is not None:
            if features is not None:
                raise ValueError("pass images= or features=, not both")
            features = self.image_features(images)
        logits, cache = self.forward_embeds(self.embed(tokens, features), positions, cache)
        if cache is None:
            return logits
        return logits, cache.replace(lengths=positions[:, -1] + 1)


__all__ = ["Step3VLModel", "flatten_tower", "tower_compile_count", "tower_program"]
