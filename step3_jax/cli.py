"""The ``step3-jax`` command.

step3-jax generate [--prompt TEXT ...]   # the embedded demo model (default command)
step3-jax chat [--checkpoint DIR]        # multi-turn chat, the release's template, streamed
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

    model, tok = _load(args)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    ids = [tok.encode(p, add_bos=True) for p in prompts]  # BOS if tokenizer_config says so
    stops = list(tok.eos_ids)
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
        "first_call_s_incl_compile": round(result.prefill_seconds + result.decode_seconds, 2),
    }
    print(
        f"\nthroughput: {summary['decode_tokens_per_s']} tokens/s decode "
        f"(batch {summary['batch']}, {summary['decode_steps']} steps, "
        f"{summary['decode_ms_per_step']} ms/step, prefill {summary['prefill_ms']} ms) "
        f"on {summary['device']}"
    )
    print(json.dumps(summary))
    return 0


def _enable_compile_cache() -> None:
    """Persists XLA executables across runs (jax's compilation cache), so a second
    ``step3-jax chat`` starts answering without recompiling. ``JAX_COMPILATION_CACHE_DIR``
    wins; default ``$XDG_CACHE_HOME/step3_jax/xla`` (``~/.cache/...``)."""
    import os
    from pathlib import Path

    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    jax.config.update("jax_compilation_cache_dir", str(base / "step3_jax" / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def cmd_chat(args, stdin=None, stdout=None, stderr=None) -> int:
    """Multi-turn chat on stdin/stdout: each reply streams as it is generated.

    Lines starting with ``/`` are commands: ``/reset`` forgets the conversation, ``/exit``
    (or end of input) quits. Reasoning (``<think>`` ... ``</think>``) and tool-call tokens
    are printed as the model writes them.
    """
    import threading
    import time

    from step3_jax.chat import chat_generate, split_reasoning

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if not args.no_compile_cache:
        _enable_compile_cache()
    t0 = time.perf_counter()
    model, tok = _load(args)
    # One KV-cache length for the whole session: one compiled decode loop for every reply
    # (and the warm-up compiles exactly it). The demo's whole context is 1024 tokens.
    cache_len = min(model.config.max_position_embeddings, args.max_context)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = stdin.isatty()
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    # Compile while the user types: a 2-token reply to a short message builds the decode loop
    # (and the prefill of short prompts) with the session's cache length and sampling.
    probe = [*system, {"role": "user", "content": "Hello."}]
    warm = threading.Thread(
        target=chat_generate,
        args=(model, tok, probe),
        kwargs=dict(max_new_tokens=2, max_cache_len=cache_len, **sampling),
        daemon=True,
    )
    warm.start()
    name = args.checkpoint or "the demo model (Jane Austen, not instruction-tuned)"
    print(
        f"step3-jax chat: {name}, ready in {time.perf_counter() - t0:.1f} s. "
        "/reset clears, /exit or Ctrl-D quits.",
        file=stderr,
    )
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=stderr)
            continue
        messages.append({"role": "user", "content": line})
        warm.join()  # never compile the same program twice at once
        print("assistant> ", end="", file=stdout, flush=True)

        def emit(text):
            print(text, end="", file=stdout, flush=True)

        try:
            res = chat_generate(
                model,
                tok,
                messages,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed + 1000 * turn,
                **sampling,
                on_text=emit,
                max_cache_len=cache_len,
            )
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\n[error: {e}]", file=stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print("\n(reply interrupted)", file=stderr)
            messages.pop()
            continue
        print(file=stdout, flush=True)
        _, content = split_reasoning(res.text)
        # What a vLLM client sends back: the answer, without the reasoning (if it ended).
        messages.append({"role": "assistant", "content": content if content else res.text})
        turn += 1
        if args.timing:
            rate = len(res.token_ids) / max(res.seconds, 1e-9)
            print(
                f"[{len(res.token_ids)} tokens, first after {res.first_token_seconds:.2f} s, "
                f"{rate:.1f} tokens/s, finish: {res.finish_reason}]",
                file=stderr,
            )
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
    c = sub.add_parser("chat", help="multi-turn chat (the release's chat template), streamed")
    c.add_argument("--checkpoint", help="HF-layout checkpoint folder (default: the demo model)")
    c.add_argument("--tokenizer", help="tokenizer.json (default: <checkpoint>/tokenizer.json)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--max-context",
        type=int,
        default=4096,
        help="KV-cache length of the session (capped at the model's context); /reset when full",
    )
    c.add_argument("--timing", action="store_true", help="tokens/s and first-token latency")
    c.add_argument(
        "--no-compile-cache", action="store_true", help="do not persist compiled XLA programs"
    )
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
        return cmd_generate(args)
    if args.command == "chat":
        return cmd_chat(args)
    return cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
