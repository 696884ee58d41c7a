"""What the `Engine` drives: a fixed-shape decode step over ``max_batch`` slots and a prefill
step over ``prefill_rows`` chunks of ``prefill_chunk`` tokens, with KV memory per slot.

Interface (duck-typed; both executors below implement it):

* ``max_batch``, ``max_len`` (tokens one request may hold: prompt + generated),
  ``prefill_chunk``, ``prefill_rows``, ``vocab_size``.
* ``check_fits(num_tokens)``: ValueError (the reason) if such a request could never run.
* ``admit(slot, num_tokens)``: reserve KV memory for a request of up to ``num_tokens``;
  raises `PoolExhausted` (try again later, nothing taken) or ValueError (can never fit).
* ``release(slot)``: give it back.
* ``decode(tokens [B], positions [B], active [B]) -> logits [B, V]`` (device, float32): one
  token per slot; inactive slots (free, or mid-prefill) must not disturb any cache content
  their owner will read. ``positions`` of an inactive slot is its current fill (0 if free).
* ``prefill(slots [R], tokens [R, C], starts [R], last [R]) -> logits [R, V]``: chunk rows
  (``slots`` -1: padding row); the logits of token ``last[r]`` of each row.
* ``compile_count()``: compilations of its programs so far.

Images (optional; `ModelExecutor` over a `step3_jax.vision.Step3VLModel`, see
`step3_jax.engine.images`): ``accepts_images``, ``prepare_images(prompt, images) -> (prompt,
ImageInputs | None)`` at submit, ``encode_images(inputs)`` at admission, and ``prefill(...,
features=[R] list of [k, M] arrays or None)``. An executor without them refuses images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step3_jax.config import check_sizes
from step3_jax.engine.images import ImageInputs, pack_chunk_features
from step3_jax.engine.paged_cache import NULL_PAGE, PageAllocator, PagedKVCache, pages_for
from step3_jax.vision.generate import expand
from step3_jax.vision.model import tower_compile_count
from step3_jax.vision.preprocess import as_image_list


def _forward_select(graphdef, state, cache, tokens, positions, select):
    """The model over ``tokens [R, T]`` at ``positions``; logits ``[R, V]`` of token
    ``select [R]`` of each row, and the cache."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache=cache, positions=positions)
    return jnp.take_along_axis(logits, select[:, None, None], axis=1)[:, 0], cache


