"""Regenerates docs/figures/*.png and the simulator-vs-paper JSON (CPU only, a few seconds).

    .venv/bin/python benchmarks/make_cost_plots.py

Writes docs/figures/{roofline_8k,roofline_32k,cost_vs_context,cost_vs_context_modern,
afd_timeline_2a2f}.png and benchmarks/results/cost_sim_paper_runs.json; any
benchmarks/results/afd_*.json (measured AFD runs, schema in step3_jax/cost/simulator.py) is
compared with the simulator too. The last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.provenance import git_commit  # noqa: E402
from step3_jax import cost  # noqa: E402
from step3_jax.cost import plots  # noqa: E402
from step3_jax.cost import simulator as sim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT / "docs" / "figures"
RESULTS = ROOT / "benchmarks" / "results"


def make_figures() -> list[str]:
    modern = [cost.H100, cost.H200, cost.B200, cost.H20]
    figs = {
        "roofline_8k.png": plots.roofline(cost.PAPER_HARDWARE, ctx=8192),
        "roofline_32k.png": plots.roofline((*cost.PAPER_HARDWARE, cost.B200), ctx=32768),
        "cost_vs_context.png": plots.cost_vs_context(cost.PAPER_HARDWARE),
        "cost_vs_context_modern.png": plots.cost_vs_context(modern),
    }
    eta = sim.calibrate_uniform_efficiency(sim.PAPER_AFD_RUNS[0], cost.H800)
    setup = sim.paper_setup(sim.PAPER_AFD_RUNS[0], cost.H800, sim.Efficiency.uniform(eta))
    pred = sim.predict(setup)
    figs["afd_timeline_2a2f.png"] = plots.afd_timeline(pred.pipeline, layers=2)
    for name, fig in figs.items():
        fig.savefig(FIG / name, dpi=120, bbox_inches="tight")
        plots.close(fig)
    return sorted(figs)


def paper_runs() -> dict:
    eta = sim.calibrate_uniform_efficiency(sim.PAPER_AFD_RUNS[0], cost.H800)
    calibrated = sim.paper_comparison(cost.H800, sim.Efficiency.uniform(eta))
    ideal = sim.paper_comparison(cost.H800, sim.Efficiency())
    return dict(
        uniform_efficiency=eta,
        calibrated_on=sim.PAPER_AFD_RUNS[0].name,
        calibrated=calibrated,
        ideal=ideal,
    )


def measured_runs() -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(RESULTS / "afd_*.json"))):
        try:
            for run in sim.load_measured(path):
                rows.append(dict(file=Path(path).name, **sim.compare_measured(run)))
        except (ValueError, KeyError) as e:  # a file of another schema: say so, go on
            rows.append(dict(file=Path(path).name, error=str(e)))
    return rows


def main(argv=None) -> None:
    # No options: the parser exists so that `--help` prints this usage instead of rewriting
    # the figures and the results file.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    FIG.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = make_figures()
    result = dict(
        device="cpu (analytic model, no accelerator)",
        jax_version=jax.__version__,
        commit=git_commit(),
        date=datetime.date.today().isoformat(),
        command="python benchmarks/make_cost_plots.py",
        paper_runs=paper_runs(),
        measured_runs=measured_runs(),
    )
    (RESULTS / "cost_sim_paper_runs.json").write_text(json.dumps(result, indent=1) + "\n")
    for row in result["paper_runs"]["calibrated"]:
        print(
            f"{row['run']:<26} paper {row['paper']:>6.0f} predicted {row['predicted']:>6.0f} "
            f"({row['rel_error']:+.1%})"
        )
    summary = dict(
        figures=figures,
        eta=round(result["paper_runs"]["uniform_efficiency"], 4),
        errors=[round(r["rel_error"], 4) for r in result["paper_runs"]["calibrated"]],
        measured=len(result["measured_runs"]),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
