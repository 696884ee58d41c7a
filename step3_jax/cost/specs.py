"""Model specs for the decode cost model: what one decoded token reads and computes.

A `ModelSpec` is a frozen description at the granularity the Step-3 paper (arXiv 2507.19427,
section 4) costs a model: groups of attention layers (kind, heads, the width of each QK/PV dot
product, the K/V values stored per token, bytes per stored value, an optional window, linear
state for linear attention) and an FFN (dense layers, MoE layers, routed/shared experts, top-k).
Embedding and LM head are left out, as in the paper.

Named specs (`MODELS`) are built from excerpts of the public HF ``config.json`` files, kept
below under their HF key names so anyone can check them against the source; the builders turn
those keys into specs. Each one reproduces its row of the paper's Table 2, which cross-checks
both the config values and our reading of the paper's conventions (tests pin that).

Quantization follows the paper's section 4.1: everything 8-bit (FP8, or INT8 on hardware
without FP8) except Llama 4 Maverick's global (NoPE) attention layers and MiniMax M1's softmax
layers, whose KV cache stays BF16, and MiniMax M1's lightning-attention state, FP32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from step3_jax.config import Step3Config

AttentionKind = Literal["MHA", "GQA", "MQA", "MLA", "MFA", "linear"]
_KINDS = ("MHA", "GQA", "MQA", "MLA", "MFA", "linear")

# FLOPs per (head x head_dim^2) of one lightning/linear-attention decode step. The paper does
# not spell this out; 10 = 2 FLOPs x 5 d^2 element operations (decay the state, form k^T v,
# accumulate it, then q.S as a d x d mat-vec counted 2 d^2) is the count that reproduces
# MiniMax M1's Table 2/3 attention FLOPs (3.42e9 at 8K, 1.15e10 at 32K).
LINEAR_ATTN_FLOPS_PER_D2 = 10


@dataclasses.dataclass(frozen=True)
class AttentionGroup:
    """``num_layers`` identical attention layers.

    Attributes:
      kind: MHA/GQA/MQA (softmax over a K/V cache), MLA (DeepSeek latent, absorbed), MFA
        (Step-3: many query heads, one shared K and V head) or linear (recurrent state).
      num_layers: layers in this group.
      num_heads: query heads.
      qk_dim: width of one head's QK and PV dot products. MLA: the 576-wide latent (512 + 64
        RoPE) for BOTH QK and PV, the paper's convention.
      kv_values_per_token: K and V values cached per token per layer (GQA 2*kv_heads*head_dim,
        MLA 576, MFA 2*head_dim). 0 for linear attention.
      kv_bytes: bytes per cached value (1: FP8/INT8, 2: BF16).
      linear_params: weights of the projections before/after attention, per layer.
      window: chunked/sliding attention attends min(ctx, window) tokens; None: full context.
      state_bytes: linear attention: recurrent state per sequence per layer, in bytes (read and
        written once per decoded token, so it counts twice in memory traffic).
    """

    kind: AttentionKind
    num_layers: int
    num_heads: int
    qk_dim: int
    kv_values_per_token: int
    kv_bytes: float
    linear_params: int
    window: int | None = None
    state_bytes: int = 0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"AttentionGroup.kind must be one of {_KINDS}, got {self.kind!r}")
        for name in ("num_layers", "num_heads", "qk_dim", "linear_params"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AttentionGroup.{name} must be > 0, got {getattr(self, name)}")
        if self.kv_bytes <= 0:
            raise ValueError(f"AttentionGroup.kv_bytes must be > 0, got {self.kv_bytes}")
        if self.kind == "linear" and self.state_bytes <= 0:
            raise ValueError("linear attention needs state_bytes > 0")
        if self.kind != "linear" and self.kv_values_per_token <= 0:
            raise ValueError(f"{self.kind} attention needs kv_values_per_token > 0")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"AttentionGroup.window must be > 0 or None, got {self.window}")


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    """The FFN side: ``dense_layers`` SwiGLU layers and ``moe_layers`` MoE layers.

    Attributes:
      dense_layers / dense_intermediate: count and hidden width of the dense SwiGLU layers.
      moe_layers: MoE layer count; num_experts routed experts of width moe_intermediate,
        top_k of them per token, plus shared_intermediate of always-on width (0: none; a
        width that is n * moe_intermediate counts as n shared experts).
    """

    dense_layers: int = 0
    dense_intermediate: int = 0
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"FFNSpec.{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.dense_layers and not self.dense_intermediate:
            raise ValueError("FFNSpec: dense_layers > 0 needs dense_intermediate > 0")
        if self.moe_layers and not (0 < self.top_k <= self.num_experts and self.moe_intermediate):
            raise ValueError(
                "FFNSpec: moe_layers > 0 needs 0 < top_k <= num_experts and moe_intermediate > 0,"
                f" got top_k={self.top_k}, num_experts={self.num_experts}"
            )

    @property
    def num_shared_experts(self) -> float:
        """Shared width in units of one routed expert (Step-3: 1, Pangu Pro MoE: 4)."""
        return self.shared_intermediate / self.moe_intermediate if self.moe_intermediate else 0.0

    @property
    def sparsity(self) -> float:
        """Activated fraction of the MoE: (top_k + shared) / (experts + shared); 1 if dense."""
        if not self.moe_layers:
            return 1.0
        s = self.num_shared_experts
        return (self.top_k + s) / (self.num_experts + s)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder for costing: attention groups, an FFN, the hidden size and weight bytes."""

    name: str
    hidden_size: int
    attention: tuple[AttentionGroup, ...]
    ffn: FFNSpec
    weight_bytes: float = 1.0  # bytes per weight (FP8/INT8 everywhere in the paper)

    def __post_init__(self):
        object.__setattr__(self, "attention", tuple(self.attention))
        if not self.attention:
            raise ValueError("ModelSpec.attention needs at least one AttentionGroup")
        if self.hidden_size <= 0:
            raise ValueError(f"ModelSpec.hidden_size must be > 0, got {self.hidden_size}")
        ffn_layers = self.ffn.dense_layers + self.ffn.moe_layers
        if ffn_layers != self.num_layers:
            raise ValueError(
                f"{self.name}: FFN covers {ffn_layers} layers but attention {self.num_layers}"
            )

    @property
    def num_layers(self) -> int:
        return sum(g.num_layers for g in self.attention)

    @property
    def attention_kind(self) -> str:
        """The single attention kind, or "hybrid" when groups differ (MiniMax M1, Llama 4)."""
        kinds = {g.kind for g in self.attention}
        windows = {g.window for g in self.attention}
        return kinds.pop() if len(kinds) == 1 and len(windows) == 1 else "hybrid"


