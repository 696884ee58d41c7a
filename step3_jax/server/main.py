"""``step3-jax serve [options]``: load a model, build the engine, run uvicorn.

Registered in `step3_jax.cli` (``add_serve_args`` gives the flags, ``serve`` runs it). With no
``--checkpoint`` it serves the shipped demo model (CPU friendly, float32). Example::

    step3-jax serve --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "It is a truth universally acknowledged,", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

from step3_jax.cli_common import UsageError, non_negative_float, port, positive_int
from step3_jax.server.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES

log = logging.getLogger("step3_jax.server")


def shutdown_timeout(text: str) -> float:
    """Seconds, finite and within what a thread join takes (`threading.TIMEOUT_MAX`, ~292
    years: 1e10 s overflowed in `Thread.join` after the model had loaded)."""
    value = non_negative_float(text)
    if value > threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(
            f"expected at most {threading.TIMEOUT_MAX:.3g} seconds, got {text!r}"
        )
    return value


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The server's and engine's flags (the model flags come from `step3_jax.cli`)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=port, default=8000, help="(default: %(default)s)")
    p.add_argument("--model-name", help="the model id /v1/models reports")
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        help="decode slots of the engine (default: %(default)s)",
    )
    p.add_argument(
        "--max-len",
        type=positive_int,
        default=1024,
        help="prompt + output tokens per request at most (default: %(default)s)",
    )
    p.add_argument(
        "--page-size",
        type=positive_int,
        default=64,
        help="KV-cache page, tokens; a multiple of 64 on Hopper (default: %(default)s)",
    )
    p.add_argument(
        "--num-pages",
        type=positive_int,
        help="KV-cache pages (default: enough for every slot at --max-len)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=64,
        help="prompt tokens per prefill call (default: %(default)s)",
    )
    p.add_argument(
        "--prefill-rows",
        type=positive_int,
        default=1,
        help="requests prefilled per call (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=("model", "bfloat16", "fp8"),
        default="model",
        help="KV-cache dtype (default: the model's)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="waiting requests before 429 (default: %(default)s)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=positive_int,
        default=16,
        help="max_tokens of a request that gives none (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=shutdown_timeout,
        default=30.0,
        help="seconds in-flight requests get to finish at shutdown (default: %(default)s)",
    )
    p.add_argument(
        "--max-images",
        type=positive_int,
        default=DEFAULT_MAX_IMAGES,
        help="images per chat request at most (a Step3-VL checkpoint) (default: %(default)s)",
    )
    p.add_argument(
        "--max-image-bytes",
        type=positive_int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="decoded bytes of one image at most (default: %(default)s)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def build_engine(args, load_model):
    """``(engine, tokenizer, model_name)`` (warm unless --no-warmup); ``load_model(args)``
    returns ``(model, tokenizer)`` (`step3_jax.cli.load_model`)."""
    import jax.numpy as jnp
    import numpy as np

    from step3_jax.engine import Engine, ModelExecutor, SamplingParams

    model, tok = load_model(args)
    image_tokens = None
    if getattr(model, "vision_config", None) is not None:  # a Step3-VL checkpoint: images
        from step3_jax.vision.preprocess import ImageSpecialTokens

        image_tokens = ImageSpecialTokens.from_tokenizer(tok)
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
        image_tokens=image_tokens,
    )
    engine = Engine(executor, tok, eos_id=tok.eos_id, max_queue=args.max_queue)
    if not args.no_warmup:
        t0 = time.perf_counter()
        warm = [[1] * (args.prefill_chunk + 1)]  # compiles the prefill and the decode step
        engine.generate(warm, SamplingParams(max_tokens=2))
        if image_tokens is not None:  # the vision tower at both resolutions (view, crop)
            wide = np.full((300, 500, 3), 128, np.uint8)  # one global view + 2 crops
            try:
                engine.generate(
                    [[image_tokens.image]], SamplingParams(max_tokens=1), images=[[wide]]
                )
            except ValueError as e:  # --max-len below one image's 337 tokens
                log.warning("image warm-up skipped: %s", e)
        log.info("warm-up (compilation) took %.1f s", time.perf_counter() - t0)
    name = args.model_name or (args.checkpoint or "step3-demo")
    return engine, tok, name


def serve(args, load_model) -> int:
    try:
        import uvicorn

        from step3_jax.server.app import create_app
    except ImportError as e:
        raise UsageError(
            f"step3-jax serve needs FastAPI and uvicorn ({e}): pip install 'step3-jax[serve]'"
        ) from None
    logging.basicConfig(level=args.log_level.upper())
    engine, tok, name = build_engine(args, load_model)
    app = create_app(
        engine,
        tok,
        model_name=name,
        default_max_tokens=args.default_max_tokens,
        shutdown_timeout=args.shutdown_timeout,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout),
    )
    return 0


__all__ = ["add_serve_args", "build_engine", "serve"]
