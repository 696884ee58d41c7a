"""The ``step3-jax`` command.

step3-jax generate [--prompt TEXT ...]   # the embedded demo model (default command)
step3-jax info [--config step3|tiny]     # parameter counts and KV-cache bytes
step3-jax cost ...                        # the paper's cost model (step3_jax.cost.cli)
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROMPTS = (  # the demo model was trained on Jane Austen's novels
    "It is a truth universally acknowledged, that",
    '"My dear Emma," said Mr. Knightley,',
    "The next morning",
)


def _load(args):
    from step3_jax import checkpoints

    if args.checkpoint:
        model = checkpoints.load_hf(args.checkpoint)
        tokenizer = checkpoints.load_tokenizer(
            args.tokenizer or f"{args.checkpoint}/tokenizer.json"
        )
        return model, tokenizer
    return checkpoints.load_demo()


def cmd_generate(args) -> int:
    import jax

    from step3_jax.decode import generate
    from step3_jax.sampling import sampling_params

    sampling_params(args.temperature, args.top_k, args.top_p, 1)  # fail before loading
    model, tok = _load(args)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    ids = [tok.encode(p) for p in prompts]
    stops = [tok.eos_id] if getattr(tok, "eos_id", None) is not None else []
    kwargs = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=stops,
        seed=args.seed,
    )
    result = generate(model, ids, args.max_new_tokens, **kwargs)  # first call compiles
    for prompt, new in zip(prompts, result.tokens, strict=True):
        print(f"\n>>> {prompt}{tok.decode(new)}")
    warm = generate(model, ids, args.max_new_tokens, **kwargs)  # timed warm call
    summary = {
        "device": jax.devices()[0].device_kind,
        "batch": len(ids),
        "decode_steps": warm.decode_steps,
        "decode_tokens_per_s": round(warm.decode_tokens_per_second, 1),
        "decode_ms_per_step": round(1e3 * warm.decode_seconds / max(warm.decode_steps, 1), 3),
        "prefill_ms": round(1e3 * warm.prefill_seconds, 2),
        "first_call_compile_s": round(result.compile_seconds, 2),
        "first_call_s_incl_compile": round(
            result.prefill_seconds + result.decode_seconds + result.compile_seconds, 2
        ),
    }
    print(
        f"\nthroughput: {summary['decode_tokens_per_s']} tokens/s decode "
        f"(batch {summary['batch']}, {summary['decode_steps']} steps, "
        f"{summary['decode_ms_per_step']} ms/step, prefill {summary['prefill_ms']} ms) "
        f"on {summary['device']}"
    )
    print(json.dumps(summary))
    return 0


def cmd_info(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step3-jax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="generate text with the demo (or a given) model")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint", help="HF-layout checkpoint folder (default: the demo model)")
    g.add_argument("--tokenizer", help="tokenizer.json (default: <checkpoint>/tokenizer.json)")
    i = sub.add_parser("info", help="parameter counts and KV bytes of a preset")
    i.add_argument("--config", choices=("step3", "tiny"), default="step3")
    sub.add_parser(
        "cost", help="the paper's cost model; see `step3-jax cost --help`", add_help=False
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cost":
        from step3_jax.cost.cli import main as cost_main

        return cost_main(argv[1:])
    args = build_parser().parse_args(argv or ["generate"])
    if args.command in (None, "generate"):
        if args.command is None:
            args = build_parser().parse_args(["generate"])
        try:
            return cmd_generate(args)
        except ValueError as e:  # bad arguments (e.g. --temperature nan): no traceback, exit 2
            print(f"step3-jax: error: {e}", file=sys.stderr)
            return 2
    return cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
