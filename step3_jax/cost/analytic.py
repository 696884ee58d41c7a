"""The paper's analytic decode cost model (arXiv 2507.19427, sections 4 and 5).

Everything is per decoded token at context length ``ctx`` (tokens already in the cache),
embedding and LM head ignored, 8-bit weights and KV unless a spec says otherwise:

- KV/state bytes read: per softmax layer ``min(ctx, window) * kv_values_per_token * kv_bytes``;
  per linear-attention layer the state is read and written once: ``2 * state_bytes``.
- Attention FLOPs (no linears): ``2 (QK and PV) * 2 * heads * qk_dim * attended_len`` per
  layer; MLA uses its 576-wide latent for both products, as the paper does. Linear attention:
  ``LINEAR_ATTN_FLOPS_PER_D2 * heads * head_dim**2`` per layer.
- Linear FLOPs (projections before/after attention): ``2 * linear_params`` per layer.
- FFN FLOPs: ``2 * activated FFN params`` (dense layers, and for MoE layers top_k routed plus
  the shared width); the router is left out, which is what reproduces the printed rows.

Costs follow the paper: attention = max(core FLOPs * U_FLOP, KV bytes * U_byte) + linear FLOPs *
U_FLOP; FFN = FFN FLOPs * U_FLOP (AFD batches the FFN into its compute-bound regime); AFD picks
the cheapest hardware for each side independently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from step3_jax.cost.hardware import HardwareSpec
from step3_jax.cost.specs import LINEAR_ATTN_FLOPS_PER_D2, AttentionGroup, FFNSpec, ModelSpec

PER_MILLION = 1e6


def _check_ctx(ctx: int) -> None:
    if not (isinstance(ctx, int | float) and ctx >= 0):
        raise ValueError(f"ctx must be a context length >= 0 (tokens), got {ctx!r}")


def _attended(group: AttentionGroup, ctx: float) -> float:
    return ctx if group.window is None else min(ctx, group.window)


# ----------------------------------------------------------------- bytes and FLOPs
def kv_bytes_per_token(spec: ModelSpec, ctx: int) -> float:
    """KV-cache (and linear-attention state) bytes read to decode one token at ``ctx``."""
    _check_ctx(ctx)
    total = 0.0
    for g in spec.attention:
        if g.kind == "linear":
            total += g.num_layers * 2 * g.state_bytes  # read + write of the recurrent state
        else:
            total += g.num_layers * _attended(g, ctx) * g.kv_values_per_token * g.kv_bytes
    return total


def kv_bytes_per_token_layer(group: AttentionGroup) -> float:
    """Bytes one token adds to ONE layer's cache (Step-3: 512, DeepSeek-V3: 576)."""
    return group.kv_values_per_token * group.kv_bytes


def attention_flops(spec: ModelSpec, ctx: int) -> float:
    """Attention-core FLOPs (QK^T and PV, no projections) for one token at ``ctx``."""
    _check_ctx(ctx)
    total = 0.0
    for g in spec.attention:
        if g.kind == "linear":
            total += g.num_layers * LINEAR_ATTN_FLOPS_PER_D2 * g.num_heads * g.qk_dim**2
        else:
            total += g.num_layers * 2 * 2 * g.num_heads * g.qk_dim * _attended(g, ctx)
    return total


def linear_flops(spec: ModelSpec) -> float:
    """FLOPs of the projections before and after attention, one token, all layers."""
    return sum(2.0 * g.linear_params * g.num_layers for g in spec.attention)


def ffn_params_activated(ffn: FFNSpec, hidden: int) -> tuple[float, float]:
    """(activated FFN params per dense layer, per MoE layer): SwiGLU = 3 * hidden * width."""
    dense = 3.0 * hidden * ffn.dense_intermediate
    moe = 3.0 * hidden * (ffn.top_k * ffn.moe_intermediate + ffn.shared_intermediate)
    return dense, moe


def ffn_params_total(ffn: FFNSpec, hidden: int) -> tuple[float, float]:
    """(FFN weights per dense layer, per MoE layer, all experts): what an FFN side stores."""
    dense = 3.0 * hidden * ffn.dense_intermediate
    moe = 3.0 * hidden * (ffn.num_experts * ffn.moe_intermediate + ffn.shared_intermediate)
    return dense, moe


def ffn_flops(spec: ModelSpec) -> float:
    """FFN FLOPs for one token: 2 * activated params over every layer (router ignored)."""
    dense, moe = ffn_params_activated(spec.ffn, spec.hidden_size)
    return 2.0 * (spec.ffn.dense_layers * dense + spec.ffn.moe_layers * moe)


def arithmetic_intensity(spec: ModelSpec, ctx: int = 8192) -> float:
    """Attention-core FLOPs per KV byte (Step-3 128, DeepSeek-V3 512, Qwen3 MoE 32)."""
    return attention_flops(spec, ctx) / kv_bytes_per_token(spec, ctx)


