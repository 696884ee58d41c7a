"""Reusable Step-3 layers; each takes explicit arguments (no Step3Config)."""

from step3_jax.layers.mfa import MFAttention, mfa_attention_xla
from step3_jax.layers.mlp import SwiGLU, swiglu
from step3_jax.layers.moe import MoE, experts_dense, route
from step3_jax.layers.norms import RMSNorm, rms_norm
from step3_jax.layers.rope import apply_rope, rope_frequencies

__all__ = [
    "MFAttention",
    "MoE",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "experts_dense",
    "mfa_attention_xla",
    "rms_norm",
    "rope_frequencies",
    "route",
    "swiglu",
]
