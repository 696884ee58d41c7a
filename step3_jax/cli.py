"""step3-jax: the command line of step3_jax, a JAX / Flax NNX implementation of StepFun's
Step-3 decoder (MFA attention, FP8, Attention-FFN Disaggregation) with Pallas GPU kernels.

  step3-jax generate [--prompt TEXT ...]   generate text with the shipped demo model (default)
  step3-jax info [--config step3|tiny]     parameter counts and KV-cache bytes of a preset
  step3-jax cost ...                       the paper's cost model (`step3-jax cost --help`)

Adding a subcommand: write `_NAME_args(parser)` (its flags) and `cmd_NAME(args) -> int`, and
register it with `@subcommand("NAME", "one-line help", _NAME_args)` above `cmd_NAME`. Raise
`UsageError` (or ValueError / FileNotFoundError) for bad input: `main` prints it as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from step3_jax.cli_common import (
    Parser,
    UsageError,
    debug_requested,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_guarded,
)

PROG = "step3-jax"
DEFAULT_PROMPTS = (  # the demo model was trained on Jane Austen's novels
    "It is a truth universally acknowledged, that",
    '"My dear Emma," said Mr. Knightley,',
    "The next morning",
)
EPILOG = (
    "Errors print one line and exit with code 2 (bad input) or 1; add --debug or set "
    "STEP3_JAX_DEBUG=1 for the Python traceback."
)


@dataclasses.dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}  # filled by @subcommand, in definition order


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Registers ``cmd_NAME(args) -> int`` as ``step3-jax NAME``."""

    def register(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)
        return run

    return register


