"""The paper's cost tables (arXiv 2507.19427, Tables 2, 3, 5, 6, 7) as computed rows.

`PAPER_*` hold the numbers as printed (read off the paper's table images, see
docs/cost_model.md for the source); the functions compute the same rows from
`step3_jax.cost.specs` and `step3_jax.cost.hardware` so tests can compare them at the printed
precision, and so `step3-jax cost` can print them for any context and hardware.
"""

from __future__ import annotations

from collections.abc import Sequence

from step3_jax.cost import analytic
from step3_jax.cost.hardware import PAPER_HARDWARE, HardwareSpec
from step3_jax.cost.specs import PAPER_LABELS, get_model, model_names

# Tables 2 (8K) and 3 (32K): KV/state bytes, attention FLOPs w/o linear, linear FLOPs, FFN FLOPs.
PAPER_TABLE2 = {
    "DeepSeek-V3": (2.88e8, 1.47e11, 2.28e10, 4.84e10),
    "Kimi-K2": (2.88e8, 7.37e10, 1.23e10, 4.84e10),
    "Qwen3-235B-A22B": (7.89e8, 2.52e10, 1.34e10, 2.84e10),
    "Qwen3-32B": (1.07e9, 1.72e10, 1.21e10, 5.03e10),
    "Llama-4-Maverick": (1.01e9, 8.05e9, 6.04e9, 2.42e10),
    "MiniMax-M1": (9.23e8, 3.42e9, 3.75e10, 5.44e10),
    "ERNIE-4.5-300B-A47B": (9.06e8, 1.45e10, 1.63e10, 7.61e10),
    "Pangu-Pro-MoE": (8.05e8, 8.05e9, 6.04e9, 2.38e10),
    "Step-3": (2.56e8, 3.27e10, 2.07e10, 5.33e10),
}
PAPER_TABLE3 = {
    "DeepSeek-V3": (1.15e9, 5.89e11, 2.28e10, 4.84e10),
    "Kimi-K2": (1.15e9, 2.95e11, 1.23e10, 4.84e10),
    "Qwen3-235B-A22B": (3.15e9, 1.01e11, 1.34e10, 2.84e10),
    "Qwen3-32B": (4.29e9, 6.87e10, 1.21e10, 5.03e10),
    "Llama-4-Maverick": (2.21e9, 1.41e10, 6.04e9, 2.42e10),
    "MiniMax-M1": (1.93e9, 1.15e10, 3.75e10, 5.44e10),
    "ERNIE-4.5-300B-A47B": (3.62e9, 5.80e10, 1.63e10, 7.61e10),
    "Pangu-Pro-MoE": (3.22e9, 3.22e10, 6.04e9, 2.38e10),
    "Step-3": (1.02e9, 1.31e11, 2.07e10, 5.33e10),
}
# Table 5: (USD per FLOP, USD per byte of memory access).
PAPER_TABLE5 = {
    "H800": (2.80e-19, 1.66e-16),
    "H20": (7.51e-19, 5.56e-17),
    "A800": (6.68e-19, 1.04e-16),
    "910B": (6.65e-19, 1.16e-16),
}
# Table 6, USD per 1M tokens on H800/H20/A800/910B: attention at 8K, attention at 32K, FFN.
PAPER_TABLE6 = {
    "DeepSeek-V3": ((0.054, 0.128, 0.114, 0.113), (0.197, 0.460, 0.409, 0.407),
                    (0.014, 0.036, 0.032, 0.032)),
    "Kimi-K2": ((0.051, 0.065, 0.057, 0.057), (0.194, 0.231, 0.205, 0.204),
                (0.014, 0.036, 0.032, 0.032)),
    "Qwen3-235B-A22B": ((0.135, 0.054, 0.091, 0.101), (0.527, 0.185, 0.338, 0.376),
                        (0.008, 0.021, 0.019, 0.019)),
    "Qwen3-32B": ((0.181, 0.069, 0.120, 0.133), (0.716, 0.248, 0.455, 0.508),
                  (0.014, 0.038, 0.034, 0.033)),
    "Llama-4-Maverick": ((0.169, 0.060, 0.109, 0.121), (0.369, 0.128, 0.235, 0.262),
                         (0.007, 0.018, 0.016, 0.016)),
    "MiniMax-M1": ((0.164, 0.079, 0.121, 0.132), (0.330, 0.135, 0.226, 0.249),
                   (0.015, 0.041, 0.036, 0.036)),
    "ERNIE-4.5-300B-A47B": ((0.155, 0.063, 0.105, 0.116), (0.606, 0.214, 0.388, 0.432),
                            (0.021, 0.057, 0.051, 0.051)),
    "Pangu-Pro-MoE": ((0.135, 0.049, 0.088, 0.098), (0.536, 0.183, 0.340, 0.379),
                      (0.007, 0.018, 0.016, 0.016)),
    "Step-3": ((0.048, 0.040, 0.040, 0.043), (0.176, 0.114, 0.120, 0.133),
               (0.015, 0.040, 0.036, 0.035)),
}  # fmt: skip
# Table 7: minimum MoE sparsity for Step-3's H and L on each accelerator.
PAPER_TABLE7 = {"H800": 0.058, "H20": 0.007, "A800": 0.031, "910B": 0.034}
# Section 4.2 text: AFD (and DSv3's EP on H800) totals per 1M tokens.
PAPER_AFD_TOTALS = {
    ("Step-3", 8192): 0.055,
    ("Step-3", 32768): 0.129,
    ("Qwen3-235B-A22B", 8192): 0.062,
    ("Qwen3-235B-A22B", 32768): 0.193,
}
PAPER_DSV3_H800_TOTALS = {8192: 0.068, 32768: 0.211}
# Section 5.4 text: DSv3 would need 14 routed experts per token on H800.
PAPER_DSV3_MIN_EXPERTS_H800 = 14


