"""A request's images inside the engine (an executor over a `step3_jax.vision.Step3VLModel`).

Everything here is host side; the decode step never sees an image. The life of an image
request:

1. ``Engine.submit(prompt, params, images=...)``: `ModelExecutor.prepare_images` loads and
   preprocesses the images (Pillow) and expands each ``<im_patch>`` marker of the prompt to its
   image's placeholder layout (`step3_jax.vision.generate.expand`, the rule `generate(images=)`
   and ``step3-jax chat --image`` follow). The request's prompt is the expanded one, so its
   budget, the fits check and the usage count image tokens. Bad images fail here (ValueError).
2. Admission: `ModelExecutor.encode_images` runs the vision tower ONCE per view, in calls of a
   fixed batch (`Step3VLModel.image_features` with ``batch=``: one compiled program per view
   resolution, whatever the images). The pixels are dropped; the feature rows ``[I, M]`` stay.
3. Each prefill chunk carries the feature rows of its own placeholder positions
   (`ImageInputs.chunk`); the executor packs the chunk rows of one prefill call in placeholder
   order (`pack_chunk_features`) for `Step3VLModel.embed`, which puts the k-th of them at the
   k-th placeholder of the call. After the last chunk the rows are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from step3_jax.vision.preprocess import PreprocessedImages


@dataclasses.dataclass
class ImageInputs:
    """A request's images from submit to the end of its prefill."""

    pixels: PreprocessedImages | None  # until the vision tower has run (admission)
    rows: np.ndarray  # [T] int32: the feature row of each prompt position, -1 if not <im_patch>
    features: np.ndarray | None = None  # [I, M] feature rows (model dtype) once the tower ran

    @classmethod
    def create(cls, prompt: Sequence[int], pixels: PreprocessedImages, image_token_id: int):
        mask = np.asarray(prompt) == image_token_id
        rows = np.where(mask, np.cumsum(mask) - 1, -1).astype(np.int32)
        return cls(pixels, rows)

    @property
    def pixel_bytes(self) -> int:
        """Host bytes of the preprocessed pixels (0 once the tower has run)."""
        if self.pixels is None:
            return 0
        return self.pixels.pixel_values.nbytes + self.pixels.crop_pixel_values.nbytes

    @property
    def num_features(self) -> int:
        """Placeholder positions of the prompt (= feature rows the tower must produce)."""
        return int(np.sum(self.rows >= 0))

    def chunk(self, start: int, end: int) -> np.ndarray:
        """``[k, M]``: the feature rows of the placeholders at prompt positions
        ``[start, end)``, in prompt order (k may be 0)."""
        if self.features is None:
            raise RuntimeError("the vision tower has not run for this request (encode_images)")
        rows = self.rows[start:end]
        return self.features[rows[rows >= 0]]


def pack_chunk_features(
    chunks: Sequence[np.ndarray | None], num_rows: int, chunk_len: int, width: int, dtype
) -> np.ndarray:
    """One prefill call's feature rows ``[num_rows * chunk_len, width]``: row r's chunk rows
    after those of rows < r (the row-major placeholder order of `Step3VLModel.embed`), zeros
    after. A fixed shape, so image prefills share one compiled program."""
    if len(chunks) > num_rows:
        raise ValueError(f"{len(chunks)} rows of features for a prefill of {num_rows} rows")
    buf = np.zeros((num_rows * chunk_len, width), dtype)
    k = 0
    for i, rows in enumerate(chunks):
        if rows is None or not len(rows):
            continue
        if rows.ndim != 2 or rows.shape[1] != width or len(rows) > chunk_len:
            raise ValueError(
                f"features of prefill row {i} must be [<= {chunk_len}, {width}], got {rows.shape}"
            )
        buf[k : k + len(rows)] = rows
        k += len(rows)
    return buf


__all__ = ["ImageInputs", "pack_chunk_features"]
