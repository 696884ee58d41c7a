"""``step3-jax serve [options]``: load a model, build the engine, run uvicorn.

With no ``--checkpoint`` it serves the shipped demo model (CPU friendly, float32). Example::

    step3-jax serve --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "It is a truth universally acknowledged,", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("step3_jax.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step3-jax serve", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", help="HF-layout checkpoint folder (default: the demo model)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: <checkpoint>/tokenizer.json)")
    p.add_argument("--model-name", default=None, help="the id /v1/models reports")
    p.add_argument("--max-batch", type=int, default=32, help="decode slots")
    p.add_argument("--max-len", type=int, default=1024, help="prompt + output tokens at most")
    p.add_argument("--page-size", type=int, default=64, help="a multiple of 64 on Hopper")
    p.add_argument("--num-pages", type=int, default=None, help="default: max-batch x max-len")
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--prefill-rows", type=int, default=1, help="requests per prefill call")
    p.add_argument("--cache-dtype", choices=("model", "bfloat16", "fp8"), default="model")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests (429 beyond)")
    p.add_argument("--default-max-tokens", type=int, default=16)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    p.add_argument("--log-level", default="info")
    return p


def build_engine(args):
    """``(engine, tokenizer, model_name)`` from parsed arguments (warm unless --no-warmup)."""
    import jax.numpy as jnp

    from step3_jax import checkpoints
    from step3_jax.engine import Engine, ModelExecutor, SamplingParams

    if args.checkpoint:
        model = checkpoints.load_hf(args.checkpoint)
        tok = checkpoints.load_tokenizer(args.tokenizer or f"{args.checkpoint}/tokenizer.json")
    else:
        model, tok = checkpoints.load_demo()
    cache_dtype = {"model": None, "bfloat16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}
    executor = ModelExecutor(
        model,
        max_batch=args.max_batch,
        max_len=args.max_len,
        page_size=args.page_size,
        num_pages=args.num_pages,
        prefill_chunk=args.prefill_chunk,
        prefill_rows=args.prefill_rows,
        cache_dtype=cache_dtype[args.cache_dtype],
    )
    engine = Engine(executor, tok, eos_id=tok.eos_id, max_queue=args.max_queue)
    if not args.no_warmup:
        t0 = time.perf_counter()
        engine.generate([[1] * (args.prefill_chunk + 1)], SamplingParams(max_tokens=2))
        log.info("warm-up (compilation) took %.1f s", time.perf_counter() - t0)
    name = args.model_name or ("step3-demo" if not args.checkpoint else args.checkpoint)
    return engine, tok, name


def serve(args) -> int:
    import uvicorn

    from step3_jax.server.app import create_app

    logging.basicConfig(level=args.log_level.upper())
    engine, tok, name = build_engine(args)
    app = create_app(
        engine,
        tok,
        model_name=name,
        default_max_tokens=args.default_max_tokens,
        shutdown_timeout=args.shutdown_timeout,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("step3-jax serve needs FastAPI and uvicorn: pip install 'step3-jax[serve]'")
        return 1
    return serve(args)


__all__ = ["build_engine", "build_parser", "main", "serve"]
