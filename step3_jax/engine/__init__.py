"""The decoding engine: paged KV cache, continuous batching, per-request sampling, streaming.

`Engine` (continuous batching) drives an executor: `ModelExecutor` (one device, the model over
a `PagedKVCache`) or `AfdEngineExecutor` (the compiled AFD step of `step3_jax.sharding`).
The HTTP server on top lives in `step3_jax.server` (optional extra ``serve``); this package
imports neither FastAPI nor uvicorn.
"""

from step3_jax.engine.engine import Engine, EngineStopped, QueueFull
from step3_jax.engine.executors import ModelExecutor
from step3_jax.engine.paged_cache import PageAllocator, PagedKVCache, PoolExhausted
from step3_jax.engine.requests import Delta, Request, RequestStream, SamplingParams

__all__ = [
    "Delta",
    "Engine",
    "EngineStopped",
    "ModelExecutor",
    "PageAllocator",
    "PagedKVCache",
    "PoolExhausted",
    "QueueFull",
    "Request",
    "RequestStream",
    "SamplingParams",
]
