"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]
_listening = [False]


def _on_event(event: str, *args, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        _compiles[0] += 1


def compile_count() -> int:
    """XLA compilations in this process since the first server was built."""
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening[0] = True
    return _compiles[0]


class ServerMetrics:
    def __init__(self, engine):
        compile_count()  # start counting now
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "step3_requests", "HTTP generation requests by outcome", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("step3_prompt_tokens", "prompt tokens", registry=r)
        self.generated_tokens = Counter("step3_generated_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(
            "step3_time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "step3_time_per_output_token_seconds", "mean TPOT of a request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "step3_request_seconds", "request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        gauges = {
            "step3_running_requests": ("requests in decode slots", lambda: engine.num_running),
            "step3_waiting_requests": ("requests queued", lambda: engine.num_waiting),
            "step3_engine_decode_steps": ("decode steps run", lambda: engine.stats["decode_steps"]),
            "step3_xla_compilations": ("XLA compilations in the process", compile_count),
            "step3_engine_compilations": ("engine programs compiled", engine.compile_count),
        }
        free = getattr(getattr(engine.executor, "allocator", None), "num_free", None)
        if free is not None:
            alloc = engine.executor.allocator
            gauges["step3_kv_pages_free"] = ("free KV-cache pages", lambda: alloc.num_free)
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)

    def observe(self, endpoint: str, request) -> None:
        """Records a finished engine request (`step3_jax.engine.Request`)."""
        self.requests.labels(endpoint, request.finish_reason or "error").inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generated_tokens.inc(len(request.output))
        if request.ttft is not None:
            self.ttft.observe(request.ttft)
        if request.finish_time is not None:
            self.e2e.observe(request.finish_time - request.arrival)
            if len(request.output) > 1 and request.first_token_time is not None:
                span = request.finish_time - request.first_token_time
                self.tpot.observe(span / (len(request.output) - 1))


__all__ = ["ServerMetrics", "compile_count"]
