from step3_jax.kernels.grouped_gemm import grouped_matmul, grouped_swiglu, moe_ffn  # noqa: F401
from step3_jax.kernels.mfa_decode import mfa_decode_attention  # noqa: F401