# --------------------------------------------------------------------- attention builders
def gqa(
    layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, kv_bytes=1.0, window=None
) -> AttentionGroup:
    """Grouped-query attention (MHA when kv_heads == heads) with q/k/v/o projections."""
    q_out = heads * head_dim
    params = 2 * hidden * q_out + 2 * hidden * kv_heads * head_dim
    kind = "MHA" if kv_heads == heads else ("MQA" if kv_heads == 1 else "GQA")
    return AttentionGroup(
        kind, layers, heads, head_dim, 2 * kv_heads * head_dim, kv_bytes, params, window
    )


def mla(
    layers: int,
    hidden: int,
    heads: int,
    q_lora: int,
    kv_lora: int,
    nope: int,
    rope: int,
    v_dim: int,
    kv_bytes=1.0,
) -> AttentionGroup:
    """DeepSeek MLA, costed absorbed: the 576-wide latent is read and used for QK and PV."""
    latent = kv_lora + rope
    params = (
        hidden * q_lora  # q_a
        + q_lora * heads * (nope + rope)  # q_b
        + hidden * latent  # kv_a (latent + shared RoPE key)
        + kv_lora * heads * (nope + v_dim)  # kv_b
        + heads * v_dim * hidden  # o
    )
    return AttentionGroup("MLA", layers, heads, latent, latent, kv_bytes, params)


def mfa(layers: int, hidden: int, heads: int, head_dim: int, q_rank: int, kv_bytes=1.0):
    """Step-3 MFA: low-rank query (q_proj, wq), ONE K and ONE V head of head_dim, o_proj."""
    params = hidden * q_rank + q_rank * heads * head_dim + 2 * hidden * head_dim
    params += heads * head_dim * hidden
    return AttentionGroup("MFA", layers, heads, head_dim, 2 * head_dim, kv_bytes, params)


