from pallas_kernels.grouped_gemm import grouped_matmul, grouped_swiglu, moe_ffn  # noqa: F401
