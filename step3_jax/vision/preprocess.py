"""Host-side image preprocessing for Step3-VL (Pillow + NumPy), as the release's processor does.

The rule (vLLM's ``Step3VLProcessor`` / ``ImagePatcher`` in
vllm/model_executor/models/step3_vl.py, current version; SGLang's processor is the same code
except for the window threshold of rule 3):

1. Very thin small images (shorter side < 32 px and aspect ratio > 4) are zero-padded to a
   square (image at the top-left, black elsewhere).
2. Images whose longer side exceeds 3024 px are scaled down (``int(w * s)``, ``int(h * s)``
   with ``s = 3024 / long``); every image then goes through ``resize(..., BILINEAR)``.
3. The crop window: for ``long < 728`` it is the shorter side if ``long / short > 1.5``, else no
   crops; for ``long >= 728`` it is ``min(short, 504)`` if ``long / short > 4``, else 504.
   vLLM and SGLang DISAGREE here: SGLang's processor (and older vLLM) test ``long <= 728``,
   current vLLM ``long < 728``. We follow current vLLM, so an image whose longer side is
   exactly 728 px is cut into 504 px windows (a 728 x 728 image: 4 crops + the global view,
   504 prompt tokens; SGLang: the global view alone, 171 tokens).
4. With a window ``w``: each side ``L >= w`` is rounded to a multiple of ``w`` (up when the
   fractional part of ``L / w`` exceeds 0.2, else down); a side ``L < w`` is kept. The image is
   resized (BILINEAR) to that size and cut into ``w x w`` windows, row-major; the last window
   of a row/column is shifted back to end at the border when it would overhang; a side
   shorter than ``w`` gives one window that Pillow pads with black.
5. Pixel values: ``x / 255``, then ``(x - mean) / std`` per channel (CLIP mean/std), then an
   antialiased bilinear resize of the normalized float image to 728 x 728 (the global view)
   or 504 x 504 (each crop). (torchvision's antialiased tensor resize implements Pillow's
   convolution resampling; here it IS Pillow's, on 32-bit float ``"F"`` images.)

Prompt layout of one image (``<im_patch>`` is the only placeholder that receives features)::

    for each crop i:  <patch_start> <im_patch> x 81 <patch_end> [<patch_newline> if the crop ends
                      a row of windows and is not the last crop]
    then:             <im_start> <im_patch> x 169 <im_end>

The image features come in the same order: the crops' 81-token blocks, then the global view's
169 tokens.

Bounds (ours; the release's processor has none and allocates whatever rules 1 and 4 ask for):
an image cut into more than ``MAX_CROPS = 36`` windows (a 3024 x 3024 image's 6 x 6, the
largest image vLLM sizes a per-image token budget for: ``get_image_size_with_most_features``)
is refused. Only very thin images get there (rule 3 gives them windows of the shorter side;
aspect ratios up to about 35:1 fit, 36:1 itself only below the 3024 cap, whose truncation of
the short side adds a window): a 40 x 60000 px PNG of 2.4 KB would otherwise be cut into 1512
crops (4.3 GiB of float32 pixels). So is an image whose zero-padded square (rule 1) has more
pixels than ``2 * Image.MAX_IMAGE_PIXELS`` (the size Pillow refuses to open: a memory bound,
as the square is made here, not opened). A side that the 3024 cap scales below 1 px is kept
at 1 px.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from step3_jax.vision.config import Step3VisionConfig

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as the release's processor
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_SIZE = 3024  # longer sides above this are scaled down first
LARGE_SIDE = 728  # images whose longer side reaches this get 504 px windows
WINDOW = 504
THIN_SIDE, THIN_RATIO = 32, 4  # pad-to-square rule
MAX_CROPS = 36  # crops per image at most: a 3024 x 3024 image's (module docstring, "Bounds")
# Modes with one 8-bit RGB reading. High-bit-depth and float modes ("I", "I;16", "F") would
# need a choice of value range: refused rather than guessed.
ACCEPTED_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr")
# What one image may be (`load_image`); anything else where images are expected is a list.
IMAGE_TYPES = (str, Path, bytes, bytearray, np.ndarray, Image.Image)
SPECIAL_TOKEN_NAMES = {
    "image": "<im_patch>",
    "im_start": "<im_start>",
    "im_end": "<im_end>",
    "patch_start": "<patch_start>",
    "patch_end": "<patch_end>",
    "patch_newline": "<patch_newline>",
}


@dataclasses.dataclass(frozen=True)
class ImageSpecialTokens:
    """Token ids of the image markup; ``image`` (``<im_patch>``) is the feature placeholder."""

    image: int
    im_start: int
    im_end: int
    patch_start: int
    patch_end: int
    patch_newline: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ImageSpecialTokens:
        """From a `step3_jax.checkpoints.Tokenizer` or a ``tokenizers.Tokenizer`` that knows the
        release's special tokens (``<im_patch>``, ``<im_start>``, ...)."""
        tok = getattr(tokenizer, "hf", None) or getattr(tokenizer, "tokenizer", tokenizer)
        ids = {k: tok.token_to_id(name) for k, name in SPECIAL_TOKEN_NAMES.items()}
        missing = [SPECIAL_TOKEN_NAMES[k] for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer lacks the image tokens {missing}")
        return cls(**ids)


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """How one image is cut: the window, the resized size and the windows ``(x, y, w, h)``."""

    size: tuple[int, int]  # (width, height) after padding and the 3024 cap: the global view
    window: int  # 0: no crops
    crop_size: tuple[int, int]  # (width, height) the image is resized to before cutting
    boxes: tuple[tuple[int, int, int, int], ...]  # row-major windows (x, y, w, h)
    columns: int  # windows per row
    padded: bool  # was zero-padded to a square first

    @property
    def newlines(self) -> tuple[bool, ...]:
        """Per crop: a ``<patch_newline>`` follows it (end of a row, not the last crop)."""
        n = len(self.boxes)
        return tuple((i + 1) % self.columns == 0 and i != n - 1 for i in range(n))


def window_size(long: int, short: int) -> int:
    """The crop window of a ``long`` x ``short`` image (0: no crops); rule 3 of the module doc."""
    if long < LARGE_SIDE:
        return short if long / short > 1.5 else 0
    return min(short, WINDOW) if long / short > THIN_RATIO else WINDOW


def _round_side(side: int, window: int) -> int:
    ratio = side / window
    if ratio < 1:
        return side
    whole = side // window
    return window * (whole + 1 if ratio - whole > 0.2 else whole)


def _starts(side: int, window: int) -> list[int]:
    num = 1 if side <= window else math.ceil((side - window) / window + 1)
    starts = [window * i for i in range(num)]
    if len(starts) > 1 and starts[-1] + window > side:
        starts[-1] = side - window
    return starts


def plan_crops(width: int, height: int, enable_patch: bool = True) -> CropPlan:
    """The crop plan of a ``width`` x ``height`` image (rules 1-4 of the module docstring);
    a ValueError for an image past its bounds (``MAX_CROPS``, the padded square)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image must have a positive size, got {width} x {height}")
    ratio = width / height
    given = f"{width} x {height} px (aspect ratio {max(ratio, 1 / ratio):.1f}:1)"
    padded = min(width, height) < THIN_SIDE and (ratio > THIN_RATIO or ratio < 1 / THIN_RATIO)
    if padded:
        width = height = max(width, height)
        # Pillow refuses to open (DecompressionBombError) images over twice its limit.
        if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{given} would be zero-padded to a {width} x {width} square, over the "
                f"2 * Image.MAX_IMAGE_PIXELS = {2 * Image.MAX_IMAGE_PIXELS} px Pillow opens: "
                "crop the image"
            )
    if max(width, height) > MAX_IMAGE_SIZE:
        scale = MAX_IMAGE_SIZE / max(width, height)
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    win = window_size(max(width, height), min(width, height)) if enable_patch else 0
    if win == 0:
        return CropPlan((width, height), 0, (width, height), (), 1, padded)
    cw, ch = _round_side(width, win), _round_side(height, win)
    xs, ys = _starts(cw, win), _starts(ch, win)
    if len(xs) * len(ys) > MAX_CROPS:
        raise ValueError(
            f"{given} would be cut into {len(xs) * len(ys)} crops of {win} px; at most "
            f"MAX_CROPS={MAX_CROPS} are supported (a {MAX_IMAGE_SIZE} x {MAX_IMAGE_SIZE} "
            "image's; aspect ratios up to about 35:1 fit): crop or pad the image"
        )
    boxes = tuple((x, y, win, win) for y in ys for x in xs)
    return CropPlan((width, height), win, (cw, ch), boxes, len(xs), padded)


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """The placeholder layout of one image in the prompt."""

    num_crops: int
    newlines: tuple[bool, ...]  # per crop
    crop_tokens: int  # feature tokens per crop (81)
    view_tokens: int  # feature tokens of the global view (169)

    @property
    def num_features(self) -> int:
        """``<im_patch>`` positions (= image feature rows) of this image."""
        return self.num_crops * self.crop_tokens + self.view_tokens

    def token_ids(self, t: ImageSpecialTokens) -> list[int]:
        ids: list[int] = []
        for newline in self.newlines:
            ids += [t.patch_start] + [t.image] * self.crop_tokens + [t.patch_end]
            ids += [t.patch_newline] if newline else []
        return ids + [t.im_start] + [t.image] * self.view_tokens + [t.im_end]


@dataclasses.dataclass(frozen=True)
class PreprocessedImages:
    """A batch of images ready for `Step3VLModel`: all global views in one array, all crops in
    another (one tower call per resolution), plus each image's layout."""

    pixel_values: np.ndarray  # [N, 3, 728, 728] float32, one global view per image
    crop_pixel_values: np.ndarray  # [sum of crops, 3, 504, 504] float32 (may have 0 rows)
    layouts: tuple[ImageLayout, ...]  # per image

    @property
    def num_crops(self) -> tuple[int, ...]:
        return tuple(lay.num_crops for lay in self.layouts)


def load_image(image) -> Image.Image:
    """An 8-bit RGB Pillow image from a path, bytes, a Pillow image or a uint8 array
    (``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``). As vLLM's media loader: RGBA is composited on
    white, every other accepted mode goes through Pillow's ``convert("RGB")``."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        image = _open(path.read_bytes(), str(path))
    elif isinstance(image, (bytes, bytearray)):
        image = _open(bytes(image), "<bytes>")
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a path, bytes, a PIL.Image or a uint8 numpy array, got {type(image)}"
        )
    if image.mode not in ACCEPTED_MODES:
        raise ValueError(
            f"image mode {image.mode!r} is not supported (accepted: {', '.join(ACCEPTED_MODES)}); "
            "convert high-bit-depth or float images to 8-bit RGB first"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is empty ({image.width} x {image.height} px)")
    if image.mode == "RGBA":  # as vLLM's convert_image_mode: only RGBA is composited
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated file fails here, with its name
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4], got dtype {a.dtype} "
            "(float pixel ranges are ambiguous: scale to 0..255 uint8 first)"
        )
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)):
        if a.size == 0:
            raise ValueError(f"image array is empty, shape {a.shape}")
        return Image.fromarray(np.ascontiguousarray(a))
    raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")


def normalize_resize(image: Image.Image, size: int) -> np.ndarray:
    """``[3, size, size]`` float32: ``(x/255 - mean) / std``, then antialiased bilinear resize
    (Pillow's float resampling, per channel)."""
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    out = np.empty((3, size, size), np.float32)
    for c in range(3):
        chan = (x[..., c] - np.float32(MEAN[c])) / np.float32(STD[c])
        resized = Image.fromarray(np.ascontiguousarray(chan)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        out[c] = np.asarray(resized, dtype=np.float32)
    return out


def split_image(image: Image.Image, plan: CropPlan) -> tuple[Image.Image, list[Image.Image]]:
    """The global view and the crops of an RGB image, following ``plan``."""
    if plan.padded:
        side = max(image.size)
        square = Image.new(image.mode, (side, side), 0)
        square.paste(image, (0, 0))
        image = square
    original = image.size
    view = image.resize(plan.size, Image.Resampling.BILINEAR)
    if plan.window == 0:
        return view, []
    # As the reference: resize again only when the crop size differs from the size BEFORE
    # the 3024 cap (the two differ only for images over 3024 px).
    source = view if plan.crop_size == original else view.resize(plan.crop_size, Image.BILINEAR)
    return view, [source.crop((x, y, x + w, y + h)) for x, y, w, h in plan.boxes]


def as_image_list(images) -> list:
    """``images`` as a list: None -> [], one image (`IMAGE_TYPES`) -> a list of one (``list``
    would split a path into characters, an array into rows), a sequence -> its items."""
    if images is None:
        return []
    if isinstance(images, IMAGE_TYPES):
        return [images]
    if not isinstance(images, Sequence):
        raise TypeError(
            "images must be a list of images (paths, bytes, PIL images or uint8 arrays), "
            f"got {type(images).__name__}"
        )
    return list(images)


def preprocess_images(images: Sequence, config: Step3VisionConfig) -> PreprocessedImages:
    """Loads, splits and normalizes ``images`` (each a path, bytes, PIL image or uint8 array;
    one alone is a list of one)."""
    images = as_image_list(images)
    if len(images) == 0:
        raise ValueError("images is empty: pass at least one image")
    views, crops, layouts = [], [], []
    for i, item in enumerate(images):
        try:
            img = load_image(item)
            plan = plan_crops(img.width, img.height, config.enable_patch)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise type(e)(f"images[{i}]: {e}") from e
        view, pieces = split_image(img, plan)
        views.append(normalize_resize(view, config.image_size))
        crops += [normalize_resize(p, config.crop_size) for p in pieces]
        layouts.append(
            ImageLayout(
                len(pieces),
                plan.newlines,
                config.tokens_per_view(config.crop_size),
                config.tokens_per_view(config.image_size),
            )
        )
    crop_shape = (0, 3, config.crop_size, config.crop_size)
    return PreprocessedImages(
        np.stack(views),
        np.stack(crops) if crops else np.zeros(crop_shape, np.float32),
        tuple(layouts),
    )


def expand_prompt(
    tokens: Sequence[int], layouts: Sequence[ImageLayout], special: ImageSpecialTokens
) -> np.ndarray:
    """Replaces the k-th ``<im_patch>`` token of ``tokens`` by image k's full layout.

    The prompt marks each image with ONE ``special.image`` token (as vLLM's prompts do); the
    result is the int32 token sequence the model sees.
    """
    tokens = np.asarray(tokens).reshape(-1)
    where = np.flatnonzero(tokens == special.image)
    if len(where) != len(layouts):
        raise ValueError(
            f"the prompt has {len(where)} image placeholder token(s) (id {special.image}) but "
            f"{len(layouts)} image(s) were given"
        )
    out, prev = [], 0
    for pos, layout in zip(where, layouts, strict=True):
        out += tokens[prev:pos].tolist() + layout.token_ids(special)
        prev = pos + 1
    return np.asarray(out + tokens[prev:].tolist(), np.int32)


__all__ = [
    "IMAGE_TYPES",
    "as_image_list",
    "MAX_CROPS",
    "CropPlan",
    "ImageLayout",
    "ImageSpecialTokens",
    "PreprocessedImages",
    "expand_prompt",
    "load_image",
    "normalize_resize",
    "plan_crops",
    "preprocess_images",
    "split_image",
    "window_size",
]