def lightning(layers: int, hidden: int, heads: int, head_dim: int, state_bytes_per_value=4):
    """MiniMax lightning (linear) attention: q/k/v/o and an output gate; d x d state per head."""
    inner = heads * head_dim
    params = 3 * hidden * inner + inner * hidden + hidden * inner  # qkv, out, output gate
    state = heads * head_dim * head_dim * state_bytes_per_value
    return AttentionGroup("linear", layers, heads, head_dim, 0, 1.0, params, state_bytes=state)


# --------------------------------------------------------------------- public configs
# Excerpts of each model's HF config.json (text model), under the HF key names.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "DeepSeek-V3": dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=3),
    "Kimi-K2": dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=64,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=1),
    "Qwen3-235B-A22B": dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, moe_intermediate_size=1536, num_experts=128,
        num_experts_per_tok=8, mlp_only_layers=[]),
    "Qwen3-32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, intermediate_size=25600),
    "Llama-4-Maverick": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, intermediate_size=8192,
        intermediate_size_mlp=16384, num_local_experts=128, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8192, no_rope_layer_interval=4),
    "MiniMax-M1": dict(hidden_size=6144, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, intermediate_size=9216, num_local_experts=32,
        num_experts_per_tok=2, attn_type_list=([0] * 7 + [1]) * 10),
    "ERNIE-4.5-300B-A47B": dict(hidden_size=8192, num_hidden_layers=54,
        num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
        moe_intermediate_size=3584, moe_num_experts=64, moe_k=8, moe_layer_start_index=3,
        moe_layer_interval=1, moe_num_shared_experts=0),
    "Pangu-Pro-MoE": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=1344, shared_expert_intermediate_size=5376),
}  # fmt: skip


def _deepseek(name: str, c: Mapping[str, Any]) -> ModelSpec:
    L, D, dense = c["num_hidden_layers"], c["hidden_size"], c["first_k_dense_replace"]
    att = mla(
        L,
        D,
        c["num_attention_heads"],
        c["q_lora_rank"],
        c["kv_lora_rank"],
        c["qk_nope_head_dim"],
        c["qk_rope_head_dim"],
        c["v_head_dim"],
    )
    ffn = FFNSpec(
        dense,
        c["intermediate_size"],
        L - dense,
        c["n_routed_experts"],
        c["num_experts_per_tok"],
        c["moe_intermediate_size"],
        c["n_shared_experts"] * c["moe_intermediate_size"],
    )
    return ModelSpec(name, D, (att,), ffn)


