"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent
events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text format).

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON,
bad parameters, bad images and prompts that do not fit, 404 for an unknown model, 413 for a
body or an image over its byte limit, 429 when the engine's queue is full, 503 while shutting
down or after an engine failure.

Chat messages may carry images (a Step3-VL engine: `Engine.accepts_images`) as ``image_url``
content parts with ``data:`` URLs only (`step3_jax.server.images`: remote URLs are refused,
never fetched). Decoding and preprocessing run in a worker thread, off the event loop; the
vision tower runs in the engine when the request is admitted. A client that disconnects
(mid-stream or while waiting) cancels its request, freeing its slot and KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from step3_jax.engine import Engine, EngineStopped, QueueFull
from step3_jax.sampling import check_token_ids, check_top_k
from step3_jax.server.chat_format import format_chat
from step3_jax.server.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGES,
    ImageInputError,
    load_request_images,
)
from step3_jax.server.metrics import ServerMetrics
from step3_jax.server.protocol import ChatCompletionRequest, CompletionRequest


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error_response(status, message, type_, param=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    if errs[0].get("type") == "json_invalid":
        return f"the request body is not valid JSON: {errs[0].get('msg')}", None
    # A union (content: str | list of parts) reports one error per member: the deepest one
    # names the real problem (e.g. a bad part inside the list, not "should be a string").
    e = max(errs, key=lambda err: len(err.get("loc", ())))
    param = _param_name([x for x in e.get("loc", ()) if x != "body"]) or None
    return f"{param or 'body'}: {e.get('msg')}", param


def _param_name(loc: list) -> str:
    """``messages[0].content[1].image_url.url`` from pydantic's location, without the
    union-member labels (``list[tagged-union[...]]``) and discriminator tags it inserts."""
    out, skip_tag = "", False
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item:  # a union member's label
            skip_tag = "tagged-union" in item
        elif skip_tag and out.endswith("]"):  # the tag right after the list index
            skip_tag = False
        else:
            out += f".{item}" if out else item
    return out


class BodyLimit:
    """ASGI middleware: a POST body over ``limit`` bytes gets 413 before the app parses it
    (by its Content-Length, or by counting a chunked body while buffering it)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send, int(length))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: let the app see it
                return await self.app(scope, _replay([msg], receive), send)
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(scope, receive, send, size)
            if not msg.get("more_body"):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _reject(self, scope, receive, send, size: int):
        message = f"the request body is {size}+ bytes, more than the limit of {self.limit}"
        await _error_response(413, message, "invalid_request_error")(scope, receive, send)


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


def create_app(
    engine: Engine,
    tokenizer,
    *,
    model_name: str = "step3-jax",
    default_max_tokens: int = 16,
    shutdown_timeout: float = 30.0,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_body_bytes: int | None = None,
) -> FastAPI:
    """The app; its lifespan starts the engine thread and, at shutdown, lets running requests
    finish for ``shutdown_timeout`` seconds, then cancels the rest.

    Images per chat request: at most ``max_images``, each at most ``max_image_bytes`` decoded
    bytes. ``max_body_bytes`` (default: room for ``max_images`` such images in base64 plus
    1 MiB of text) bounds any request body."""
    metrics = ServerMetrics(engine)
    if max_body_bytes is None:
        max_body_bytes = max_images * (4 * (max_image_bytes // 3 + 1) + 4) + (1 << 20)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, cancel=False, timeout=shutdown_timeout)
        await asyncio.to_thread(engine.shutdown, cancel=True, timeout=shutdown_timeout)

    app = FastAPI(title="step3-jax", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.type, exc.param)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server has {model_name!r}",
                           "invalid_request_error", "model")  # fmt: skip

    @contextlib.contextmanager
    def engine_errors(param: str):
        if engine.error is not None:
            raise ApiError(503, f"the engine failed: {engine.error!r}", "server_error")
        try:
            yield
        except ImageInputError as e:
            raise ApiError(e.status, str(e), "invalid_request_error", e.param) from None
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", "rate_limit_error") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), "server_error") from None
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", param) from None

    def sampling_params(body):
        """The request's `SamplingParams`; a 400 naming the field for values the protocol's
        ranges cannot know (top_k and stop ids within the vocabulary, a stop id < 0)."""

        def checked(param, check, *args):
            try:
                return check(*args)
            except ValueError as e:
                raise ApiError(400, str(e), "invalid_request_error", param) from None

        params = checked(None, body.sampling_params, default_max_tokens)
        vocab = engine.executor.vocab_size
        checked("top_k", check_top_k, params.top_k, vocab)
        checked("stop_token_ids", check_token_ids, params.stop_token_ids, "stop_token_ids", vocab)
        return params

    def submit(ids, params):
        with engine_errors("prompt"):
            return engine.submit(ids, params, loop=asyncio.get_running_loop())

    async def submit_with_images(ids, params, urls: list[tuple[str, str]]):
        """Decodes the request's images and submits it, in a worker thread (Pillow decoding
        and preprocessing would stall every stream if run on the event loop)."""
        if not engine.accepts_images:
            raise ApiError(400, "this model is text-only: image_url content parts need a "
                           "Step3-VL checkpoint", "invalid_request_error", urls[0][1])  # fmt: skip
        loop = asyncio.get_running_loop()

        def work():
            images = load_request_images(urls, max_images=max_images, max_bytes=max_image_bytes)
            return engine.submit(ids, params, images=images, loop=loop)

        with engine_errors("messages"):
            return await asyncio.to_thread(work)

    def encode(prompt) -> list[int]:
        return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        stream = submit(encode(body.prompt), sampling_params(body))
        return await _respond(request, body, stream, "text_completion", metrics, model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.template_content()} for m in body.messages]
        try:
            prompt = format_chat(messages, tokenizer)
        except ValueError as e:  # bad messages, or a template that refuses them
            raise ApiError(400, str(e), "invalid_request_error", "messages") from None
        params = sampling_params(body)
        params = dataclasses.replace(
            params,
            stop=(*params.stop, *prompt.stop),
            stop_token_ids=(*params.stop_token_ids, *prompt.stop_token_ids),
        )
        urls = body.image_urls()
        if urls:
            stream = await submit_with_images(prompt.token_ids, params, urls)
        else:
            stream = submit(prompt.token_ids, params)
        return await _respond(request, body, stream, "chat.completion", metrics, model_name)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "step3-jax"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, 503)
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _usage(req) -> dict:
    n_prompt, n_out = len(req.prompt), len(req.output)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _stream_choice(kind: str, text: str, finish: str | None, first: bool) -> dict:
    if kind == "text_completion":
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    delta = {"role": "assistant"} if first else {}
    if text:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def _respond(request: Request, body, stream, kind: str, metrics, model: str):
    rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    created, endpoint = int(time.time()), kind
    if body.stream:
        chunk_kind = kind if kind == "text_completion" else "chat.completion.chunk"

        def event(choices, usage=None) -> str:
            obj = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                   "choices": choices}  # fmt: skip
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        async def sse():
            first = True
            try:
                async for delta in stream:
                    if delta.text or delta.finish_reason or first:
                        yield event([_stream_choice(kind, delta.text, delta.finish_reason, first)])
                        first = False
                if body.include_usage:
                    yield event([], _usage(stream.request))
                yield "data: [DONE]\n\n"
            finally:
                if stream.request.finish_reason is None:  # client went away mid-stream
                    stream.cancel()
                metrics.observe(endpoint, stream.request)

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def collect():
        async for _ in stream:
            pass

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(disconnected())
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not done.done():  # the client left: free the slot
        stream.cancel()
        await done
    req = stream.request
    metrics.observe(endpoint, req)
    if kind == "text_completion":
        choice = {
            "index": 0,
            "text": req.text,
            "logprobs": None,
            "finish_reason": req.finish_reason,
        }
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": req.text},
                  "logprobs": None, "finish_reason": req.finish_reason}  # fmt: skip
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
            "usage": _usage(req)}  # fmt: skip


__all__ = ["create_app"]
