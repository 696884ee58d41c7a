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


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Implementation of each kernel-backed op (None everywhere: best for the device)."""

    attention: str | None = None  # MFA over the KV cache for T <= 8 new tokens per sequence
    gemm: str | None = None  # FP8 linears (float weights always run a plain XLA einsum)
    moe: str | None = None  # routed experts
    vision_attention: str | None = None  # the Step3-VL vision tower's attention

    def __post_init__(self):
        for name, allowed in (
            ("attention", IMPLEMENTATIONS),
            ("gemm", GEMM_IMPLEMENTATIONS),
            ("moe", MOE_IMPLEMENTATIONS),
            ("vision_attention", VISION_ATTENTION_IMPLEMENTATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"KernelPolicy.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    @classmethod
    def xla(cls) -> KernelPolicy:
        """Portable XLA everywhere (the grouped XLA MoE path, not the dense oracle)."""
        return cls(attention="xla", gemm="xla", moe="xla", vision_attention="xla")

    @classmethod
    def reference(cls) -> KernelPolicy:
        """The readable oracles: XLA attention and linears, the dense MoE."""
        return cls(attention="xla", gemm="xla", moe="dense", vision_attention="xla")


__all__ = [
    "GEMM_IMPLEMENTATIONS",
    "MOE_IMPLEMENTATIONS",
    "VISION_ATTENTION_IMPLEMENTATIONS",
    "KernelPolicy",
]