# ----------------------------------------------------------------- dollars
@dataclasses.dataclass(frozen=True)
class CostBreakdown:
    """USD per decoded token on one accelerator (multiply by 1e6 for the paper's tables)."""

    model: str
    hardware: str
    ctx: int
    attention: float
    ffn: float

    @property
    def total(self) -> float:
        return self.attention + self.ffn


def attention_cost(spec: ModelSpec, hw: HardwareSpec, ctx: int) -> float:
    """max(core FLOPs * U_FLOP, KV bytes * U_byte) + linear FLOPs * U_FLOP, USD per token."""
    core = max(
        attention_flops(spec, ctx) * hw.usd_per_flop,
        kv_bytes_per_token(spec, ctx) * hw.usd_per_byte,
    )
    return core + linear_flops(spec) * hw.usd_per_flop


def ffn_cost(spec: ModelSpec, hw: HardwareSpec) -> float:
    """FFN FLOPs * U_FLOP, USD per token (compute-bound: AFD batches enough tokens)."""
    return ffn_flops(spec) * hw.usd_per_flop


def cost_per_token(spec: ModelSpec, hw: HardwareSpec, ctx: int) -> CostBreakdown:
    """Both sides on the same hardware."""
    return CostBreakdown(spec.name, hw.name, ctx, attention_cost(spec, hw, ctx), ffn_cost(spec, hw))


@dataclasses.dataclass(frozen=True)
class AFDChoice:
    """The cheapest (attention hardware, FFN hardware) pair and its USD per token."""

    model: str
    ctx: int
    attention_hw: str
    ffn_hw: str
    attention: float
    ffn: float

    @property
    def total(self) -> float:
        return self.attention + self.ffn


def afd_cost(spec: ModelSpec, hardware: Sequence[HardwareSpec], ctx: int) -> AFDChoice:
    """AFD: attention and FFN each on its own cheapest hardware (paper: Step-3 8K 0.055/1M)."""
    if not hardware:
        raise ValueError("afd_cost needs at least one HardwareSpec in `hardware`")
    att = min(hardware, key=lambda h: attention_cost(spec, h, ctx))
    ffn = min(hardware, key=lambda h: ffn_cost(spec, h))
    return AFDChoice(
        spec.name, ctx, att.name, ffn.name, attention_cost(spec, att, ctx), ffn_cost(spec, ffn)
    )


# ----------------------------------------------------------------- batching and sparsity
def b_dense(hw: HardwareSpec) -> float:
    """Tokens per batch for a dense FFN to reach the roofline with 8-bit weights: ridge / 2."""
    return hw.roofline / 2.0


def b_moe(hw: HardwareSpec, sparsity: float) -> float:
    """Tokens per batch an MoE of activated fraction ``sparsity`` needs: B_dense / S."""
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
    return b_dense(hw) / sparsity


def comm_budget_s(tpot_s: float = 0.050, stages: int = 3) -> float:
    """The network time the sparsity rule allows, in seconds: 2/3 of one pipeline stage.

    Traffic per layer is 3 * B_MoE * H bytes (8-bit out, 16-bit back) with B_MoE = ridge/(2S),
    so ``L * traffic / Net <= stage`` becomes ``S >= H * ridge * L / (Net * (2/3) * stage)``:
    with 50 ms / 3 stages that is the paper's 11.1 ms.
    """
    if tpot_s <= 0 or stages <= 0:
        raise ValueError(f"tpot_s and stages must be > 0, got {tpot_s}, {stages}")
    return tpot_s / stages * 2.0 / 3.0


def min_sparsity(
    hw: HardwareSpec, hidden: int = 7168, layers: int = 61, tpot_s: float = 0.050, stages: int = 3
) -> float:
    """Lowest MoE sparsity S whose AFD traffic hides under the pipeline (paper Table 7).

    ``S >= H * ridge * L / (Net * 11.1 ms)``; Step-3's H=7168, L=61 give H800 0.058,
    H20 0.007, A800 0.031, 910B 0.034.
    """
    return hidden * hw.roofline * layers / (hw.net_bw * comm_budget_s(tpot_s, stages))


def min_active_experts(spec: ModelSpec, hw: HardwareSpec, **kw) -> int:
    """Routed experts per token a spec would need on ``hw`` to meet `min_sparsity` (DSv3: 14).

    Solves (k + shared) / (experts + shared) >= S for the smallest integer k.
    """
    ffn = spec.ffn
    if not ffn.moe_layers:
        raise ValueError(f"{spec.name} has no MoE layers")
    s = min_sparsity(hw, spec.hidden_size, spec.num_layers, **kw)
    shared = ffn.num_shared_experts
    return max(1, math.ceil(s * (ffn.num_experts + shared) - shared - 1e-9))


def pipeline_budget_s(tpot_s: float = 0.050, layers: int = 61, stages: int = 3) -> float:
    """Seconds per layer per pipeline stage for a TPOT target (paper: ~272 us for Step-3)."""
    if tpot_s <= 0 or layers <= 0 or stages <= 0:
        raise ValueError(f"tpot_s, layers and stages must be > 0, got {tpot_s}, {layers}, {stages}")
    return tpot_s / stages / layers
