"""Requests, their sampling parameters, streamed output and incremental detokenization."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from step3_jax.config import is_int
from step3_jax.sampling import (
    check_max_tokens,
    check_temperature,
    check_token_ids,
    check_top_k,
    check_top_p,
)

if TYPE_CHECKING:
    from step3_jax.engine.images import ImageInputs

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (validated here, so a bad request fails at submit)."""

    max_tokens: int = 16  # new tokens at most (stop token excluded)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0: all tokens
    stop_token_ids: tuple[int, ...] = ()  # finish when sampled (not included in the output)
    stop: tuple[str, ...] = ()  # finish when the text contains one (text cut before it)
    ignore_eos: bool = False  # keep going past the tokenizer's eos
    seed: int | None = None  # None: the engine picks one per request

    def __post_init__(self):
        check_max_tokens(self.max_tokens, "max_tokens")
        check_temperature(self.temperature)
        check_top_p(self.top_p)
        check_top_k(self.top_k, None)  # <= vocab_size: checked at submit
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # as OpenAI's API
        if not isinstance(stop, Sequence) or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(
                f"stop must be a string or a sequence of non-empty strings, got {stop!r}"
            )
        ids = check_token_ids(self.stop_token_ids, "stop_token_ids")  # < vocab_size: at submit
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        object.__setattr__(self, "stop", tuple(stop))


@dataclasses.dataclass
class Delta:
    """One streamed piece of a request's output."""

    token_ids: list[int]  # new tokens (a stop token is not included)
    text: str  # new text ("" without a tokenizer, or while held back by a stop string)
    finish_reason: str | None = None  # set on the last delta: "stop" | "length" | "cancelled"


class RequestStream:
    """Output of one request as it is produced: iterate it (``for delta in stream``) or
    ``async for delta in stream`` (created by `Engine.submit` with ``loop=``). The last delta
    carries the finish reason. ``cancel()`` stops the request (a final "cancelled" delta)."""

    def __init__(self, request: Request, engine, loop: asyncio.AbstractEventLoop | None = None):
        self.request, self._engine, self._loop = request, engine, loop
        self._q = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._done = False

    @property
    def request_id(self) -> int:
        return self.request.id

    def push(self, delta: Delta) -> None:
        """Called by the engine thread."""
        if self._loop is None:
            self._q.put(delta)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._q.put_nowait, delta)

    def cancel(self) -> None:
        self._engine.cancel(self.request.id)

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        if self._loop is not None:
            raise TypeError("this stream was created with loop=: use `async for`")
        if self._done:
            raise StopIteration
        delta = self._q.get()
        self._done = delta.finish_reason is not None
        return delta

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self._loop is None:
            raise TypeError("this stream was created without loop=: use `for`")
        if self._done:
            raise StopAsyncIteration
        delta = await self._q.get()
        self._done = delta.finish_reason is not None
        return delta

    def result(self) -> Request:
        """Blocks until the request finishes (sync streams); returns the finished request."""
        for _ in self:
            pass
        return self.request


class Detokenizer:
    """Incremental text of a growing token list, holding back what a stop string could still
    claim and trailing U+FFFD (an incomplete UTF-8 sequence of a byte-level BPE)."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters of the text already streamed

    def update(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """``(new text to stream, hit a stop string)`` after ``ids`` (all output tokens)."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(ids)
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = text[self.emitted : cut] if cut > self.emitted else ""
            self.emitted = max(cut, self.emitted)
            return out, True
        end = len(text) if final else len(text) - self.hold
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        out = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(end, self.emitted)
        return out, False


@dataclasses.dataclass
class Request:
    """A request's state inside the engine (host side)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    output: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    cancel_requested: bool = False
    images: ImageInputs | None = None  # until its prefill is done (Step3-VL executors)

    @property
    def budget(self) -> int:
        """Cache tokens the request may need: prompt + max_tokens."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival


__all__ = ["FINISH_REASONS", "Delta", "Detokenizer", "Request", "RequestStream", "SamplingParams"]
