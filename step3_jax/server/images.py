"""Images of a chat request: OpenAI ``image_url`` content parts holding ``data:`` URLs.

Only ``data:image/<png|jpeg|webp>;base64,...`` URLs are accepted. The server never fetches an
``http(s)`` URL: a server that downloads whatever a client names can be pointed at internal
services (server-side request forgery), so the client sends the bytes itself.

Every check fails with `ImageInputError` naming the offending field (HTTP 400 or 413), never
an unhandled exception: the URL's form, its media type, the base64, the size before and after
decoding (``max_bytes``), the image count (``max_images``), the format Pillow finds (PNG, JPEG
or WebP only: no other decoder plugin sees client bytes), the pixel count read from the header
BEFORE decoding (``max_pixels``, a decompression-bomb guard), the decoding itself and the mode
(`step3_jax.vision.preprocess.load_image`: one 8-bit RGB reading, as generation uses).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from step3_jax.vision.preprocess import load_image

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_IMAGES = 8
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # decoded bytes of one image
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb threshold
_DATA_URL = re.compile(r"(?i:data):(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


class ImageInputError(ValueError):
    """A bad image in a request: ``param`` names the field, ``status`` the HTTP status."""

    def __init__(self, message: str, param: str, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL."""
    if re.match(r"(?i)https?://", url):
        raise ImageInputError("remote image URLs are not fetched; send a data: URL", param)
    m = _DATA_URL.fullmatch(url)
    if m is None:
        scheme = url.split(":", 1)[0][:20] if ":" in url else url[:20]
        raise ImageInputError(
            f"image_url must be a data: URL (data:image/png;base64,...), got {scheme!r}...", param
        )
    media = m["type"].strip().lower()
    if media not in MEDIA_TYPES:
        raise ImageInputError(
            f"unsupported image media type {media!r}; send image/png, image/jpeg or image/webp",
            param,
        )
    if "base64" not in [p.strip().lower() for p in m["params"].split(";") if p]:
        raise ImageInputError("the data: URL must be base64-encoded (data:...;base64,...)", param)
    data = m["data"]
    if len(data) > 4 * (max_bytes // 3 + 1) + 4:  # refuse before decoding it
        raise ImageInputError(
            f"image is {len(data)} base64 characters: more than the limit of {max_bytes} bytes",
            param,
            status=413,
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"image_url holds invalid base64: {e}", param) from None
    if len(raw) > max_bytes:
        raise ImageInputError(
            f"image is {len(raw)} bytes, more than the limit of {max_bytes}", param, status=413
        )
    if not raw:
        raise ImageInputError("image_url holds no data", param)
    return raw


def decode_image(raw: bytes, param: str, max_pixels: int) -> Image.Image:
    """An 8-bit RGB Pillow image from PNG/JPEG/WebP bytes (the checks of the module doc)."""
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"image is too large: {e}", param, status=413) from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ImageInputError(
            f"image_url does not hold a PNG, JPEG or WebP image ({type(e).__name__}: {e})", param
        ) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageInputError(
            f"image is {w} x {h} = {w * h} pixels, more than the limit of {max_pixels}",
            param,
            status=413,
        )
    try:
        img.load()
        return load_image(img)
    except ValueError as e:  # an unsupported mode (16-bit, float), an empty image
        raise ImageInputError(str(e), param) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # truncated, corrupt
        raise ImageInputError(f"cannot decode image: {e}", param) from None


def load_request_images(
    urls: list[tuple[str, str]],
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Image.Image]:
    """``urls``: ``(url, param)`` per image part in message order -> RGB images."""
    if len(urls) > max_images:
        raise ImageInputError(
            f"{len(urls)} images in one request; at most {max_images} are allowed", "messages"
        )
    return [decode_image(decode_data_url(u, p, max_bytes), p, max_pixels) for u, p in urls]


__all__ = [
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_BYTES",
    "ImageInputError",
    "decode_data_url",
    "decode_image",
    "load_request_images",
]
