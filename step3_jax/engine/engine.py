"""`Engine`: continuous batching over an executor's fixed-shape decode step.

Each iteration (`Engine.step`):

1. drops cancelled requests (their slot and KV memory return at once);
2. admits waiting requests, oldest first, into free slots while the executor has KV memory for
   their whole budget (prompt + max_tokens); a request that does not fit *now* waits at the
   head of the queue (FIFO: no starvation), one that can *never* fit is refused at `submit`;
   then the vision tower runs, once, for the oldest admitted image request still without
   features (one request per iteration, outside the lock, never inside a step; such a
   request starts its prefill once its features exist: `step3_jax.engine.images`);
3. runs ONE prefill call: the next ``prefill_chunk`` prompt tokens of up to ``prefill_rows``
   requests being prefilled. A long prompt is spread over several iterations, so it delays
   the running requests by one chunk per step, never by its whole length (chunked prefill);
   a request whose prompt completes samples its first token from that call; a chunk holding
   image placeholders carries their feature rows;
4. runs ONE decode step over all ``max_batch`` slots (fixed shape: requests coming and going
   never recompile) and samples every decoding slot with its own parameters
   (`step3_jax.engine.sampling.sample_rows`), then applies stop tokens, stop strings and
   max_tokens, and streams the new tokens.

The engine runs in the caller's thread (`step`, `run_until_done`, `generate`) or in its own
background thread (`start` / `shutdown`), which is what the HTTP server uses; `submit` and
`cancel` are thread-safe.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from step3_jax.decode import check_prompt
from step3_jax.engine.images import ImageInputs
from step3_jax.engine.paged_cache import PoolExhausted
from step3_jax.engine.requests import Delta, Detokenizer, Request, RequestStream, SamplingParams
from step3_jax.engine.sampling import sample_rows
from step3_jax.sampling import check_token_ids, check_top_k


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class Engine:
    """Continuous batching over ``executor`` (`step3_jax.engine.executors`).

    Args:
      executor: a `ModelExecutor`, `AfdEngineExecutor` or anything with their interface.
      tokenizer: ``decode(ids) -> str`` for streamed text and stop strings (optional).
      eos_id: a stop token for every request unless it sets ``ignore_eos``.
      max_queue: waiting requests at most (`QueueFull` beyond).
      seed: base of the per-request seeds of requests without one.
      max_pixel_bytes: host bytes of preprocessed images (float32 pixels, held from submit
        until the vision tower runs at admission) over all requests at most; beyond it
        `submit` raises `QueueFull` (a request that alone exceeds it: ValueError).
    """

    def __init__(
        self, executor, tokenizer=None, *, eos_id=None, max_queue=256, seed=0,
        max_pixel_bytes: int = 4 << 30,
    ):  # fmt: skip
        self.executor, self.tokenizer, self.eos_id = executor, tokenizer, eos_id
        self.max_queue, self.seed = int(max_queue), int(seed)
        self.max_pixel_bytes, self.pixel_bytes = int(max_pixel_bytes), 0
        b = executor.max_batch
        self.slots: list[Request | None] = [None] * b
        self.waiting: collections.deque[Request] = collections.deque()
        self.streams: dict[int, RequestStream] = {}
        self._detok: dict[int, Detokenizer] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = collections.Counter()  # requests_*, tokens_*, *_steps, *_seconds
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ submit / cancel
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        images: Sequence | None = None,
        loop=None,
    ) -> RequestStream:
        """Queues a request; returns its stream (async with ``loop=`` an asyncio loop).

        ``images`` (an executor over a `step3_jax.vision.Step3VLModel`: `accepts_images`):
        paths, bytes, PIL images or uint8 arrays, one per ``<im_patch>`` marker of ``prompt``
        in order. They are preprocessed here, in the caller's thread; the request's prompt
        becomes the expanded one (image placeholders included).

        Raises ValueError (bad prompt or images, images for a text-only model, or prompt +
        max_tokens can never fit), `QueueFull`, `EngineStopped`."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Engine(tokenizer=...))")
        vocab = self.executor.vocab_size
        check_top_k(params.top_k, vocab)
        check_token_ids(params.stop_token_ids, "stop_token_ids", vocab)
        prompt, image_inputs = self._expand(self._check_ids(prompt), images)
        self._check_fits(prompt, params)
        pixels = 0 if image_inputs is None else image_inputs.pixel_bytes
        if pixels > self.max_pixel_bytes:
            raise ValueError(
                f"the images preprocess to {pixels} bytes of pixels, more than the engine's "
                f"max_pixel_bytes={self.max_pixel_bytes}"
            )
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if self.error is not None:  # the thread died: nothing would ever serve this
                raise EngineStopped(f"the engine thread failed: {self.error!r}")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue)")
            if self.pixel_bytes + pixels > self.max_pixel_bytes:
                raise QueueFull(
                    f"queued images hold {self.pixel_bytes} bytes of pixels; {pixels} more "
                    f"exceed max_pixel_bytes={self.max_pixel_bytes}"
                )
            self.pixel_bytes += pixels
            rid = next(self._ids)
            seed = params.seed if params.seed is not None else self.seed * 1_000_003 + rid
            req = Request(rid, prompt, params, int(seed) & 0x7FFFFFFF, images=image_inputs)
            stream = RequestStream(req, self, loop)
            self.streams[rid] = stream
            self._detok[rid] = Detokenizer(self.tokenizer, params.stop)
            self.waiting.append(req)
            self.stats["requests_submitted"] += 1
            self._wake.notify()
        return stream

    @property
    def accepts_images(self) -> bool:
        """Whether `submit` takes ``images=`` (the executor holds a Step3-VL model)."""
        return bool(getattr(self.executor, "accepts_images", False))

    def _expand(self, prompt: list[int], images) -> tuple[list[int], ImageInputs | None]:
        prepare = getattr(self.executor, "prepare_images", None)
        if prepare is None:
            if images:
                raise ValueError(
                    f"images= needs an executor over a Step3-VL model; "
                    f"{type(self.executor).__name__} takes text only"
                )
            return prompt, None
        return prepare(prompt, images)

    def _check_ids(self, prompt) -> list[int]:
        hint = "(one prompt per submit; Engine.generate takes a list of them)"
        return check_prompt(prompt, self.executor.vocab_size, "prompt", hint).tolist()

    def _check_fits(self, prompt: list[int], params: SamplingParams) -> None:
        need = len(prompt) + params.max_tokens
        try:
            self.executor.check_fits(need)
        except ValueError as e:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {need} {e}"
            ) from None

    def cancel(self, request_id: int) -> None:
        """Stops a request at the next step (no-op if it already finished)."""
        with self._lock:
            stream = self.streams.get(request_id)
            if stream is not None:
                stream.request.cancel_requested = True
                self._wake.notify()

    # ------------------------------------------------------------------ one iteration
    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def compile_count(self) -> int:
        """Compilations of the engine's programs (the executor's and the sampler's)."""
        return self.executor.compile_count() + sample_rows._cache_size()

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def step(self) -> bool:
        """One iteration (see the module docstring); False if there was nothing to do."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
        self._encode_images()
        t0 = time.perf_counter()
        prefilled = self._prefill()
        t1 = time.perf_counter()
        decoded = self._decode()
        t2 = time.perf_counter()
        # Wall seconds of the prefill and decode calls, host work and sampling included:
        # decode_seconds / decode_steps is the engine's decode iteration, to set beside the
        # bare fixed-batch step (benchmarks/bench_serving.py).
        self.stats["prefill_seconds"] += (t1 - t0) * prefilled
        self.stats["decode_seconds"] += (t2 - t1) * decoded
        return prefilled or decoded

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancel_requested]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for req in self.slots:
            if req is not None and req.cancel_requested:
                self._finish(req, "cancelled")

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req, slot = self.waiting[0], self.slots.index(None)
            try:
                self.executor.admit(slot, req.budget)
            except PoolExhausted:
                self.stats["admissions_deferred"] += 1
                return  # waits for memory; FIFO order kept
            self.waiting.popleft()
            req.slot, self.slots[slot] = slot, req

    def _encode_images(self) -> None:
        """The vision tower of ONE admitted image request per step, the oldest (outside the
        lock: `submit` and `cancel` stay responsive while it runs). One per step bounds the
        pause the running requests see; the others wait a step to start their prefill."""
        pending = [r for r in self.slots if r is not None and _needs_tower(r)]
        if pending:
            r = min(pending, key=lambda r: r.arrival)
            self.stats["images_encoded"] += len(r.images.pixels.layouts)
            pixels = r.images.pixel_bytes
            self.executor.encode_images(r.images)  # drops the pixels
            with self._lock:
                self.pixel_bytes -= pixels

    def _prefill(self) -> bool:
        ex = self.executor
        rows = [
            r
            for r in self.slots
            if r is not None and r.prefilled < len(r.prompt) and not _needs_tower(r)
        ]
        rows = sorted(rows, key=lambda r: r.arrival)[: ex.prefill_rows]
        if not rows:
            return False
        n, c = ex.prefill_rows, ex.prefill_chunk
        slots, tokens = np.full(n, -1, np.int32), np.zeros((n, c), np.int32)
        starts, last = np.zeros(n, np.int32), np.zeros(n, np.int32)
        features: list[np.ndarray | None] = [None] * n
        for i, r in enumerate(rows):
            chunk = r.prompt[r.prefilled : r.prefilled + c]
            slots[i], starts[i], last[i] = r.slot, r.prefilled, len(chunk) - 1
            tokens[i, : len(chunk)] = chunk
            if r.images is not None:
                features[i] = r.images.chunk(r.prefilled, r.prefilled + len(chunk))
        if any(f is not None for f in features):
            logits = ex.prefill(slots, tokens, starts, last, features=features)
        else:
            logits = ex.prefill(slots, tokens, starts, last)
        for r in rows:
            r.prefilled = min(len(r.prompt), r.prefilled + c)
            if r.prefilled == len(r.prompt):
                r.images = None  # the features are in the cache now
        self.stats["prefill_steps"] += 1
        self.stats["prefill_tokens"] += int(sum(last[: len(rows)] + 1))
        done = [i for i, r in enumerate(rows) if r.prefilled == len(r.prompt)]
        if done:
            sampled = self._sample(logits, [rows[i] if i in done else None for i in range(n)])
            for i in done:
                self._emit(rows[i], int(sampled[i]))
        return True

    def _decode(self) -> bool:
        ex = self.executor
        active = np.array(
            [r is not None and r.prefilled == len(r.prompt) and r.finish_reason is None
             for r in self.slots]
        )  # fmt: skip
        if not active.any():
            return False
        tokens = np.zeros(ex.max_batch, np.int32)
        positions = np.zeros(ex.max_batch, np.int32)
        for i, r in enumerate(self.slots):
            if r is None:
                continue
            positions[i] = len(r.prompt) + len(r.output) - 1 if active[i] else r.prefilled
            tokens[i] = r.output[-1] if active[i] else 0
        logits = ex.decode(tokens, positions, active)
        sampled = self._sample(
            logits, [r if a else None for r, a in zip(self.slots, active, strict=True)]
        )
        self.stats["decode_steps"] += 1
        self.stats["decode_slot_steps"] += int(active.sum())
        for i in np.flatnonzero(active):
            self._emit(self.slots[i], int(sampled[i]))
        return True

    def _sample(self, logits, rows: list[Request | None]) -> np.ndarray:
        n = len(rows)
        temp, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        top_k, seeds, steps = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, r in enumerate(rows):
            if r is not None:
                p = r.params
                temp[i], top_p[i], top_k[i] = p.temperature, p.top_p, p.top_k
                seeds[i], steps[i] = r.seed, len(r.output)
        return np.asarray(jax.device_get(sample_rows(logits, temp, top_k, top_p, seeds, steps)))

    # ------------------------------------------------------------------ output
    def _emit(self, req: Request, token: int) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        p = req.params
        stops = set(p.stop_token_ids)
        if self.eos_id is not None and not p.ignore_eos:
            stops.add(int(self.eos_id))
        if token in stops:
            self._finish(req, "stop")
            return
        req.output.append(token)
        self.stats["tokens_generated"] += 1
        final = len(req.output) >= p.max_tokens
        text, hit = self._detok[req.id].update(req.output, final)
        req.text += text
        if hit:
            self._finish(req, "stop", Delta([token], text))
        elif final:
            self._finish(req, "length", Delta([token], text))
        else:
            self.streams[req.id].push(Delta([token], text))

    def _finish(self, req: Request, reason: str, last: Delta | None = None) -> None:
        req.finish_reason, req.finish_time = reason, time.perf_counter()
        if req.images is not None:  # cancelled before its tower ran: its pixels go
            self.pixel_bytes -= req.images.pixel_bytes
            req.images = None
        if req.slot is not None:
            self.executor.release(req.slot)
            self.slots[req.slot] = None
        delta = last or Delta([], "")
        if reason == "stop" and last is None and self.tokenizer is not None:
            text, _ = self._detok[req.id].update(req.output, True)  # flush held-back text
            req.text += text
            delta.text = text
        delta.finish_reason = reason
        self.stats[f"requests_{reason}"] += 1
        stream = self.streams.pop(req.id)
        self._detok.pop(req.id)
        stream.push(delta)

    # ------------------------------------------------------------------ driving
    def run_until_done(self) -> None:
        """Steps in the calling thread until no request is waiting or running."""
        while self.has_work():
            self.step()

    def generate(
        self, prompts: Sequence[Sequence[int]], params=None, *, images=None
    ) -> list[Request]:
        """Submits every prompt (one `SamplingParams` or one per prompt; ``images``: None or
        one list per prompt, as `submit` takes), runs them to the end in the calling thread,
        returns the finished requests in order."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine itself; the thread is running")
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ilist = [None] * len(prompts) if images is None else list(images)
        for name, given in (("params", plist), ("images", ilist)):
            if len(given) != len(prompts):  # checked before anything is queued
                raise ValueError(f"{name} must give one entry per prompt: {len(given)} for "
                                 f"{len(prompts)} prompts")  # fmt: skip
        streams = []
        try:
            for i, (p, sp, im) in enumerate(zip(prompts, plist, ilist, strict=True)):
                try:
                    streams.append(self.submit(p, sp, images=im))
                except ValueError as e:  # which prompt; a subclass keeps its type and fields
                    if type(e) is not ValueError:
                        e.add_note(f"(prompts[{i}])")
                        raise
                    raise ValueError(f"prompts[{i}]: {e}") from None
        except BaseException:  # none of this call's requests runs
            for stream in streams:
                stream.cancel()
            self._drop_cancelled()
            raise
        self.run_until_done()
        return [s.result() for s in streams]

    def start(self) -> None:
        """Runs the engine in a background daemon thread."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is already running")
        self._thread = threading.Thread(target=self._loop, name="step3-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self.has_work() and not self._stopping:
                        self._wake.wait()
                    if self._stopping and not self.has_work():
                        return
                self.step()
        except BaseException as e:  # surfaced by /health and shutdown()
            self.error = e
            with self._lock:
                for req in [*self.waiting, *(r for r in self.slots if r is not None)]:
                    self.streams[req.id].push(Delta([], "", "cancelled"))
            raise

    def shutdown(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Takes no new requests; finishes (or, with ``cancel``, cancels) the others, then
        stops the thread."""
        with self._lock:
            self._stopping = True
            if cancel:
                for req in [*self.waiting, *(r for r in self.slots if r is not None)]:
                    req.cancel_requested = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def _needs_tower(req: Request) -> bool:
    return req.images is not None and req.images.features is None


__all__ = ["Engine", "EngineStopped", "QueueFull"]
