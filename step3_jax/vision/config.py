"""Step3-VL vision configuration: the ViT, the two convolutional downsamplers, the projector.

Only `Step3VisionConfig.from_hf_config` knows the Hugging Face key names (the release's
``vision_config`` dict plus the top-level ``understand_projector_stride``, ``projector_bias``
and ``image_token_id`` of ``Step3VLConfig``). Axis letters of the vision code (docs/vision.md):
B images, C RGB channels, P pixels per side, G patch-grid side, T tokens, D ViT width,
N heads, H head dim, F MLP hidden, O downsampler channels, M text hidden (the projector output).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from step3_jax.config import HF_MAX, brief, is_int, is_real, mapping_or_none

# The ViT prepends ONE class token and then, for tensor-parallel padding, 3 more copies of it
# ("pad_tp_size = 4" hard-coded in vLLM's Step3VisionEmbeddings); all 4 attend and are attended
# to (no mask) and are dropped after the last layer (``vision_model(x)[:, 4:]``).
NUM_PREFIX_TOKENS = 4
ACTIVATIONS = ("quick_gelu",)
# Upper bounds of the integer fields, far above the release (D 1792, F 15360, 63 layers, 16
# heads, patch 14, 728 px, O 4096, stride 2, M 7168, token 128001) and checked before anything
# is sized from them: a corrupt config.json must raise, not build a million-layer table.
_VISION_MAX = {
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "num_layers": 2**12,
    "num_heads": 2**12,
    "num_channels": 2**10,
    "patch_size": 2**10,
    "image_size": 2**14,
    "crop_size": 2**14,
    "output_hidden_size": 2**17,
    "projector_stride": 2**6,
    "text_hidden_size": HF_MAX["hidden_size"],
    "image_token_id": HF_MAX["vocab_size"] - 1,
}
# HF key -> (field, default) of ``vision_config`` (defaults: vLLM's Step3VisionEncoderConfig),
# then of the top level of ``config.json`` (the projector stride's default: see `step3`).
_HF_VISION_KEYS = {
    "hidden_size": ("hidden_size", 1792),
    "intermediate_size": ("intermediate_size", 3072),
    "num_hidden_layers": ("num_layers", 63),
    "num_attention_heads": ("num_heads", 16),
    "num_channels": ("num_channels", 3),
    "patch_size": ("patch_size", 14),
    "image_size": ("image_size", 728),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
    "hidden_act": ("hidden_act", "quick_gelu"),
    "output_hidden_size": ("output_hidden_size", 4096),
    "enable_patch": ("enable_patch", True),
}
_HF_TOP_KEYS = {
    "understand_projector_stride": ("projector_stride", 2),
    "projector_bias": ("projector_bias", True),
    "image_token_id": ("image_token_id", 128001),
}


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class Step3VisionConfig:
    hidden_size: int = 1792  # D: ViT width
    intermediate_size: int = 15360  # F: ViT MLP hidden (fc1 -> quick_gelu -> fc2)
    num_layers: int = 63  # ViT encoder layers
    num_heads: int = 16  # N: attention heads, head dim D / N = 112
    num_channels: int = 3  # C: RGB
    patch_size: int = 14  # pixels per patch side (the patch-embedding conv's kernel and stride)
    image_size: int = 728  # P of the global view; the position table covers (P/14)^2 + 1 rows
    crop_size: int = 504  # P of each crop of a large image (the processor's "patch_size")
    layer_norm_eps: float = 1e-5  # both LayerNorms of every ViT layer
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x)
    output_hidden_size: int = 4096  # O: vit_downsampler's output channels (downsampler2: 2 O)
    projector_stride: int = 2  # vit_downsampler stride ("understand_projector_stride")
    projector_bias: bool = True  # vit_large_projector has a bias
    text_hidden_size: int = 7168  # M: the text model's embedding width (projector output)
    image_token_id: int = 128001  # "<im_patch>": prompt positions that take image features
    enable_patch: bool = True  # crops of large images (vision_config.enable_patch)

    def __post_init__(self):
        for name in _CHECKED_FIELDS:
            problem = _field_problem(name, getattr(self, name))
            if problem:
                got = brief(getattr(self, name))
                raise ValueError(f"Step3VisionConfig.{name} {problem}, got {got}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}"
            )
        for name in ("image_size", "crop_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of "
                    f"patch_size={self.patch_size}"
                )

    # ----------------------------------------------------------------- presets
    @classmethod
    def step3(cls) -> Step3VisionConfig:
        """The released Step3-VL vision half (bf16 in both the bf16 and the FP8 release).

        ``intermediate_size=15360``: vLLM's `Step3VisionEncoderConfig` default is 3072, but
        the release states 321B (VLM) - 316B (LLM) = 5B for the vision half; with 15360 the
        tower + downsamplers + projector hold 4.7B parameters (with 3072: 1.9B), the shape of an
        EVA02-E ViT at width 1792. `from_hf_config` reads the real value from ``config.json``.
        ``projector_stride=2``: the only stride for which the processor's 169 placeholder
        tokens per 728 px view (81 per 504 px crop) equal the projector's output
        (52 -> 26 -> 13; stride 1 would give 52 -> 51 -> 26).
        """
        return cls()

    @classmethod
    def tiny(cls, text_hidden_size: int = 128, image_token_id: int = 7) -> Step3VisionConfig:
        """Same structure and the same token layout (728/504 px, patch 14: 169/81 tokens) at toy
        width, for tests and CPU runs (``Step3Config.tiny()`` has hidden 128)."""
        return cls(
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            output_hidden_size=16,
            text_hidden_size=text_hidden_size,
            image_token_id=image_token_id,
        )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> Step3VisionConfig:
        """From a Step3-VL ``config.json`` dict: ``vision_config`` + the top-level projector keys
        (absent or null keys take vLLM's defaults, except the stride, whose vLLM default 1 would
        not produce the processor's token counts: absent, it is 2).

        Every key is type-checked (integers are not truncated, booleans must be true/false) and
        bounded before anything is sized from it; a ValueError names the key, e.g.
        ``vision_config.num_hidden_layers``."""
        if "vision_config" not in hf:
            raise ValueError("config has no 'vision_config': not a Step3-VL (image) checkpoint")
        v, text = hf["vision_config"], mapping_or_none(hf.get("text_config"), "text_config")
        if not isinstance(v, Mapping):  # required, unlike text_config
            raise ValueError(f"config key 'vision_config' must be a mapping, got {brief(v)}")
        fields = {}
        for prefix, sub, keys in (("vision_config.", v, _HF_VISION_KEYS), ("", hf, _HF_TOP_KEYS)):
            for key, (name, default) in keys.items():
                value = sub.get(key)
                fields[name] = _hf_value(
                    f"{prefix}{key}", name, default if value is None else value
                )
        m_key, m = "text_config.hidden_size", text.get("hidden_size")
        if m is None:  # the projector's output width: the text model's D
            m_key, m = "hidden_size", hf.get("hidden_size")
        fields["text_hidden_size"] = _hf_value(m_key, "text_hidden_size", 7168 if m is None else m)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The VL keys of ``config.json`` (merge into the text model's `to_hf_config`)."""
        return {
            "architectures": ["Step3VLForConditionalGeneration"],
            "model_type": "step3_vl",
            "understand_projector_stride": self.projector_stride,
            "projector_bias": self.projector_bias,
            "image_token_id": self.image_token_id,
            "vision_config": {
                "model_type": "step3_vision_encoder",
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "output_hidden_size": self.output_hidden_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_channels": self.num_channels,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps,
                "enable_patch": self.enable_patch,
            },
        }

    # ----------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid(self) -> int:
        """Side of the learned position table's patch grid (52 for the release)."""
        return self.image_size // self.patch_size

    def grid(self, pixels: int) -> int:
        """Patch-grid side G of a ``pixels`` x ``pixels`` input."""
        if pixels % self.patch_size:
            raise ValueError(
                f"image side {pixels} is not a multiple of patch_size={self.patch_size}"
            )
        return pixels // self.patch_size

    def feature_grid(self, pixels: int) -> int:
        """Side of the projector's output grid: G -> k2/stride conv -> k3 s2 p1 conv."""
        g = _conv_out(self.grid(pixels), 2, self.projector_stride, 0)
        return _conv_out(g, 3, 2, 1)

    def tokens_per_view(self, pixels: int) -> int:
        """Image-feature tokens of one ``pixels``-sided view (169 at 728, 81 at 504)."""
        return self.feature_grid(pixels) ** 2

    def param_count(self) -> int:
        d, f, o = self.hidden_size, self.intermediate_size, self.output_hidden_size
        m = self.text_hidden_size
        layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        embed = (
            d + (self.num_channels * self.patch_size**2 * d + d) + (self.position_grid**2 + 1) * d
        )
        down = (d * o * 4 + o) + (o * 2 * o * 9 + 2 * o)
        proj = 2 * o * m + (m if self.projector_bias else 0)
        return embed + self.num_layers * layer + down + proj


def _field_problem(name: str, value) -> str | None:
    """What is wrong with ``value`` for field ``name`` (type and bounds), or None: the one
    check behind `Step3VisionConfig.__post_init__` and `from_hf_config`."""
    if name in _VISION_MAX:
        low, hi = int(name != "image_token_id"), _VISION_MAX[name]
        ok = is_int(value) and low <= value <= hi
        return None if ok else f"must be an integer in [{low}, {hi}]"
    if name == "layer_norm_eps":
        ok = is_real(value) and math.isfinite(value) and 0 < value <= 1
        return None if ok else "must be a finite number in (0, 1]"
    if name == "hidden_act":
        ok = isinstance(value, str) and value in ACTIVATIONS
        return None if ok else f"must be one of {ACTIVATIONS}"
    # projector_bias, enable_patch: bool("false") is True
    return None if isinstance(value, bool) else "must be true or false"


_CHECKED_FIELDS = (*_VISION_MAX, "layer_norm_eps", "hidden_act", "projector_bias", "enable_patch")


def _hf_value(key: str, name: str, value):
    """One ``config.json`` value for field ``name`` (ValueError naming the HF ``key``)."""
    problem = _field_problem(name, value)
    if problem:
        raise ValueError(f"config key {key!r} {problem}, got {brief(value)}")
    return int(value) if name in _VISION_MAX else value


__all__ = ["NUM_PREFIX_TOKENS", "Step3VisionConfig"]
