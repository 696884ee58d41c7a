"""step3_jax: Step-3 (MFA attention + Attention-FFN Disaggregation) decoding in JAX."""

from step3_jax.cache import KVCache
from step3_jax.config import Step3Config
from step3_jax.decode import GenerationResult, decode_step, generate, make_decode_step
from step3_jax.layers import MFAttention, MoE, RMSNorm, SwiGLU
from step3_jax.model import DecoderLayer, Step3Model
from step3_jax.sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "DecoderLayer",
    "GenerationResult",
    "KVCache",
    "MFAttention",
    "MoE",
    "RMSNorm",
    "SamplingConfig",
    "Step3Config",
    "Step3Model",
    "SwiGLU",
    "decode_step",
    "generate",
    "make_decode_step",
]
