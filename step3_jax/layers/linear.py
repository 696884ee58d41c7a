"""The one place a weight meets an activation.

Every weight in step3_jax is stored ``[out, in]`` (contraction axis last, "K-major"): the layout
of the HF checkpoint, of Hopper FP8 tensor-core operands and of XLA's fast FP8 dot. A weight is
either a plain array or a quantized-weight pytree (see `step3_jax.quant_model`) that knows how to
contract itself; layers call `project` and never look inside.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from step3_jax.quant import QuantizedActivations


@runtime_checkable
class ProjectableWeight(Protocol):
    """A weight that contracts itself with an activation (e.g. FP8 values + block scales)."""

    def project(
        self, x: Array, eqn: str, out_dtype, implementation: str | None = None
    ) -> Array: ...


def project(x: Array, w, eqn: str, out_dtype=None, implementation: str | None = None) -> Array:
    """``einsum(eqn, x, w)`` in the activation's dtype with float32 accumulation. ``x`` may be
    `step3_jax.quant.QuantizedActivations` (already FP8, e.g. the AFD packet): an FP8 weight's
    kernel reads it as it is, anything else its dequantized value.

    ``implementation`` picks the GEMM of a quantized weight (`step3_jax.policy.KernelPolicy.gemm`:
    "pallas" | "xla" | "xla_fp8" | None); a float weight always runs this plain einsum."""
    out_dtype = out_dtype or x.dtype
    if isinstance(w, ProjectableWeight):
        return w.project(x, eqn, out_dtype, implementation)
    if isinstance(x, QuantizedActivations):  # FP8 activations meet a float weight
        x = x.dequantize()
    w = jnp.asarray(w)
    return jnp.einsum(
        eqn, x, w.astype(x.dtype), preferred_element_type=_dot_output_dtype(x.dtype, out_dtype)
    ).astype(out_dtype)


def _dot_output_dtype(x_dtype, out_dtype):
    """The dot's own output type: ``out_dtype`` itself when it is the activation's narrow
    float type (bf16/f16), else float32. Either way the products accumulate in float32 (cuBLAS,
    Triton and the CPU's dot all do for 16-bit floats); what changes is what the GEMM writes. A
    float32 output converted afterwards is twice the bytes and one more pass: the vision tower's
    fc1 wrote [2,712, 15,360] float32 and then spent 82 us a layer converting it to bf16 with the
    bias added (H100, `bench_vision_mlp.py`), where a bf16 output takes the bias in the cuBLAS
    epilogue."""
    if out_dtype == x_dtype and jnp.dtype(out_dtype).itemsize < 4:
        return out_dtype
    return jnp.float32


def init_weight(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
    """Truncated-normal init with std 1/sqrt(fan_in)."""
    std = fan_in**-0.5
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)
