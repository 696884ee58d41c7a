"""Cells of colab/03_cost_model.ipynb (built by _build_notebooks.py)."""

from _build_notebooks import INSTALL

CELLS = [
    (
        "md",
        """\
# 03 · Step-3's decode cost model, rooflines and the AFD simulator

Reruns the argument of *Step-3 is Large yet Affordable* (arXiv 2507.19427, sections 4-7) with
`step3_jax.cost`: per-token KV bytes and FLOPs, arithmetic intensity against hardware rooflines,
dollars per 1M tokens, the minimum MoE sparsity a network allows, and an AFD pipeline simulator
for layouts nobody here can rent. CPU only, a few seconds, no network.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import io

from IPython.display import Image, display

from step3_jax import cost
from step3_jax.config import Step3Config
from step3_jax.cost import plots, tables
from step3_jax.cost import simulator as sim


def show(fig):
    \"\"\"plots.py renders with the Agg backend; show its PNG inline and free the figure.\"\"\"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plots.close(fig)
    display(Image(buf.getvalue()))""",
    ),
    (
        "md",
        """\
## The paper's tables at 8K context (Tables 2, 5, 6 and 7)""",
    ),
    (
        "code",
        """\
print(tables.format_all(8192))""",
    ),
    (
        "md",
        """\
Step-3 at 8K: 2.56e8 KV bytes, 3.27e10 attention FLOPs, intensity 128, and 0.055 USD per 1M
tokens with AFD (attention on H20, FFN on H800). At 32K the gap to DeepSeek-V3 widens:""",
    ),
    (
        "code",
        """\
s3, ds = cost.get_model("Step-3"), cost.get_model("DeepSeek-V3")
for spec in (s3, ds):
    afd = cost.afd_cost(spec, cost.PAPER_HARDWARE, 32768)
    print(f"{spec.name:12s} AFD at 32K: {afd.total * 1e6:.3f} USD/1M tokens "
          f"({afd.attention_hw} + {afd.ffn_hw})")""",
    ),
    (
        "md",
        """\
## Your own model or hardware

Any `Step3Config` gives a spec; other architectures are built from their dimensions.""",
    ),
    (
        "code",
        """\
tiny = cost.from_step3_config(Step3Config.tiny())
print(tiny.attention_kind, cost.kv_bytes_per_token(tiny, 1024), cost.ffn_flops(tiny))

from step3_jax.cost.specs import FFNSpec, ModelSpec, gqa

# A hypothetical 48-layer GQA-8 MoE: 64 experts, top-4, one shared expert.
mine = ModelSpec("my-moe", 6144, (gqa(48, 6144, 48, 8, 128),),
                 FFNSpec(0, 0, 48, 64, 4, 2048, 2048))
for hw in (cost.H800, cost.H20, cost.H200, cost.B200):
    c = cost.cost_per_token(mine, hw, 16384)
    print(f"{hw.name:5s} attention {c.attention * 1e6:.3f}  FFN {c.ffn * 1e6:.3f} USD/1M tokens")
print("sparsity", round(mine.ffn.sparsity, 3), "min on H800", round(cost.min_sparsity(cost.H800, 6144, 48), 3))""",
    ),
    (
        "md",
        """\
## Rooflines and cost against context""",
    ),
    (
        "code",
        """\
fig = plots.roofline(cost.PAPER_HARDWARE, ctx=8192)
show(fig)
fig = plots.cost_vs_context(cost.PAPER_HARDWARE)
show(fig)""",
    ),
    (
        "md",
        """\
## The AFD simulator

One efficiency factor (fraction of peak FLOP/s, HBM and NIC bandwidth) is calibrated on the
paper's 2A2F 4K FP8 run, then reused unchanged for the other two runs.""",
    ),
    (
        "code",
        """\
eta = sim.calibrate_uniform_efficiency(sim.PAPER_AFD_RUNS[0], cost.H800)
print(f"calibrated efficiency {eta:.3f}")
for row in sim.paper_comparison(cost.H800, sim.Efficiency.uniform(eta)):
    print(f"{row['run']:<26} paper {row['paper']:.0f}  predicted {row['predicted']:.0f} "
          f"({row['rel_error']:+.1%})")""",
    ),
    (
        "code",
        """\
setup = sim.paper_setup(sim.PAPER_AFD_RUNS[0], cost.H200, sim.Efficiency.uniform(eta))
p = sim.predict(setup)
print(f"2A2F 4K on H200: batch {p.batch}, TPOT {p.tpot_s * 1e3:.1f} ms, "
      f"{p.tokens_per_s_per_gpu:.0f} tokens/s/GPU ({p.bound}-bound)")
fig = plots.afd_timeline(p.pipeline, layers=2)
show(fig)""",
    ),
]
