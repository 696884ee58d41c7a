"""Step3-VL's vision half: the ViT, the convolutional downsamplers, the projector, image
preprocessing and the multimodal wrapper around `step3_jax.Step3Model` (docs/vision.md).

`step3_jax.vision.generate.generate` generates with images (the submodule keeps its name: it is
not re-exported here, so it does not shadow `step3_jax.generate`)."""

from step3_jax.vision.config import NUM_PREFIX_TOKENS, Step3VisionConfig
from step3_jax.vision.encoder import Step3VisionModel, VisionTransformer
from step3_jax.vision.layers import Conv2d, LayerNorm, Linear, VisionAttention, VisionEncoderLayer
from step3_jax.vision.model import Step3VLModel
from step3_jax.vision.preprocess import (
    ImageLayout,
    ImageSpecialTokens,
    PreprocessedImages,
    expand_prompt,
    load_image,
    preprocess_images,
)

__all__ = [
    "NUM_PREFIX_TOKENS",
    "Conv2d",
    "ImageLayout",
    "ImageSpecialTokens",
    "LayerNorm",
    "Linear",
    "PreprocessedImages",
    "Step3VLModel",
    "Step3VisionConfig",
    "Step3VisionModel",
    "VisionAttention",
    "VisionEncoderLayer",
    "VisionTransformer",
    "expand_prompt",
    "load_image",
    "preprocess_images",
]
