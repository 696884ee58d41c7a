"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, no biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from step3_jax.layers.linear import init_weight, project
from step3_jax.quant_model import swiglu_hidden_fused


def swiglu(
    x: Float[Array, "... D"], w_gate, w_up, w_down, implementation: str | None = None
) -> Float[Array, "... D"]:
    """``w_gate, w_up: [F, D]``, ``w_down: [D, F]`` ([out, in] layout). ``implementation``:
    the GEMM of quantized weights (`step3_jax.layers.linear.project`). Block-FP8 gate and up
    on the Pallas path run as one fused kernel (`step3_jax.quant_model.swiglu_hidden_fused`)."""
    kw = dict(implementation=implementation)
    hidden = swiglu_hidden_fused(x, w_gate, w_up, implementation)  # FP8 on Hopper: one kernel
    if hidden is None:
        gate = project(x, w_gate, "...D,FD->...F", out_dtype=jnp.float32, **kw)
        up = project(x, w_up, "...D,FD->...F", out_dtype=jnp.float32, **kw)
        hidden = jax.nn.silu(gate) * up
    return project(hidden.astype(x.dtype), w_down, "...F,DF->...D", **kw)


class SwiGLU(nnx.Module):
    """Dense SwiGLU MLP (Step-3's dense layers and its shared expert)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        d, f = hidden_size, intermediate_size
        self.dtype = dtype
        self.gate_proj = nnx.Param(init_weight(rngs.params(), (f, d), d, param_dtype))
        self.up_proj = nnx.Param(init_weight(rngs.params(), (f, d), d, param_dtype))
        self.down_proj = nnx.Param(init_weight(rngs.params(), (d, f), f, param_dtype))

    def __call__(
        self, x: Float[Array, "... D"], implementation: str | None = None
    ) -> Float[Array, "... D"]:
        ws = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        return swiglu(x.astype(self.dtype), *ws, implementation=implementation)