def flops_bytes_rows(ctx: int = 8192, models: Sequence[str] | None = None) -> list[dict]:
    """Tables 2/3 at any context: one dict per model with kv_bytes and the three FLOP counts."""
    rows = []
    for name in models or model_names():
        spec = get_model(name)
        rows.append(
            dict(
                model=name,
                label=PAPER_LABELS.get(name, name),
                kv_bytes=analytic.kv_bytes_per_token(spec, ctx),
                attention_flops=analytic.attention_flops(spec, ctx),
                linear_flops=analytic.linear_flops(spec),
                ffn_flops=analytic.ffn_flops(spec),
                intensity=analytic.arithmetic_intensity(spec, ctx),
            )
        )
    return rows


def unit_cost_rows(hardware: Sequence[HardwareSpec] = PAPER_HARDWARE) -> list[dict]:
    """Table 5: USD per FLOP and per byte, plus the ridge point, per accelerator."""
    return [
        dict(
            hardware=h.name,
            usd_per_flop=h.usd_per_flop,
            usd_per_byte=h.usd_per_byte,
            roofline=h.roofline,
        )
        for h in hardware
    ]


def cost_rows(
    ctx: int = 8192,
    hardware: Sequence[HardwareSpec] = PAPER_HARDWARE,
    models: Sequence[str] | None = None,
) -> list[dict]:
    """Table 6 (+ Figure 2): USD per 1M tokens, attention and FFN per hardware, and AFD."""
    rows = []
    for name in models or model_names():
        spec = get_model(name)
        afd = analytic.afd_cost(spec, hardware, ctx)
        rows.append(
            dict(
                model=name,
                label=PAPER_LABELS.get(name, name),
                attention={h.name: analytic.attention_cost(spec, h, ctx) * 1e6 for h in hardware},
                ffn={h.name: analytic.ffn_cost(spec, h) * 1e6 for h in hardware},
                afd_total=afd.total * 1e6,
                afd_pair=(afd.attention_hw, afd.ffn_hw),
            )
        )
    return rows


def sparsity_rows(
    hardware: Sequence[HardwareSpec] = PAPER_HARDWARE, hidden: int = 7168, layers: int = 61
) -> list[dict]:
    """Table 7: minimum MoE sparsity, with B_dense and Step-3's B_MoE, per accelerator."""
    step3_s = get_model("Step-3").ffn.sparsity
    return [
        dict(
            hardware=h.name,
            min_sparsity=analytic.min_sparsity(h, hidden, layers),
            b_dense=analytic.b_dense(h),
            b_moe_step3=analytic.b_moe(h, step3_s),
        )
        for h in hardware
    ]


def format_all(ctx: int = 8192, hardware: Sequence[HardwareSpec] = PAPER_HARDWARE) -> str:
    """Every table as aligned text (what `step3-jax cost` prints)."""
    out = [f"Per decoded token at {ctx} context (8-bit KV and weights unless noted)"]
    out.append(f"{'model':<12}{'KV bytes':>11}{'attn FLOPs':>12}{'linear':>11}{'FFN':>11}{'AI':>7}")
    for r in flops_bytes_rows(ctx):
        out.append(
            f"{r['label']:<12}{r['kv_bytes']:>11.3g}{r['attention_flops']:>12.3g}"
            f"{r['linear_flops']:>11.3g}{r['ffn_flops']:>11.3g}{r['intensity']:>7.1f}"
        )
    out.append("\nUnit costs")
    for r in unit_cost_rows(hardware):
        out.append(
            f"{r['hardware']:<8} {r['usd_per_flop']:.3g} $/FLOP  {r['usd_per_byte']:.3g} $/B  "
            f"ridge {r['roofline']:.0f}"
        )
    names = [h.name for h in hardware]
    out.append(f"\nUSD per 1M tokens at {ctx}: attention | FFN | AFD (attn hw + FFN hw)")
    out.append(
        f"{'model':<12}"
        + "".join(f"{n:>7}" for n in names)
        + " |"
        + "".join(f"{n:>7}" for n in names)
        + " |   AFD"
    )
    for r in cost_rows(ctx, hardware):
        att = "".join(f"{r['attention'][n]:>7.3f}" for n in names)
        ffn = "".join(f"{r['ffn'][n]:>7.3f}" for n in names)
        pair = "+".join(r["afd_pair"])
        out.append(f"{r['label']:<12}{att} |{ffn} | {r['afd_total']:.3f} ({pair})")
    out.append("\nMinimum MoE sparsity (Step-3 H=7168, L=61, 50 ms TPOT, 3 stages)")
    for r in sparsity_rows(hardware):
        out.append(
            f"{r['hardware']:<8} S >= {r['min_sparsity']:.3f}   B_dense {r['b_dense']:.0f}   "
            f"Step-3 B_MoE {r['b_moe_step3']:.0f}"
        )
    return "\n".join(out)
