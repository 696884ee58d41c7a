"""step3-jax: the command line of step3_jax, a JAX / Flax NNX implementation of StepFun's
Step-3 decoder (MFA attention, FP8, Attention-FFN Disaggregation) with Pallas GPU kernels.

  step3-jax generate [--prompt TEXT ...]   generate text with the shipped demo model (default)
                     [--image PATH ...]    ... about images (a Step3-VL --checkpoint)
  step3-jax chat [--system TEXT]           multi-turn chat (the release's template), streamed
                 [--image PATH]            (/image PATH attaches an image to the next turn)
  step3-jax info [--config step3|tiny]     parameter counts and KV-cache bytes of a preset
  step3-jax cost ...                       the paper's cost model (`step3-jax cost --help`)
  step3-jax serve [--port N ...]           OpenAI-compatible HTTP server (the demo model)

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
DEFAULT_IMAGE_PROMPT = "Describe this image."
IMAGE_MARKER = "<im_patch>"  # one per image in a prompt (the chat template writes it too)
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


def load_model(args: argparse.Namespace, vision: bool | None = False):
    """``(model, tokenizer)`` named by --checkpoint / --tokenizer, or the demo model.

    ``vision``: True loads a `step3_jax.vision.Step3VLModel` (--image given: the checkpoint
    must be a Step3-VL one), None does where the checkpoint has a ``vision_config``, False
    loads the text model alone."""
    from step3_jax import checkpoints

    if not args.checkpoint:
        if args.tokenizer:
            raise UsageError("--tokenizer needs --checkpoint (the demo model has its own)")
        if vision:
            raise UsageError(_TEXT_ONLY.format(name="the demo model"))
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
    if vision is not False and "vision_config" in json.loads((ckpt / "config.json").read_text()):
        tok = checkpoints.load_tokenizer(tok_path)
        _check_image_tokens(tok)
        return checkpoints.load_hf_vl(ckpt), tok
    if vision:
        raise UsageError(_TEXT_ONLY.format(name=f"--checkpoint {ckpt}"))
    return checkpoints.load_hf(ckpt), checkpoints.load_tokenizer(tok_path)


_TEXT_ONLY = (
    "--image: {name} is text-only (its config.json has no vision_config); images need a "
    "Step3-VL checkpoint"
)


def _check_image_tokens(tok) -> None:
    from step3_jax.vision.preprocess import ImageSpecialTokens

    try:
        ImageSpecialTokens.from_tokenizer(tok)
    except ValueError as e:
        raise UsageError(f"--tokenizer: a Step3-VL checkpoint needs its image tokens; {e}") from e


def add_image_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--image", action="append", metavar="PATH", default=[], help=help)


def read_images(paths: list[str], flag: str = "--image") -> list:
    """The images at ``paths`` as Pillow RGB images; an unreadable one is a UsageError."""
    from step3_jax.vision.preprocess import load_image

    out = []
    for path in paths:
        try:
            out.append(load_image(path))
        except (ValueError, TypeError, OSError) as e:
            raise UsageError(f"{flag} {path}: {e}") from e
    return out


def attach_images(prompts: list[str], count: int) -> list[str]:
    """Each prompt with ``count`` image markers: as written (exactly ``count`` of them), or
    prepended when it has none."""
    out = []
    for i, text in enumerate(prompts):
        found = text.count(IMAGE_MARKER)
        if found == 0:
            text = IMAGE_MARKER * count + text
        elif found != count:
            raise UsageError(
                f"--prompt number {i + 1} has {found} {IMAGE_MARKER} marker(s) but {count} "
                f"--image(s) were given (write one per image, or none to put them first)"
            )
        out.append(text)
    return out


def check_prompts(prompts: list[str]) -> None:
    for i, text in enumerate(prompts):
        if not text.strip():
            raise UsageError(f"--prompt number {i + 1} is empty; give some text to continue")


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    check_prompts(prompts)
    # A BOS first when tokenizer_config.json's add_bos_token asks for it (the release's does).
    bos = getattr(tokenizer, "add_bos_token", False)
    ids = [
        tokenizer.encode(text, add_bos=True) if bos else tokenizer.encode(text) for text in prompts
    ]
    for text, row in zip(prompts, ids, strict=True):
        if not row:
            raise UsageError(f"--prompt {text!r} encodes to no tokens")
    return ids


# --- generate -----------------------------------------------------------------------------


def add_sampling_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
    """``--temperature``, ``--top-k``, ``--top-p`` (one definition for every subcommand)."""
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=temperature,
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


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="text to continue; repeat the flag for a batch (default: three Austen openings; "
        f"with --image: {DEFAULT_IMAGE_PROMPT!r})",
    )
    add_image_arg(
        p,
        "an image file every prompt sees (a Step3-VL --checkpoint); repeat for several. A "
        f"prompt holds one {IMAGE_MARKER} per image where it goes, or none: images first",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=48,
        metavar="N",
        help="tokens to generate per prompt, >= 1 (default: %(default)s)",
    )
    add_sampling_args(p, temperature=0.8)
    p.add_argument(
        "--seed", type=int, default=0, metavar="INT", help="sampling seed (default: %(default)s)"
    )
    add_model_args(p)


@subcommand("generate", "generate text with the demo model (or --checkpoint)", _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    from step3_jax.decode import generate

    prompts = args.prompt or ([DEFAULT_IMAGE_PROMPT] if args.image else list(DEFAULT_PROMPTS))
    check_prompts(prompts)  # before the (slow) model load
    images = read_images(args.image)
    model, tok = load_model(args, vision=True) if images else load_model(args)
    if images:
        generate = _image_generate(tok, images, len(prompts))
    ids = encode_prompts(tok, attach_images(prompts, len(images)) if images else prompts)
    stops = list(getattr(tok, "eos_ids", ()))  # eos + generation_config.json's eos ids
    if not stops and getattr(tok, "eos_id", None) is not None:
        stops = [tok.eos_id]
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


def _image_generate(tok, images: list, batch: int) -> Callable:
    """`step3_jax.vision.generate.generate` with ``images`` for each of ``batch`` prompts."""
    import functools

    from step3_jax.vision.generate import generate
    from step3_jax.vision.preprocess import ImageSpecialTokens

    special = ImageSpecialTokens.from_tokenizer(tok)
    return functools.partial(generate, images=[images] * batch, special=special)


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


# --- chat ---------------------------------------------------------------------------------


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: none)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=128,
        metavar="N",
        help="longest reply in tokens, >= 1 (default: %(default)s)",
    )
    add_sampling_args(p, temperature=0.7)
    p.add_argument(
        "--seed", type=int, default=0, metavar="INT", help="sampling seed (default: %(default)s)"
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=4096,
        metavar="N",
        help="KV-cache length of the session, capped at the model's context; /reset when "
        "full (default: %(default)s)",
    )
    add_image_arg(
        p,
        "an image for the first user turn (a Step3-VL --checkpoint); repeat for several. "
        "In the session, '/image PATH' attaches one to the next turn",
    )
    p.add_argument("--timing", action="store_true", help="print tokens/s and first-token time")
    p.add_argument(
        "--no-compile-cache", action="store_true", help="do not persist compiled XLA programs"
    )
    add_model_args(p)


def _enable_compile_cache() -> None:
    """Persists XLA executables across runs (jax's compilation cache), so a second
    ``step3-jax chat`` answers without recompiling. ``JAX_COMPILATION_CACHE_DIR`` wins;
    default ``$XDG_CACHE_HOME/step3_jax/xla`` (``~/.cache/...``)."""
    import os

    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    jax.config.update("jax_compilation_cache_dir", str(base / "step3_jax" / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _chat_reply(args, model, tok, messages, images, turn: int, cache_len, stdout, stderr):
    """Streams one reply to ``stdout``; returns the `ChatResult`, or None if it failed."""
    from step3_jax.chat import chat_generate

    print("assistant> ", end="", file=stdout, flush=True)
    try:
        res = chat_generate(
            model,
            tok,
            messages,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed + 1000 * turn,
            on_text=lambda text: print(text, end="", file=stdout, flush=True),
            max_cache_len=cache_len,
            images=images or None,
        )
    except ValueError as e:  # e.g. the conversation outgrew the session's cache
        print(f"\n[error: {e}]", file=stderr)
        return None
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
        print("\n(reply interrupted)", file=stderr)
        return None
    print(file=stdout, flush=True)
    if args.timing:
        rate = len(res.token_ids) / max(res.seconds, 1e-9)
        print(
            f"[{len(res.token_ids)} tokens, first after {res.first_token_seconds:.2f} s, "
            f"{rate:.1f} tokens/s, finish: {res.finish_reason}]",
            file=stderr,
        )
    return res


def _chat_warmup(args, model, tok, system: list, cache_len: int):
    """Compiles while the user types: a 2-token reply to a short message builds the decode
    loop (and the prefill of short prompts) with the session's cache length and sampling."""
    import threading

    from step3_jax.chat import chat_generate

    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    probe = [*system, {"role": "user", "content": "Hello."}]

    def warm_up():
        try:
            chat_generate(model, tok, probe, max_new_tokens=2, max_cache_len=cache_len, **kwargs)
        except ValueError:  # e.g. no room for the probe's reply: the first turn says its own
            pass

    warm = threading.Thread(target=warm_up, daemon=True)
    warm.start()
    return warm


def _check_chat_room(tok, system: list, cache_len: int) -> None:
    """A UsageError before the session when even an empty first turn leaves no room for a
    reply within the session's cache (a small ``--max-context`` or a long ``--system``)."""
    from step3_jax.chat import render_chat

    used = len(tok.encode(render_chat(tok, [*system, {"role": "user", "content": ""}])))
    if used >= cache_len:
        raise UsageError(
            f"--max-context: the session's {cache_len}-token context leaves no room for a "
            f"reply; the system prompt and an empty first turn are already {used} tokens"
        )


def _user_content(line: str, num_images: int):
    """A user turn's content: the text, after one image part per attached image."""
    text = line.rstrip("\n")
    if not num_images:
        return text
    return [{"type": "image"}] * num_images + [{"type": "text", "text": text}]


def _count_images(message: dict) -> int:
    content = message.get("content")
    return sum(1 for p in content if p.get("type") == "image") if isinstance(content, list) else 0


def _chat_image(model, path: str, stderr) -> list:
    """``/image PATH``: the image as a one-item list, or [] after one error line."""
    if getattr(model, "vision_config", None) is None:
        print("[error: /image needs a Step3-VL checkpoint; this model is text-only]", file=stderr)
        return []
    if not path:
        print("[error: /image needs a path: /image PATH]", file=stderr)
        return []
    try:
        image = read_images([path], flag="/image")
    except UsageError as e:
        print(f"[error: {e}]", file=stderr)
        return []
    print(f"(image {path} attached to your next message)", file=stderr)
    return image


@subcommand("chat", "multi-turn chat with the release's chat template, streamed", _chat_args)
def cmd_chat(args: argparse.Namespace, stdin=None, stdout=None, stderr=None) -> int:
    """Reads user turns from stdin, streams each reply. ``/reset`` forgets the conversation,
    ``/image PATH`` attaches an image to the next turn, ``/exit`` (or end of input) quits.
    Reasoning (``<think>`` ... ``</think>``) and tool-call tokens are printed as the model
    writes them."""
    import time

    from step3_jax.chat import split_reasoning

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if not args.no_compile_cache:
        _enable_compile_cache()
    t0 = time.perf_counter()
    pending = read_images(args.image)  # for the first user turn
    model, tok = load_model(args, vision=True if pending else None)
    # One KV-cache length for the session: one compiled decode loop, the one warmed up.
    cache_len = min(model.config.max_position_embeddings, args.max_context)
    system = [{"role": "system", "content": args.system}] if args.system else []
    _check_chat_room(tok, system, cache_len)
    warm, messages, turn = _chat_warmup(args, model, tok, system, cache_len), list(system), 0
    images: list = []  # the conversation's images, in order of their content parts
    name = args.checkpoint or "the demo model (Jane Austen, not instruction-tuned)"
    print(
        f"step3-jax chat: {name}, ready in {time.perf_counter() - t0:.1f} s. "
        "/reset clears, /image PATH attaches an image, /exit or Ctrl-D quits.",
        file=stderr,
    )
    while True:
        if stdin.isatty():
            print("you> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages, images, pending = list(system), [], []
            print("(conversation cleared)", file=stderr)
        elif line.strip().split(maxsplit=1)[:1] == ["/image"]:
            pending += _chat_image(model, line.strip()[len("/image") :].strip(), stderr)
        elif line.strip():
            warm.join()  # never compile the same program twice at once
            messages.append({"role": "user", "content": _user_content(line, len(pending))})
            images, pending = images + pending, []
            res = _chat_reply(args, model, tok, messages, images, turn, cache_len, stdout, stderr)
            if res is None:  # the turn is dropped; its images wait for the next one
                pending = images[len(images) - _count_images(messages.pop()) :]
                images = images[: len(images) - len(pending)]
                continue
            # What a vLLM client sends back: the answer without its reasoning (if it ended).
            _, content = split_reasoning(res.text)
            messages.append({"role": "assistant", "content": content or res.text})
            turn += 1
    return 0


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


# --- serve --------------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    from step3_jax.server.main import add_serve_args

    add_model_args(p)
    add_serve_args(p)


@subcommand("serve", "OpenAI-compatible HTTP server (needs the serve extra)", _serve_args)
def cmd_serve(args: argparse.Namespace) -> int:
    import functools

    from step3_jax.server.main import serve

    # A checkpoint with a vision_config serves as Step3-VL (images in chat messages).
    return serve(args, functools.partial(load_model, vision=None))


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
