"""Step-3 mixture of experts: router + routed SwiGLU experts + one always-on shared expert.

Router: ``p = softmax(float32(h @ gate^T))`` over all E experts, ``w, idx = top_k(p, K)`` with NO
renormalization, scaling, bias or group limit. Output: ``sum_k w_k * expert_{idx_k}(h) +
shared(h)``.

Implementations behind one signature (``implementation=``, `step3_jax.policy.KernelPolicy.moe`):

* ``"dense"``: the readable oracle: every expert runs on every token and a one-hot routing
  matrix combines them. Cost grows with E; use it for tests and tiny models.
* ``"pallas"`` / ``"xla"`` / ``None`` (default): (token, k) pairs are sorted by expert and each
  expert multiplies only its own rows (`step3_jax.kernels.grouped_gemm.moe_ffn`: the Mosaic GPU
  FP8/bf16 grouped GEMM, or its XLA tile loop; None picks by the kernels' dispatch rule). Cost
  grows with routed tokens, not with E.

A module may hold only a slice of the experts (an FFN device of the disaggregated runtime):
``first_expert`` says which global expert its first stacked expert is, and tokens routed to
other experts contribute exactly 0. Its expert weights may also be an `ExpertPool`: a device's
experts read in place from a larger stack (the AFD arena), never sliced into a copy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from step3_jax.config import check_sizes, is_int
from step3_jax.kernels.grouped_gemm import moe_ffn
from step3_jax.layers.linear import init_weight, project
from step3_jax.layers.mlp import SwiGLU
from step3_jax.policy import MOE_IMPLEMENTATIONS
from step3_jax.quant import QuantizedActivations
from step3_jax.quant_model import Fp8Weight, split_fp8


@struct.dataclass
class ExpertPool:
    """``count`` experts stored in place inside a larger stack: matrices ``[offset, offset +
    count)`` of ``values [P, N, K]`` (e.g. the AFD arena viewed as matrices), with their own
    FP8 128x128 block scales ``[count, N/128, K/128]`` (None for float weights). The grouped
    GEMM reads them where they are; `materialize` is the sliced copy for the dense oracle."""

    values: Array
    offset: Array  # int32 scalar (may be traced)
    scale: Array | None
    count: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.values.shape[1:])

    def __getitem__(self, index):
        if index is Ellipsis:  # layers read params as ``param[...]``
            return self
        raise TypeError("ExpertPool only supports p[...]; use .materialize()")

    def materialize(self):
        v = jax.lax.dynamic_slice_in_dim(self.values, self.offset, self.count)
        return v if self.scale is None else Fp8Weight(v, self.scale, num_contract=1)


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


def _local_routing(weights, ids, first_expert, num_local: int):
    """Routing restricted to experts ``[first_expert, first_expert + num_local)``: local ids
    and weights, with pairs routed elsewhere given weight 0 (they then add exactly 0)."""
    local = (ids >= first_expert) & (ids < first_expert + num_local)
    return jnp.where(local, weights, 0.0), jnp.where(local, ids - first_expert, 0)


def experts_dense(
    x: Float[Array, "M D"],
    weights: Float[Array, "M K"],
    ids: Int[Array, "M K"],
    w_gate,
    w_up,
    w_down,
    first_expert=0,
    implementation: str | None = None,
) -> Float[Array, "M D"]:
    """Oracle: all (local) experts on all tokens, combined by a one-hot routing matrix [M, E].
    ``implementation``: the GEMM of FP8 expert weights (`KernelPolicy.gemm`)."""
    w_gate, w_up, w_down = (
        w.materialize() if isinstance(w, ExpertPool) else w for w in (w_gate, w_up, w_down)
    )
    num_experts = jnp.shape(w_gate)[0]
    weights, ids = _local_routing(weights, ids, first_expert, num_experts)
    combine = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32) * weights[..., None], 1)
    kw = dict(out_dtype=jnp.float32, implementation=implementation)
    gate = project(x, w_gate, "MD,EFD->MEF", **kw)
    up = project(x, w_up, "MD,EFD->MEF", **kw)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    out = project(hidden, w_down, "MEF,EDF->MED", **kw)
    return jnp.einsum("MED,ME->MD", out, combine).astype(x.dtype)


def experts_grouped(
    x: Float[Array, "M D"],
    weights: Float[Array, "M K"],
    ids: Int[Array, "M K"],
    w_gate,
    w_up,
    w_down,
    first_expert=0,
    implementation: str | None = None,
    shared=None,
) -> Float[Array, "M D"]:
    """Sorted, grouped expert computation (see `step3_jax.kernels.grouped_gemm.moe_ffn`);
    `ExpertPool` weights are read in place at their offsets. ``x`` may be
    `QuantizedActivations` (the AFD packet): FP8 experts on bf16 activations read it as it is,
    anything else its dequantized value. ``shared``: the shared expert's ``(gate, up, down)``
    (`shared_in_routed_launch`), run inside the same launches and added. Returns x's dtype."""
    kw = {}
    if shared is not None:
        parts = [split_fp8(w) for w in shared]
        scales = tuple(sc for _, sc in parts)
        kw["shared"] = tuple(v for v, _ in parts)
        kw["shared_scales"] = None if scales[0] is None else scales
    if isinstance(w_gate, ExpertPool):
        pools = (w_gate, w_up, w_down)
        (wg, sg), (wu, su), (wd, sd) = ((p.values, p.scale) for p in pools)
        kw |= dict(num_local_experts=w_gate.count, weight_offset=tuple(p.offset for p in pools))
    else:
        (wg, sg), (wu, su), (wd, sd) = split_fp8(w_gate), split_fp8(w_up), split_fp8(w_down)
    if sg is not None:
        kw |= {"w_gate_scale": sg, "w_up_scale": su, "w_down_scale": sd}
    out_dtype = x.dtype
    if isinstance(x, QuantizedActivations):
        # The kernels' own path (FP8 experts, bf16 activations) reads the bytes as they are; a
        # float32 model keeps its float32 XLA path on the dequantized value.
        as_is = sg is not None and x.dtype == jnp.bfloat16
        x, kw = (x.values, kw | {"x_scale": x.scales}) if as_is else (x.dequantize(), kw)
    out = moe_ffn(
        x, ids, weights, wg, wu, wd, first_expert=first_expert, implementation=implementation, **kw
    )
    return out.astype(out_dtype)