# --- loading a model: shared by every subcommand that runs one ----------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a Hugging Face-layout checkpoint folder (config.json + *.safetensors) "
        "(default: the demo model shipped in the package)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="a tokenizer.json, or a folder holding one (default: DIR/tokenizer.json)",
    )


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` named by --checkpoint / --tokenizer, or the demo model."""
    from step3_jax import checkpoints

    if not args.checkpoint:
        if args.tokenizer:
            raise UsageError("--tokenizer needs --checkpoint (the demo model has its own)")
        return checkpoints.load_demo()
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UsageError(f"--checkpoint {ckpt}: no such directory")
    if not (ckpt / "config.json").is_file():
        raise UsageError(
            f"--checkpoint {ckpt}: no config.json there (expected a Hugging Face checkpoint "
            "folder with config.json and *.safetensors)"
        )
    tok_path = Path(args.tokenizer) if args.tokenizer else ckpt / "tokenizer.json"
    if not (tok_path.is_file() or (tok_path / "tokenizer.json").is_file()):
        flag = "--tokenizer" if args.tokenizer else "--checkpoint"
        raise UsageError(f"{flag}: no tokenizer.json at {tok_path}; pass --tokenizer FILE")
    return checkpoints.load_hf(ckpt), checkpoints.load_tokenizer(tok_path)


def check_prompts(prompts: list[str]) -> None:
    for i, text in enumerate(prompts):
        if not text.strip():
            raise UsageError(f"--prompt number {i + 1} is empty; give some text to continue")


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    check_prompts(prompts)
    ids = [tokenizer.encode(text) for text in prompts]
    for text, row in zip(prompts, ids, strict=True):
        if not row:
            raise UsageError(f"--prompt {text!r} encodes to no tokens")
    return ids


# --- generate -----------------------------------------------------------------------------


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="text to continue; repeat the flag for a batch (default: three Austen openings)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=48,
        metavar="N",
        help="tokens to generate per prompt, >= 1 (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.8,
        metavar="T",
        help="sampling temperature, >= 0; 0 means greedy (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="sample among the K most likely tokens; 0 means no limit (default: %(default)s)",
    )
    p.add_argument(
        "--top-p",
        type=fraction,
        default=0.9,
        metavar="P",
        help="nucleus sampling: keep the smallest set of tokens with probability >= P, "
        "in (0, 1]; 1 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="INT", help="sampling seed (default: %(default)s)"
    )
    add_model_args(p)


@subcommand("generate", "generate text with the demo model (or --checkpoint)", _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    from step3_jax.decode import generate

    prompts = args.prompt or list(DEFAULT_PROMPTS)
    check_prompts(prompts)  # before the (slow) model load
    model, tok = load_model(args)
    ids = encode_prompts(tok, prompts)
    stops = [tok.eos_id] if getattr(tok, "eos_id", None) is not None else []
    kwargs = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=stops,
        seed=args.seed,
    )
    first = generate(model, ids, args.max_new_tokens, **kwargs)  # compiles on first use
    for prompt, new in zip(prompts, first.tokens, strict=True):
        print(f"\n>>> {prompt}{tok.decode(new)}")
    summary = _timing_summary(first, lambda: generate(model, ids, args.max_new_tokens, **kwargs))
    print(
        f"\ncompile: {summary['compile_s']} s (first call only; later calls with the same "
        "shapes reuse the compiled program)"
    )
    print(
        f"decode:  {summary['decode_tokens_per_s']} tokens/s (batch {summary['batch']}, "
        f"{summary['decode_steps']} steps, {summary['decode_ms_per_step']} ms/step), "
        f"prefill {summary['prefill_ms']} ms, on {summary['device']}"
    )
    print(json.dumps(summary))
    return 0


def _timing_summary(first, rerun: Callable) -> dict:
    """Compile and decode time, separately.

    Decode figures come from a second (warm) call, which reuses the compiled program. Compile
    time is the first call's ``compile_seconds`` where the result reports it, else the first
    call's time minus the warm call's.
    """
    import jax

    warm = rerun()
    compile_s = getattr(first, "compile_seconds", None)
    source = "GenerationResult.compile_seconds"
    if compile_s is None:
        total = lambda r: r.prefill_seconds + r.decode_seconds
        compile_s, source = max(total(first) - total(warm), 0.0), "first call - warm call"
    return {
        "device": jax.devices()[0].device_kind,
        "batch": len(warm.tokens),
        "compile_s": round(compile_s, 2),
        "compile_source": source,
        "decode_steps": warm.decode_steps,
        "decode_tokens_per_s": round(warm.decode_tokens_per_second, 1),
        "decode_ms_per_step": round(1e3 * warm.decode_seconds / max(warm.decode_steps, 1), 3),
        "prefill_ms": round(1e3 * warm.prefill_seconds, 2),
    }


# --- info ---------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        choices=("step3", "tiny"),
        default="step3",
        help="step3: the real 316B model; tiny: the small test configuration "
        "(default: %(default)s)",
    )


@subcommand("info", "parameter counts and KV-cache bytes of a preset config", _info_args)
def cmd_info(args: argparse.Namespace) -> int:
    from step3_jax.config import Step3Config

    cfg = getattr(Step3Config, args.config)()
    info = {
        "config": args.config,
        "params_total": cfg.param_count(),
        "params_activated": cfg.activated_param_count(),
        "params_activated_no_embeddings": cfg.activated_param_count(include_embeddings=False),
        "kv_bytes_per_token_per_layer_fp8": cfg.kv_bytes_per_token(1, per_layer=True),
        "kv_bytes_per_token_fp8": cfg.kv_bytes_per_token(1),
    }
    print(json.dumps(info, indent=2))
    return 0


# --- the parser and the entry point --------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\nAdding")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--debug", action="store_true", help="show the Python traceback on errors (any position)"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in SUBCOMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=EPILOG)
        cmd.add_arguments(sp)
    # `cost` has its own parser (step3_jax.cost.cli); listed here for --help only.
    sub.add_parser(
        "cost", help="the paper's cost model: tables, plots, AFD simulator", add_help=False
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``step3-jax``; returns the exit code (0, 1 failed run, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested("--debug" in argv)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    if argv[:1] == ["cost"]:
        from step3_jax.cost.cli import main as cost_main

        return cost_main(argv[1:], debug=debug)

    def run() -> int:
        args = build_parser().parse_args(argv or ["generate"])
        return SUBCOMMANDS[args.command].run(args)

    return run_guarded(run, PROG, debug)


if __name__ == "__main__":
    sys.exit(main())