def _qwen3(name: str, c: Mapping[str, Any]) -> ModelSpec:
    L, D = c["num_hidden_layers"], c["hidden_size"]
    att = gqa(L, D, c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"])
    if "num_experts" in c:
        dense = len(c["mlp_only_layers"])
        ffn = FFNSpec(
            dense,
            c.get("intermediate_size", 0),
            L - dense,
            c["num_experts"],
            c["num_experts_per_tok"],
            c["moe_intermediate_size"],
        )
    else:
        ffn = FFNSpec(L, c["intermediate_size"])
    return ModelSpec(name, D, (att,), ffn)


def _llama4(name: str, c: Mapping[str, Any]) -> ModelSpec:
    L, D, H = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    n_global = L // c["no_rope_layer_interval"]  # every 4th layer: global NoPE attention
    kv, hd = c["num_key_value_heads"], c["head_dim"]
    att = (
        gqa(L - n_global, D, H, kv, hd, kv_bytes=1.0, window=c["attention_chunk_size"]),
        gqa(n_global, D, H, kv, hd, kv_bytes=2.0),  # official recipe keeps these BF16
    )
    moe = L // c["interleave_moe_layer_step"]
    ffn = FFNSpec(
        L - moe,
        c["intermediate_size_mlp"],
        moe,
        c["num_local_experts"],
        c["num_experts_per_tok"],
        c["intermediate_size"],
        c["intermediate_size"],
    )
    return ModelSpec(name, D, att, ffn)


def _minimax(name: str, c: Mapping[str, Any]) -> ModelSpec:
    L, D, H, hd = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["head_dim"]
    n_soft = sum(c["attn_type_list"])
    att = (
        lightning(L - n_soft, D, H, hd),
        gqa(n_soft, D, H, c["num_key_value_heads"], hd, kv_bytes=2.0),  # BF16 KV, official
    )
    ffn = FFNSpec(0, 0, L, c["num_local_experts"], c["num_experts_per_tok"], c["intermediate_size"])
    return ModelSpec(name, D, att, ffn)


def _ernie(name: str, c: Mapping[str, Any]) -> ModelSpec:
    L, D, H = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    att = gqa(L, D, H, c["num_key_value_heads"], c.get("head_dim") or D // H)
    start, step = c["moe_layer_start_index"], c["moe_layer_interval"]
    moe = sum(1 for i in range(L) if i >= start and (i + 1) % step == 0)
    ffn = FFNSpec(
        L - moe,
        c["intermediate_size"],
        moe,
        c["moe_num_experts"],
        c["moe_k"],
        c["moe_intermediate_size"],
        c["moe_num_shared_experts"] * c["moe_intermediate_size"],
    )
    return ModelSpec(name, D, (att,), ffn)


def _pangu(name: str, c: Mapping[str, Any]) -> ModelSpec:
    L, D, H = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    att = gqa(L, D, H, c["num_key_value_heads"], c.get("head_dim") or D // H)
    ffn = FFNSpec(
        0,
        0,
        L,
        c["num_experts"],
        c["num_experts_per_tok"],
        c["moe_intermediate_size"],
        c["shared_expert_intermediate_size"],
    )
    return ModelSpec(name, D, (att,), ffn)


_BUILDERS = {
    "DeepSeek-V3": _deepseek,
    "Kimi-K2": _deepseek,
    "Qwen3-235B-A22B": _qwen3,
    "Qwen3-32B": _qwen3,
    "Llama-4-Maverick": _llama4,
    "MiniMax-M1": _minimax,
    "ERNIE-4.5-300B-A47B": _ernie,
    "Pangu-Pro-MoE": _pangu,
}


def from_step3_config(cfg: Any, kv_bytes: float = 1.0, weight_bytes: float = 1.0) -> ModelSpec:
    """The cost spec of any `step3_jax.config.Step3Config` (MFA attention, dense + MoE FFN).

    Args:
      cfg: a Step3Config (or anything with its field names).
      kv_bytes: bytes per cached K/V value (1 for FP8, 2 for BF16 attention).
      weight_bytes: bytes per weight (1 for FP8).
    """
    if not isinstance(cfg, Step3Config):
        raise ValueError(f"from_step3_config expects a Step3Config, got {type(cfg).__name__}")
    L, D = cfg.num_layers, cfg.hidden_size
    att = mfa(L, D, cfg.num_heads, cfg.head_dim, cfg.share_q_dim, kv_bytes=kv_bytes)
    n_moe = len(cfg.moe_layer_ids)
    ffn = FFNSpec(
        L - n_moe,
        cfg.intermediate_size,
        n_moe,
        cfg.num_experts,
        cfg.top_k,
        cfg.moe_intermediate_size,
        cfg.share_expert_dim,
    )
    return ModelSpec("Step-3", D, (att,), ffn, weight_bytes=weight_bytes)


def step3(kv_bytes: float = 1.0) -> ModelSpec:
    """Step-3 (316B text model) as the paper costs it: FP8 weights and KV unless told."""
    return from_step3_config(Step3Config.step3(), kv_bytes=kv_bytes)


def get_model(name: str) -> ModelSpec:
    """A named spec: "Step-3" or any key of `HF_CONFIGS` (case-insensitive)."""
    if name.lower() in ("step-3", "step3"):
        return step3()
    for key, cfg in HF_CONFIGS.items():
        if key.lower() == name.lower():
            return _BUILDERS[key](key, cfg)
    raise ValueError(f"unknown model {name!r}; known: {model_names()}")


def model_names() -> tuple[str, ...]:
    """Every name `get_model` accepts, in the paper's table order (Step-3 last)."""
    return (*HF_CONFIGS, "Step-3")


# Short labels the paper's tables use.
PAPER_LABELS = {
    "DeepSeek-V3": "DSv3",
    "Kimi-K2": "Kimi K2",
    "Qwen3-235B-A22B": "Qwen3 MoE",
    "Qwen3-32B": "Qwen3 32B",
    "Llama-4-Maverick": "Llama 4 M",
    "MiniMax-M1": "MM M1",
    "ERNIE-4.5-300B-A47B": "ERNIE 4.5",
    "Pangu-Pro-MoE": "Pangu Pro",
    "Step-3": "Step-3",
}
