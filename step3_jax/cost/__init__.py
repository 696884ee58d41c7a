"""Decode cost model, roofline plots and an AFD simulator (arXiv 2507.19427 sections 4-7).

from step3_jax import cost
s3 = cost.get_model("Step-3")
cost.kv_bytes_per_token(s3, 8192)            # 2.56e8
cost.afd_cost(s3, cost.PAPER_HARDWARE, 8192).total * 1e6   # 0.055 USD per 1M tokens
"""

from step3_jax.cost.analytic import (
    AFDChoice,
    CostBreakdown,
    afd_cost,
    arithmetic_intensity,
    attention_cost,
    attention_flops,
    b_dense,
    b_moe,
    comm_budget_s,
    cost_per_token,
    ffn_cost,
    ffn_flops,
    kv_bytes_per_token,
    kv_bytes_per_token_layer,
    linear_flops,
    min_active_experts,
    min_sparsity,
    pipeline_budget_s,
)
from step3_jax.cost.hardware import (
    A800,
    ASCEND_910B,
    B200,
    H20,
    H100,
    H200,
    H800,
    HARDWARE,
    PAPER_HARDWARE,
    HardwareSpec,
    get_hardware,
)
from step3_jax.cost.simulator import (
    PAPER_AFD_RUNS,
    AFDLayout,
    AFDSetup,
    Efficiency,
    LayerTimes,
    analytic_layer_times,
    calibrate_uniform_efficiency,
    load_measured,
    paper_comparison,
    predict,
    simulate,
)
from step3_jax.cost.specs import (
    HF_CONFIGS,
    AttentionGroup,
    FFNSpec,
    ModelSpec,
    from_step3_config,
    get_model,
    model_names,
)

__all__ = [
    "A800", "ASCEND_910B", "B200", "H20", "H100", "H200", "H800", "HARDWARE", "HF_CONFIGS",
    "PAPER_AFD_RUNS", "PAPER_HARDWARE", "AFDChoice", "AFDLayout", "AFDSetup", "AttentionGroup",
    "CostBreakdown", "Efficiency", "FFNSpec", "HardwareSpec", "LayerTimes", "ModelSpec",
    "afd_cost", "analytic_layer_times", "arithmetic_intensity", "attention_cost",
    "attention_flops", "b_dense", "b_moe", "calibrate_uniform_efficiency", "comm_budget_s",
    "cost_per_token", "ffn_cost", "ffn_flops", "from_step3_config", "get_hardware", "get_model",
    "kv_bytes_per_token", "kv_bytes_per_token_layer", "linear_flops", "load_measured",
    "min_active_experts", "min_sparsity", "model_names", "paper_comparison",
    "pipeline_budget_s", "predict", "simulate",
]  # fmt: skip
