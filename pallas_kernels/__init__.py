from pallas_kernels.grouped_gemm import grouped_matmul, grouped_swiglu, moe_ffn  # noqa: F401
from pallas_kernels.mfa_decode import mfa_decode_attention  # noqa: F401
