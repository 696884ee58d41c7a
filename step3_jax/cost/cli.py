"""`step3-jax cost ...`: the paper's cost tables, plots and AFD simulator from the shell.

step3-jax cost                                 tables at 8K on H800/H20/A800/910B
step3-jax cost tables --context 32768 --hardware H800 H20 H100 B200
step3-jax cost plots --out my_figures          PNGs (default ./step3_jax_figures)
step3-jax cost simulate --layout 2A2F --context 4096 --hardware H800 --efficiency 0.5
step3-jax cost simulate --measured benchmarks/results/afd_h200x2_1A1F.json
step3-jax cost paper-runs                      calibrate once, compare the 3 paper runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from step3_jax.cli_common import (
    Parser,
    UsageError,
    debug_requested,
    fraction,
    positive_float,
    positive_int,
    run_guarded,
)
from step3_jax.cost import plots, simulator, tables
from step3_jax.cost.hardware import H800, HARDWARE, PAPER_HARDWARE, get_hardware

PROG = "step3-jax cost"
_COMMANDS = ("tables", "plots", "simulate", "paper-runs")
DEFAULT_FIGURES_DIR = "step3_jax_figures"  # under the current directory
_HW_NAMES = ", ".join(HARDWARE)
_PAPER_HW = [h.name for h in PAPER_HARDWARE]


def _hardware(text: str) -> str:
    try:
        return get_hardware(text).name
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown hardware {text!r}; known: {_HW_NAMES}") from None


def _layout(text: str) -> str:
    try:
        simulator.AFDLayout.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="The cost model of the Step-3 paper: cost tables per model and hardware, "
        "roofline plots, and a simulator of the AFD decode pipeline.",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hw_help = f"one or more of: {_HW_NAMES} (case-insensitive; default: the paper's four)"
    ctx_help = "context length in tokens, >= 1 (default: %(default)s)"
    t = sub.add_parser(
        "tables",
        help="the paper's Tables 2/3/5/6/7 at one context",
        description="the paper's Tables 2/3/5/6/7 at one context",
    )
    t.add_argument("--context", type=positive_int, default=8192, metavar="TOKENS", help=ctx_help)
    t.add_argument(
        "--hardware", nargs="+", type=_hardware, default=_PAPER_HW, metavar="NAME", help=hw_help
    )
    t.add_argument("--json", action="store_true", help="print rows as JSON instead of text")
    pl = sub.add_parser(
        "plots",
        help="roofline, cost-vs-context and AFD timeline PNGs",
        description="roofline, cost-vs-context and AFD timeline PNGs",
    )
    pl.add_argument(
        "--out",
        default=DEFAULT_FIGURES_DIR,
        metavar="DIR",
        help="folder to write roofline.png, cost_vs_context.png and afd_timeline.png into; "
        "created if missing (default: ./%(default)s)",
    )
    pl.add_argument(
        "--hardware", nargs="+", type=_hardware, default=_PAPER_HW, metavar="NAME", help=hw_help
    )
    _simulate_parser(sub)
    sub.add_parser(
        "paper-runs",
        help="calibrate on 2A2F, predict the paper's three runs",
        description="calibrate on 2A2F, predict the paper's three runs",
    )
    return p


def _simulate_parser(sub) -> None:
    s = sub.add_parser(
        "simulate",
        help="AFD pipeline: TPOT and tokens/s/GPU",
        description="AFD pipeline: TPOT and tokens/s/GPU",
    )
    s.add_argument(
        "--layout",
        type=_layout,
        default="2A2F",
        metavar="xAyF",
        help="x attention and y FFN instances of 8 GPUs, e.g. 2A2F, 3A2F (default: %(default)s)",
    )
    s.add_argument(
        "--context",
        type=positive_int,
        default=4096,
        metavar="TOKENS",
        help="context length, >= 1 (default: %(default)s)",
    )
    s.add_argument(
        "--micro-batches",
        type=positive_int,
        default=3,
        metavar="M",
        help="micro-batches in flight, >= 1 (default: %(default)s)",
    )
    s.add_argument(
        "--hardware",
        type=_hardware,
        default="H800",
        metavar="NAME",
        help=f"attention-side hardware: {_HW_NAMES} (default: %(default)s)",
    )
    s.add_argument(
        "--ffn-hardware",
        type=_hardware,
        default=None,
        metavar="NAME",
        help="FFN-side hardware, same names (default: as --hardware)",
    )
    s.add_argument(
        "--efficiency",
        type=fraction,
        default=1.0,
        metavar="ETA",
        help="fraction of peak FLOP/s and bandwidth reached, in (0, 1] (default: %(default)s)",
    )
    s.add_argument(
        "--kv-bytes",
        type=float,
        choices=(1.0, 2.0),
        default=1.0,
        metavar="{1,2}",
        help="bytes per KV value: 1 FP8, 2 BF16 (default: 1)",
    )
    s.add_argument(
        "--tpot-ms",
        type=positive_float,
        default=50.0,
        metavar="MS",
        help="time-per-output-token budget in ms, > 0 (default: %(default)s)",
    )
    s.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="N",
        help="a fixed total batch, >= 1, instead of the largest one within --tpot-ms",
    )
    s.add_argument(
        "--measured",
        default=None,
        metavar="FILE",
        help="a benchmark JSON with per-layer stage times (benchmarks/results/afd_*.json): "
        "simulate those runs and compare with their measured step time",
    )


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
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for f in (
        plots.roofline(hw, path=out / "roofline.png"),
        plots.cost_vs_context(hw, path=out / "cost_vs_context.png"),
    ):
        plots.close(f)
    setup = simulator.paper_setup(simulator.PAPER_AFD_RUNS[0], H800, simulator.Efficiency())
    res = simulator.simulate(simulator.analytic_layer_times(setup, 6144), 3)
    plots.close(plots.afd_timeline(res, path=out / "afd_timeline.png"))
    print(f"wrote roofline.png, cost_vs_context.png, afd_timeline.png under {out.resolve()}")
    return 0


def _simulate(args) -> int:
    if args.measured:
        if not Path(args.measured).is_file():
            raise UsageError(f"--measured {args.measured}: no such file")
        try:
            runs = simulator.load_measured(args.measured)
        except (ValueError, KeyError, TypeError) as e:  # malformed JSON or schema
            raise UsageError(f"--measured {args.measured}: {e}") from e
        for run in runs:
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


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    """Entry point; ``argv`` excludes the program name and the word "cost". Returns the exit
    code: 0, 1 (a failed run) or 2 (bad input; one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(debug or "--debug" in argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "tables")  # `step3-jax cost [--context N ...]` means the tables
    handlers = dict(tables=_tables, plots=_plots, simulate=_simulate)
    handlers["paper-runs"] = _paper_runs

    def run() -> int:
        args = _parser().parse_args(argv)
        return handlers[args.command](args)

    return run_guarded(run, PROG, debug)


if __name__ == "__main__":
    raise SystemExit(main())
