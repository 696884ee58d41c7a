"""MFA decode attention (64 query heads sharing one K/V head) against a bf16 or FP8 KV cache."""

from step3_jax.kernels.mfa_decode.api import mfa_decode_attention, supported
from step3_jax.kernels.mfa_decode.config import TuningConfig
from step3_jax.kernels.mfa_decode.reference import mfa_decode_reference

__all__ = ["TuningConfig", "mfa_decode_attention", "mfa_decode_reference", "supported"]
