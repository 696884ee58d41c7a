"""Step3-VL's vision half: the ViT, the convolutional downsamplers, the projector, image
preprocessing and the multimodal wrapper around `step3_jax.Step3Model` (docs/vision.md)."""

from step3_jax.vision.config import NUM_PREFIX_TOKENS, Step3VisionConfig
from step3_jax.vision.encoder import Step3VisionModel, VisionTransformer
from step3_jax.vision.layers import Conv2d, LayerNorm, Linear, VisionAttention, VisionEncoderLayer

__all__ = [
    "NUM_PREFIX_TOKENS",
    "Conv2d",
    "LayerNorm",
    "Linear",
    "Step3VisionConfig",
    "Step3VisionModel",
    "VisionAttention",
    "VisionEncoderLayer",
    "VisionTransformer",
]