def _fp8_kind(w) -> str:
    """ "block" for a 2-D block-scaled `Fp8Weight` (or a pool of them), "plain" for an array,
    "other" for any other FP8 format (per-channel, several contracted axes)."""
    if isinstance(w, ExpertPool):
        return "plain" if w.scale is None else "block"
    if isinstance(w, Fp8Weight):
        ok = w.granularity == "block" and w.num_contract == 1
        return "block" if ok else "other"
    return "plain"


def shared_in_routed_launch(shared, routed, choice: str | None):
    """The shared expert's ``(gate, up, down)`` when it runs inside the routed experts'
    grouped launches (`KernelPolicy.shared_expert="routed"`), else None (it runs as its own
    SwiGLU: "own" and None, the measured faster form). It fits when its weights have the
    routed experts' format (both block-FP8 or both float of one dtype) and its width F_s is
    at most the experts' F (and a multiple of 128 when F is: the Pallas kernel's granule, so
    fusing never moves the routed experts off it); "routed" where it does not fit raises."""
    if shared is None or choice != "routed":
        return None
    ws = (shared.gate_proj[...], shared.up_proj[...], shared.down_proj[...])
    r_gate = routed[0]
    kinds = {_fp8_kind(w) for w in ws}
    f, f_s = r_gate.shape[1], ws[0].shape[0]
    values = lambda w: w.values if isinstance(w, (ExpertPool, Fp8Weight)) else w
    same_dtype = len({values(w).dtype for w in (*ws, r_gate)}) == 1
    why = None
    if kinds != {_fp8_kind(r_gate)} or "other" in kinds or not same_dtype:
        why = "the shared expert's weights are not in the routed experts' format"
    elif f_s > f or (f % 128 == 0 and f_s % 128):
        why = f"shared width {f_s} does not fit the experts' F={f} launch"
    if why is not None:
        raise ValueError(f"KernelPolicy.shared_expert='routed': {why}")
    return ws


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
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        d, e, f = hidden_size, num_experts, expert_dim
        check_sizes("MoE", hidden_size=d, num_experts=e, expert_dim=f)
        check_sizes("MoE", minimum=0, shared_dim=shared_dim)  # 0: no shared expert
        if not is_int(top_k) or not 1 <= top_k <= e:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={e}], got {top_k!r}")
        self.hidden_size, self.top_k, self.dtype, self.renormalize = d, top_k, dtype, renormalize
        self.router = nnx.Param(init_weight(rngs.params(), (e, d), d, param_dtype))
        self.gate_proj = nnx.Param(init_weight(rngs.params(), (e, f, d), d, param_dtype))
        self.up_proj = nnx.Param(init_weight(rngs.params(), (e, f, d), d, param_dtype))
        self.down_proj = nnx.Param(init_weight(rngs.params(), (e, d, f), f, param_dtype))
        self.shared_expert = (
            SwiGLU(d, shared_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if shared_dim
            else None
        )

    def _check_input(self, h, routing=None) -> None:
        """Static shapes only (free under jit): ``h [..., D]``; ``routing`` one ``[..., K]``
        pair with a row per token of ``h``."""
        d, k = self.hidden_size, self.top_k
        if jnp.ndim(h) < 1 or jnp.shape(h)[-1] != d:
            raise ValueError(f"MoE: h must be [..., hidden_size={d}], got {jnp.shape(h)}")
        if routing is None:
            return
        tokens = math.prod(jnp.shape(h)[:-1])
        shapes = [jnp.shape(a) for a in routing] if isinstance(routing, tuple | list) else None
        if (
            shapes is None
            or len(shapes) != 2
            or shapes[0] != shapes[1]
            or shapes[0][-1:] != (k,)
            or math.prod(shapes[0]) != tokens * k
        ):
            raise ValueError(
                f"MoE: routing must be (weights, ids), both [..., top_k={k}] with one row per "
                f"token of h {jnp.shape(h)}, got shapes {shapes}"
            )

    def route(self, h: Float[Array, "... D"]) -> tuple[Float[Array, "... K"], Int[Array, "... K"]]:
        self._check_input(h)
        return route(h.astype(self.dtype), self.router[...], self.top_k, self.renormalize)

    def __call__(
        self,
        h: Float[Array, "... D"],
        routing: tuple[Array, Array] | None = None,
        implementation: str | None = None,
        gemm: str | None = None,
        first_expert=0,
        shared: str | None = None,
    ) -> Float[Array, "... D"]:
        """Routed + shared expert output for ``h`` (already normalized), in the module dtype.

        ``routing=(weights [..., K] f32, ids [..., K] int32)`` skips the router (the
        disaggregated runtime computes it on the attention side). ``implementation``: the
        routed experts' (`KernelPolicy.moe`); ``gemm``: FP8 linears' (`KernelPolicy.gemm`);
        ``shared``: where the shared expert runs (`KernelPolicy.shared_expert`).
        ``first_expert`` (may be traced): global id of this module's first stacked expert.
        """
        if implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"MoE: implementation must be one of {MOE_IMPLEMENTATIONS}, got {implementation!r}"
            )
        self._check_input(h, routing)
        h = h.astype(self.dtype)
        if routing is None:
            plain = h.dequantize() if isinstance(h, QuantizedActivations) else h
            routing = self.route(plain)
        weights, ids = routing
        lead = h.shape[:-1]
        x2 = h.reshape(-1, h.shape[-1])
        w2, i2 = weights.reshape(-1, self.top_k), ids.reshape(-1, self.top_k)
        experts = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        fused = None
        if implementation != "dense":
            fused = shared_in_routed_launch(self.shared_expert, experts, shared)
        elif shared == "routed":
            raise ValueError("KernelPolicy.shared_expert='routed' needs grouped routed experts")
        with jax.named_scope("routed_experts"):
            if implementation == "dense":
                out = experts_dense(x2, w2, i2, *experts, first_expert, implementation=gemm)
            else:
                out = experts_grouped(x2, w2, i2, *experts, first_expert, implementation, fused)
            out = out.reshape(*lead, h.shape[-1])
        if self.shared_expert is not None and fused is None:
            with jax.named_scope("shared_expert"):
                out = out + self.shared_expert(h, implementation=gemm)
        return out
