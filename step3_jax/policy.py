"""`KernelPolicy`: the one place that chooses kernel implementations.

The model and every executor (single device, the `device_put` reference, the compiled AFD step,
the DP+EP baseline) take one frozen `KernelPolicy`; the layers receive its fields as
``implementation=`` arguments and weights hold only data (values + scales). Each field uses the
kernel packages' vocabulary (`step3_jax.kernels.dispatch`): ``"pallas"`` (error if it cannot
run), ``"xla"``, or ``None`` (the Pallas kernel where it applies on this device and shape, else
XLA). A block-FP8 checkpoint loaded with ``load_hf(fp8="keep")`` therefore runs through the
Pallas FP8 GEMMs on Hopper with the default policy and no further call.
"""

from __future__ import annotations

import dataclasses

from step3_jax.kernels.dispatch import IMPLEMENTATIONS

# FP8 linears: "xla" dequantizes both operands and runs one dot in the compute dtype;
# "xla_fp8" contracts FP8 x FP8 per 128-wide K block with exact float32 scale application
# (a numerics reference; it materializes [KB, M, N] partial sums).
GEMM_IMPLEMENTATIONS = (*IMPLEMENTATIONS, "xla_fp8")
# Routed experts: "pallas"/"xla" run the sorted grouped GEMM (`kernels.grouped_gemm.moe_ffn`);
# "dense" is the readable oracle (every expert on every token, one-hot combine).
MOE_IMPLEMENTATIONS = (*IMPLEMENTATIONS, "dense")
# The vision tower's attention (`step3_jax.vision`): jax.nn.dot_product_attention's cuDNN
# flash kernel or its XLA form; None: cuDNN on a GPU in 16-bit, else XLA.
VISION_ATTENTION_IMPLEMENTATIONS = ("cudnn", "xla", None)
# The vision tower's fc1 + bias + quick_gelu (`step3_jax.vision.layers.VisionMLP`): "pallas"
# runs them as ONE grouped-GEMM launch with the bias and activation in its epilogue
# (`step3_jax.quant_model.linear_activation_fused`; bf16 or block-FP8 weights, the latter only
# where ``gemm`` is not an XLA form), "xla" as a GEMM and one more pass over its output. None:
# Pallas where it can run (Hopper, bf16, widths multiples of 128), else XLA.
# Where a block-FP8 o_proj's input is quantized: "attention" hands it the attention output
# already FP8 (`step3_jax.quant.QuantizedActivations`; the MFA kernel's epilogue writes it
# from its f32 output where its grid allows, else XLA quantizes the bf16 output), "gemm"
# quantizes the bf16 output in front of the GEMM. None: "attention" (the 61-layer attention
# role on an H200: 22.65 -> 21.85 ms, -13 us a layer; docs/LOG.md "FP8 o from the MFA
# epilogue").
O_QUANT = ("attention", "gemm", None)
# Where the MoE layer's shared expert runs: "routed" as one more group of the routed experts'
# two grouped-GEMM launches (`step3_jax.kernels.grouped_gemm.DenseGroup`; it then follows
# ``moe``'s implementation), "own" as a SwiGLU of its own (``gemm``'s linears). None: "own".
# The fused form was built to overlap the shared expert's compute-bound tiles with the routed
# weight stream; on an H100 it was slower everywhere measured (docs/LOG.md, "The shared
# expert in the routed launch"), so it is opt-in.
SHARED_EXPERT = ("routed", "own", None)
# XLA options of the programs whose plain (non-Pallas) GEMMs should be cuBLAS calls on a GPU:
# the compiled AFD step (`step3_jax.sharding.afd`) and the vision tower
# (`step3_jax.vision.model`). XLA's Triton GEMM fusions ran the tower's linears other than
# fc1/fc2 at ~500 TFLOP/s against cuBLAS's ~1,000 (H100, docs/LOG.md "Vision tower"), and
# copied the AFD lm_head's arena view before reading it; the dynamic-slice fusion lets a
# cuBLAS GEMM read such a slice in place.
GPU_COMPILER_OPTIONS = (
    ("xla_gpu_enable_triton_gemm", False),
    ("xla_gpu_enable_dynamic_slice_fusion", True),
)


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Implementation of each kernel-backed op (None everywhere: best for the device)."""

    attention: str | None = None  # MFA over the KV cache for T <= 8 new tokens per sequence
    gemm: str | None = None  # FP8 linears (float weights always run a plain XLA einsum)
    moe: str | None = None  # routed experts
    vision_attention: str | None = None  # the Step3-VL vision tower's attention
    vision_mlp: str | None = None  # the tower's fc1 + quick_gelu (IMPLEMENTATIONS)
    o_quant: str | None = None  # where a block-FP8 o_proj's input is quantized (O_QUANT)
    shared_expert: str | None = None  # where the MoE shared expert runs (SHARED_EXPERT)

    def __post_init__(self):
        for name, allowed in (
            ("attention", IMPLEMENTATIONS),
            ("gemm", GEMM_IMPLEMENTATIONS),
            ("moe", MOE_IMPLEMENTATIONS),
            ("vision_attention", VISION_ATTENTION_IMPLEMENTATIONS),
            ("vision_mlp", IMPLEMENTATIONS),
            ("o_quant", O_QUANT),
            ("shared_expert", SHARED_EXPERT),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"KernelPolicy.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    @classmethod
    def xla(cls) -> KernelPolicy:
        """Portable XLA everywhere (the grouped XLA MoE path, not the dense oracle)."""
        return cls(attention="xla", gemm="xla", moe="xla", vision_attention="xla", vision_mlp="xla")

    @classmethod
    def reference(cls) -> KernelPolicy:
        """The readable oracles: XLA attention and linears, the dense MoE."""
        return cls(
            attention="xla", gemm="xla", moe="dense", vision_attention="xla", vision_mlp="xla"
        )


def compiler_options(
    on_gpu: bool, overrides: tuple[tuple[str, object], ...] = ()
) -> dict[str, object] | None:
    """The ``compiler_options`` of a `jax.jit`: `GPU_COMPILER_OPTIONS` on a GPU, ``overrides``
    (``(name, value)`` pairs) merged over them (these win); None when nothing is left."""
    opts = dict(GPU_COMPILER_OPTIONS) if on_gpu else {}
    opts |= dict(overrides)
    return opts or None


__all__ = [
    "GEMM_IMPLEMENTATIONS",
    "GPU_COMPILER_OPTIONS",
    "MOE_IMPLEMENTATIONS",
    "O_QUANT",
    "SHARED_EXPERT",
    "VISION_ATTENTION_IMPLEMENTATIONS",
    "KernelPolicy",
    "compiler_options",
]
