"""`step3-jax cost ...`: the paper's cost tables, plots and AFD simulator from the shell.

step3-jax cost                                 # tables at 8K on H800/H20/A800/910B
step3-jax cost tables --context 32768 --hardware H800 H20 H100 B200
step3-jax cost plots --out docs/figures
step3-jax cost simulate --layout 2A2F --context 4096 --hardware H800 --efficiency 0.5
step3-jax cost simulate --measured benchmarks/results/afd_2gpu.json
step3-jax cost paper-runs                      # calibrate once, compare the 3 paper runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from step3_jax.cost import plots, simulator, tables
from step3_jax.cost.hardware import H800, PAPER_HARDWARE, get_hardware

_COMMANDS = ("tables", "plots", "simulate", "paper-runs")


def _positive_int(text: str) -> int:
    """argparse type: an integer > 0 (a context, batch or micro-batch count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {value}")
    return value


def _positive_float(text: str, upper: float = math.inf) -> float:
    """argparse type: a finite number in (0, upper] (rejects 0, negatives, nan, inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= upper):
        bound = "" if upper == math.inf else f" and <= {upper:g}"
        raise argparse.ArgumentTypeError(f"expected a finite number > 0{bound}, got {text!r}")
    return value


def _fraction(text: str) -> float:
    return _positive_float(text, 1.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step3-jax cost", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tables", help="Tables 2/3/5/6/7 at one context")
    t.add_argument("--context", type=_positive_int, default=8192)
    t.add_argument("--hardware", nargs="+", default=[h.name for h in PAPER_HARDWARE])
    t.add_argument("--json", action="store_true", help="print rows as JSON instead of text")
    pl = sub.add_parser("plots", help="roofline, cost-vs-context and AFD timeline PNGs")
    pl.add_argument("--out", default="docs/figures")
    pl.add_argument("--hardware", nargs="+", default=[h.name for h in PAPER_HARDWARE])
    s = sub.add_parser("simulate", help="AFD pipeline: TPOT and tokens/s/GPU")
    s.add_argument("--layout", default="2A2F")
    s.add_argument("--context", type=_positive_int, default=4096)
    s.add_argument("--micro-batches", type=_positive_int, default=3)
    s.add_argument("--hardware", default="H800", help="attention-side hardware")
    s.add_argument("--ffn-hardware", default=None)
    s.add_argument("--efficiency", type=_fraction, default=1.0, help="uniform fraction of peak")
    s.add_argument("--kv-bytes", type=_positive_float, default=1.0, help="1: FP8 KV, 2: BF16")
    s.add_argument("--tpot-ms", type=_positive_float, default=50.0)
    s.add_argument(
        "--batch", type=_positive_int, default=None, help="fixed batch instead of the SLA max"
    )
    s.add_argument("--measured", default=None, help="benchmark JSON with per-layer times")
    sub.add_parser("paper-runs", help="calibrate on 2A2F, predict the paper's three runs")
    return p


def _tables(args) -> int:
    hw = [get_hardware(n) for n in args.hardware]
    if args.json:
        out = dict(
            context=args.context,
            flops_bytes=tables.flops_bytes_rows(args.context),
            unit_costs=tables.unit_cost_rows(hw),
            costs_per_1m=tables.cost_rows(args.context, hw),
            sparsity=tables.sparsity_rows(hw),
        )
        print(json.dumps(out, indent=1, default=list))
    else:
        print(tables.format_all(args.context, hw))
    return 0


def _plots(args) -> int:
    hw = [get_hardware(n) for n in args.hardware]
    for f in (
        plots.roofline(hw, path=f"{args.out}/roofline.png"),
        plots.cost_vs_context(hw, path=f"{args.out}/cost_vs_context.png"),
    ):
        plots.close(f)
    setup = simulator.paper_setup(simulator.PAPER_AFD_RUNS[0], H800, simulator.Efficiency())
    res = simulator.simulate(simulator.analytic_layer_times(setup, 6144), 3)
    plots.close(plots.afd_timeline(res, path=f"{args.out}/afd_timeline.png"))
    print(f"wrote roofline.png, cost_vs_context.png, afd_timeline.png under {args.out}")
    return 0


def _simulate(args) -> int:
    if args.measured:
        for run in simulator.load_measured(args.measured):
            print(json.dumps(simulator.compare_measured(run)))
        return 0
    from step3_jax.config import Step3Config
    from step3_jax.cost.specs import from_step3_config

    spec = from_step3_config(Step3Config.step3(), kv_bytes=args.kv_bytes)
    hw = get_hardware(args.hardware)
    setup = simulator.AFDSetup(
        spec,
        simulator.AFDLayout.parse(args.layout),
        args.context,
        args.micro_batches,
        hw,
        get_hardware(args.ffn_hardware) if args.ffn_hardware else None,
        simulator.Efficiency.uniform(args.efficiency),
    )
    if args.batch:
        res = simulator.simulate(simulator.analytic_layer_times(setup, args.batch), 3)
        tgs = simulator.tokens_per_s_per_gpu(args.batch, res.tpot_s, setup.layout)
        out = dict(batch=args.batch, tpot_ms=res.tpot_s * 1e3, tokens_per_s_per_gpu=tgs)
    else:
        p = simulator.predict(setup, args.tpot_ms * 1e-3)
        out = dict(
            batch=p.batch,
            tpot_ms=p.tpot_s * 1e3,
            bound=p.bound,
            tokens_per_s_per_gpu=p.tokens_per_s_per_gpu,
            busy=p.pipeline.busy,
        )
    print(json.dumps(out))
    return 0


def _paper_runs(_args) -> int:
    eta = simulator.calibrate_uniform_efficiency(simulator.PAPER_AFD_RUNS[0], H800)
    print(f"uniform efficiency calibrated once on '{simulator.PAPER_AFD_RUNS[0].name}': {eta:.3f}")
    for row in simulator.paper_comparison(H800, simulator.Efficiency.uniform(eta)):
        print(
            f"{row['run']:<26} paper {row['paper']:>6.0f}  predicted {row['predicted']:>6.0f}"
            f"  ({row['rel_error']:+.1%}, batch {row['batch']}, {row['bound']}-bound)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` excludes the program name and the word "cost"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*_COMMANDS, "-h", "--help"):
        argv.insert(0, "tables")
    args = _parser().parse_args(argv)
    handlers = dict(tables=_tables, plots=_plots, simulate=_simulate)
    handlers["paper-runs"] = _paper_runs
    try:
        return handlers[args.command](args)
    except ValueError as e:
        print(f"step3-jax cost: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
