"""FP8 / bf16 grouped expert GEMMs for the MoE FFN (Mosaic GPU on Hopper, XLA elsewhere)."""

from step3_jax.kernels.grouped_gemm.api import grouped_matmul, grouped_swiglu, supported
from step3_jax.kernels.grouped_gemm.config import TuningConfig
from step3_jax.kernels.grouped_gemm.moe import moe_ffn, shared_expert_ffn

__all__ = [
    "TuningConfig",
    "grouped_matmul",
    "grouped_swiglu",
    "moe_ffn",
    "shared_expert_ffn",
    "supported",
]
