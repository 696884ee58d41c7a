"""Step-3 mixture of experts: router + routed SwiGLU experts + one always-on shared expert.

Router: ``p = softmax(float32(h @ gate^T))`` over all E experts, ``w, idx = top_k(p, K)`` with NO
renormalization, scaling, bias or group limit. Output: ``sum_k w_k * expert_{idx_k}(h) +
shared(h)``.

Two implementations behind one signature (``implementation=``):

* ``"dense"``: the readable oracle: every expert runs on every token and a one-hot routing
  matrix combines them. Cost grows with E; use it for tests and tiny models.
* ``"grouped"`` (default): (token, k) pairs are sorted by expert and each expert multiplies
  only its own rows (`step3_jax.kernels.grouped_gemm.moe_ffn`: a Mosaic GPU FP8/bf16 grouped GEMM
  on Hopper, an XLA tile loop elsewhere). Cost grows with routed tokens, not with E.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from step3_jax.layers.linear import init_weight, project
from step3_jax.layers.mlp import SwiGLU

MOE_IMPLEMENTATIONS = ("dense", "grouped")


def route(
    h: Float[Array, "... D"],
    router_weight: Float[Array, "E D"],
    top_k: int,
    renormalize: bool = False,
) -> tuple[Float[Array, "... K"], Int[Array, "... K"]]:
    """Top-k of the float32 softmax over all experts. Step-3 does NOT renormalize; with
    ``renormalize`` (HF ``norm_expert_weight: true``, vLLM's ``renormalize=``) the k weights
    are divided by their sum."""
    logits = project(h, router_weight, "...D,ED->...E", out_dtype=jnp.float32)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def experts_dense(
    x: Float[Array, "M D"],
    weights: Float[Array, "M K"],
    ids: Int[Array, "M K"],
    w_gate,
    w_up,
    w_down,
) -> Float[Array, "M D"]:
    """Oracle: all experts on all tokens, combined by a one-hot routing matrix [M, E]."""
    num_experts = jnp.shape(w_gate)[0]
    combine = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32) * weights[..., None], 1)
    gate = project(x, w_gate, "MD,EFD->MEF", out_dtype=jnp.float32)
    up = project(x, w_up, "MD,EFD->MEF", out_dtype=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    out = project(hidden, w_down, "MEF,EDF->MED", out_dtype=jnp.float32)
    return jnp.einsum("MED,ME->MD", out, combine).astype(x.dtype)


def experts_grouped(
    x: Float[Array, "M D"],
    weights: Float[Array, "M K"],
    ids: Int[Array, "M K"],
    w_gate,
    w_up,
    w_down,
    implementation: str | None = None,
) -> Float[Array, "M D"]:
    """Sorted, grouped expert computation (see `step3_jax.kernels.grouped_gemm.moe_ffn`)."""
    from step3_jax.kernels.grouped_gemm import moe_ffn  # lazy: kernels import step3_jax.quant
    from step3_jax.quant_model import split_fp8  # FP8 experts: (values, block scales)

    (wg, sg), (wu, su), (wd, sd) = split_fp8(w_gate), split_fp8(w_up), split_fp8(w_down)
    scales = {"w_gate_scale": sg, "w_up_scale": su, "w_down_scale": sd} if sg is not None else {}
    return moe_ffn(x, ids, weights, wg, wu, wd, implementation=implementation, **scales)


class MoE(nnx.Module):
    """Routed experts (stacked, expert axis first) plus the shared expert.

    Weights: ``router [E, D]`` (never quantized), ``gate_proj, up_proj [E, F, D]``,
    ``down_proj [E, D, F]``, ``shared_expert`` a `SwiGLU` of width ``shared_dim`` (0: none).
    ``renormalize``: divide the top-k routing weights by their sum (see `route`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        expert_dim: int,
        shared_dim: int,
        *,
        renormalize: bool = False,
        implementation: str = "grouped",
        kernel_implementation: str | None = None,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        if implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {MOE_IMPLEMENTATIONS}, got {implementation!r}"
            )
        d, e, f = hidden_size, num_experts, expert_dim
        self.top_k, self.dtype, self.renormalize = top_k, dtype, renormalize
        self.implementation, self.kernel_implementation = implementation, kernel_implementation
        self.router = nnx.Param(init_weight(rngs.params(), (e, d), d, param_dtype))
        self.gate_proj = nnx.Param(init_weight(rngs.params(), (e, f, d), d, param_dtype))
        self.up_proj = nnx.Param(init_weight(rngs.params(), (e, f, d), d, param_dtype))
        self.down_proj = nnx.Param(init_weight(rngs.params(), (e, d, f), f, param_dtype))
        self.shared_expert = (
            SwiGLU(d, shared_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if shared_dim
            else None
        )

    def route(self, h: Float[Array, "... D"]) -> tuple[Float[Array, "... K"], Int[Array, "... K"]]:
        return route(h.astype(self.dtype), self.router[...], self.top_k, self.renormalize)

    def __call__(
        self,
        h: Float[Array, "... D"],
        routing: tuple[Array, Array] | None = None,
        implementation: str | None = None,
    ) -> Float[Array, "... D"]:
        """Routed + shared expert output for ``h`` (already normalized).

        ``routing=(weights [..., K] f32, ids [..., K] int32)`` skips the router (the
        disaggregated runtime computes it on the attention side).
        """
        impl = implementation or self.implementation
        if impl not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {MOE_IMPLEMENTATIONS}, got {impl!r}")
        h = h.astype(self.dtype)
        weights, ids = self.route(h) if routing is None else routing
        lead = h.shape[:-1]
        x2 = h.reshape(-1, h.shape[-1])
        w2, i2 = weights.reshape(-1, self.top_k), ids.reshape(-1, self.top_k)
        experts = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        if impl == "dense":
            out = experts_dense(x2, w2, i2, *experts)
        else:
            out = experts_grouped(x2, w2, i2, *experts, implementation=self.kernel_implementation)
        out = out.reshape(*lead, h.shape[-1])
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return out