def _forward_select_embeds(graphdef, state, cache, tokens, positions, select, features, limits):
    """`_forward_select` for a `Step3VLModel`: ``features [R*T, M]`` land at the placeholders
    of ``tokens`` in their first ``limits [R]`` positions (`Step3VLModel.embed`)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward_embeds(model.embed(tokens, features, limits), positions, cache)
    last = jnp.take_along_axis(logits, select[:, None, None], axis=1)[:, 0]
    return last, cache.advance(positions)


@functools.lru_cache(maxsize=8)
def _jitted_prefill_embeds(graphdef):
    """`_forward_select_embeds` compiled for one `Step3VLModel` structure (as `_jitted_forward`)."""
    return jax.jit(functools.partial(_forward_select_embeds, graphdef), donate_argnames=("cache",))


@functools.lru_cache(maxsize=8)
def _jitted_forward(graphdef):
    """`_forward_select` compiled for one model structure. The graphdef is closed over rather
    than a static argument (hashing it costs ~ms per call); executors of the same model
    structure share the compiled programs."""
    return jax.jit(functools.partial(_forward_select, graphdef), donate_argnames=("cache",))


class ModelExecutor:
    """The single-device `Step3Model` over a `PagedKVCache`.

    Pages are reserved for a request's whole budget (prompt + max_tokens) when it is admitted,
    so a running request never runs out of pages; one that does not fit now waits
    (`PoolExhausted`). ``num_pages`` defaults to enough for every slot at ``max_len`` (+ the
    null page); fewer pages let more slots share a smaller pool of mostly-short requests.
    ``page_size`` must be a multiple of the Pallas kernel's ``block_s`` (64) where the kernel
    runs (Hopper, Step-3 head shapes); the XLA path takes any size. ``cache_dtype`` (default
    the model's) and ``v_transposed`` (FP8 only: V pages for the decode kernel's FP8 P.V) shape
    the page pools (`PagedKVCache.create`).

    A `step3_jax.vision.Step3VLModel` takes images (`Engine.submit(images=)`): it needs
    ``image_tokens`` (`ImageSpecialTokens.from_tokenizer`) to expand prompts; the vision tower
    runs ``vision_batch`` views per call. Decode runs the text model alone (the program a
    `Step3Model` executor compiles); every prefill, text or image, runs one program that merges
    feature rows at placeholder positions (`Step3VLModel.embed`), so a VL executor compiles the
    same two step programs as a text one, plus the tower's two (728 px views, 504 px crops).
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int,
        max_len: int,
        page_size: int = 64,
        num_pages: int | None = None,
        prefill_chunk: int = 32,
        prefill_rows: int = 1,
        cache_dtype=None,
        v_transposed: bool = False,
        image_tokens=None,
        vision_batch: int = 1,
    ):
        cfg = model.config
        check_sizes(
            "ModelExecutor",
            max_batch=max_batch,
            max_len=max_len,
            page_size=page_size,
            prefill_chunk=prefill_chunk,
            prefill_rows=prefill_rows,
            vision_batch=vision_batch,
        )
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        self.max_batch, self.page_size = int(max_batch), int(page_size)
        self.max_pages = pages_for(max_len, page_size)
        self.max_len = int(max_len)
        self.prefill_chunk, self.prefill_rows = int(prefill_chunk), int(prefill_rows)
        self.vocab_size = cfg.vocab_size
        num_pages = num_pages or max_batch * self.max_pages + 1
        self.allocator = PageAllocator(num_pages)
        # Committed to the device like the step's outputs, so the first call compiles the
        # same program as every later one (an uncommitted input is a different signature).
        self.cache = jax.device_put(
            PagedKVCache.create(
                cfg.num_layers,
                self.max_batch,
                num_pages,
                page_size,
                self.max_pages,
                cfg.head_dim,
                cache_dtype or model.dtype,
                v_transposed,
            ),
            jax.devices()[0],
        )
        self.tables = np.full((self.max_batch, self.max_pages), NULL_PAGE, np.int32)
        self._pages: dict[int, list[int]] = {}
        self._init_vision(model, image_tokens, int(vision_batch))
        self.graphdef, self.state = nnx.split(model.text if self.accepts_images else model)
        self._forward = _jitted_forward(self.graphdef)

    def _init_vision(self, model, image_tokens, vision_batch: int) -> None:
        vc = getattr(model, "vision_config", None)
        self.accepts_images, self.image_tokens = vc is not None, image_tokens
        if vc is None:
            if image_tokens is not None:
                raise ValueError("ModelExecutor: image_tokens= needs a Step3VLModel; this model "
                                 "is text-only")  # fmt: skip
            return
        if image_tokens is None:
            raise ValueError(
                "ModelExecutor: a Step3VLModel needs image_tokens= (ImageSpecialTokens."
                "from_tokenizer(tokenizer)) to expand image prompts"
            )
        if image_tokens.image != vc.image_token_id:
            raise ValueError(
                f"image_tokens.image={image_tokens.image} but the model's image_token_id is "
                f"{vc.image_token_id}"
            )
        self.vl_model, self.vision_batch = model, vision_batch
        self._vl_graphdef, self._vl_state = nnx.split(model)
        self._prefill_embeds = _jitted_prefill_embeds(self._vl_graphdef)
        # The features of a prefill call without images: zeros, on device once.
        self._feature_dtype = np.dtype(model.dtype)
        self._no_features = jax.device_put(
            np.zeros((self.prefill_rows * self.prefill_chunk, model.config.hidden_size),
                     self._feature_dtype), jax.devices()[0]
        )  # fmt: skip

    # ------------------------------------------------------------------ images
    def prepare_images(self, prompt: list[int], images) -> tuple[list[int], ImageInputs | None]:
        """At submit (host): ``(expanded prompt, ImageInputs)``; ``images`` (paths, bytes, PIL
        images or uint8 arrays) go one per ``<im_patch>`` marker of ``prompt``, in order. A
        text prompt on a VL model passes ``images=()`` (markers are then an error); one image
        alone stands for a list of one."""
        images = as_image_list(images)
        if not self.accepts_images:
            if images:
                raise ValueError(
                    "images= needs a Step3-VL model (step3_jax.checkpoints.load_hf_vl); this "
                    "engine's model is text-only"
                )
            return prompt, None
        (expanded,), pixels = expand(self.vl_model, [prompt], [images],
                                     self.image_tokens)  # fmt: skip
        if pixels is None:
            return expanded, None
        return expanded, ImageInputs.create(expanded, pixels, self.image_tokens.image)

    def encode_images(self, inputs: ImageInputs) -> None:
        """At admission (host side, outside any step): the vision tower, once per view."""
        feats = self.vl_model.image_features(inputs.pixels, batch=self.vision_batch)
        if feats.shape[0] != inputs.num_features:  # the layout and the tower disagree
            raise RuntimeError(
                f"the vision tower gave {feats.shape[0]} feature rows for "
                f"{inputs.num_features} placeholders"
            )
        inputs.features, inputs.pixels = np.asarray(feats, self._feature_dtype), None

    def check_fits(self, num_tokens: int) -> None:
        """ValueError if a request of ``num_tokens`` could never be admitted."""
        if num_tokens > self.max_len:
            raise ValueError(f"exceeds the engine's max_len={self.max_len}")
        need = pages_for(num_tokens, self.page_size)
        if need > self.allocator.capacity:
            raise ValueError(
                f"needs {need} pages of {self.page_size} tokens: more than the whole pool "
                f"({self.allocator.capacity} pages)"
            )

    def admit(self, slot: int, num_tokens: int) -> None:
        if slot in self._pages:
            raise ValueError(f"slot {slot} is already in use")
        self.check_fits(num_tokens)
        need = pages_for(num_tokens, self.page_size)
        pages = self.allocator.allocate(need)  # PoolExhausted: nothing taken
        self._pages[slot] = pages
        self.tables[slot, :need] = pages

    def release(self, slot: int) -> None:
        self.allocator.free(self._pages.pop(slot))
        self.tables[slot] = NULL_PAGE

    def _run(self, tables, tokens, positions, select, images=None):
        cache = self.cache.replace(
            block_table=jnp.asarray(tables), lengths=jnp.asarray(positions[:, -1] + 1)
        )
        args = (
            cache,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(select, jnp.int32),
        )
        if images is None:
            logits, cache = self._forward(self.state, *args)
        else:  # (features [R*C, M], limits [R])
            logits, cache = self._prefill_embeds(self._vl_state, *args, *images)
        self.cache = cache
        return logits

    def decode(self, tokens, positions, active):
        # Inactive rows see only the null page: a free or mid-prefill slot's pages stay intact.
        tables = np.where(np.asarray(active)[:, None], self.tables, NULL_PAGE)
        pos = np.asarray(positions, np.int32)[:, None]
        return self._run(tables, np.asarray(tokens)[:, None], pos, np.zeros(len(pos), np.int32))

    def prefill(self, slots, tokens, starts, last, features=None):
        """``features`` (image requests): per row, the ``[k, M]`` feature rows of the
        placeholders in its chunk (`ImageInputs.chunk`), or None."""
        slots = np.asarray(slots)
        tables = np.where((slots >= 0)[:, None], self.tables[np.maximum(slots, 0)], NULL_PAGE)
        c = np.shape(tokens)[1]
        positions = np.asarray(starts, np.int32)[:, None] + np.arange(c, dtype=np.int32)
        has_images = features is not None and any(f is not None and len(f) for f in features)
        if not self.accepts_images:
            if has_images:
                raise ValueError("prefill: image features given to a text-only model")
            return self._run(tables, tokens, positions, last)
        # Placeholders count only within each real row's chunk (not its zero padding).
        limits = np.where(slots >= 0, np.asarray(last, np.int32) + 1, 0).astype(np.int32)
        if has_images:
            width = self.vl_model.config.hidden_size
            packed = pack_chunk_features(features, len(slots), c, width, self._feature_dtype)
            feats = jax.device_put(packed, jax.devices()[0])  # committed, as _no_features
        else:
            feats = self._no_features
        return self._run(tables, tokens, positions, last, (feats, jnp.asarray(limits)))

    def compile_count(self) -> int:
        """Programs compiled for this model structure (shared by its executors): the decode
        and prefill steps, and for a VL model the vision tower's."""
        n = self._forward._cache_size()
        if self.accepts_images:
            n += self._prefill_embeds._cache_size() + tower_compile_count()
        return n


__all__ = ["ModelExecutor"]
