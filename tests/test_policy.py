"""`step3_jax.policy`: the one definition of the GPU compiler options every program uses."""

from step3_jax.policy import GPU_COMPILER_OPTIONS, compiler_options


def test_gpu_compiler_options_merge_under_overrides():
    assert compiler_options(False) is None
    assert compiler_options(True) == dict(GPU_COMPILER_OPTIONS)
    assert compiler_options(True)["xla_gpu_enable_triton_gemm"] is False
    over = (("xla_gpu_enable_triton_gemm", True), ("xla_backend_optimization_level", 0))
    assert compiler_options(True, over)["xla_gpu_enable_triton_gemm"] is True
    assert compiler_options(False, over) == dict(over)
