"""`step3-jax serve` through the official `openai` client: a uvicorn server on 127.0.0.1 in this
process, the shipped demo model, greedy requests checked token for token against `generate`
decoding the prompt alone. The last test shuts the server down with a request in flight."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from step3_jax.checkpoints import load_demo  # noqa: E402
from step3_jax.decode import generate  # noqa: E402
from step3_jax.engine import Engine, ModelExecutor, SamplingParams  # noqa: E402
from step3_jax.server.app import create_app  # noqa: E402
from step3_jax.server.metrics import compile_count  # noqa: E402

PROMPTS = [
    "It is a truth universally acknowledged, that",
    '"My dear Emma," said Mr. Knightley,',
    "The next morning",
    "She was",
    "Mr. Darcy, with a look of",
    "I cannot",
]


class Served:
    def __init__(self, model, tok):
        ex = ModelExecutor(model, max_batch=4, max_len=256, page_size=16, prefill_chunk=16)
        self.engine = Engine(ex, tok, eos_id=tok.eos_id, max_queue=64)
        self.engine.generate([[1] * 20], SamplingParams(max_tokens=2))  # warm-up (compiles)
        app = create_app(self.engine, tok, model_name="demo", shutdown_timeout=20)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        self.compiles = compile_count(), self.engine.compile_count()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def served(demo):
    s = Served(*demo)
    yield s
    s.stop()


def alone(demo, prompt: str, n: int) -> str:
    model, tok = demo
    out = generate(model, [tok.encode(prompt)], n, stop_tokens=[tok.eos_id]).tokens[0]
    return tok.decode(out)


def test_models_health_metrics(served):
    assert [m.id for m in served.client.models.list().data] == ["demo"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    text = httpx.get(served.url + "/metrics").text
    assert "step3_xla_compilations" in text and "step3_kv_pages_free" in text


def test_completion_and_stream_equal_alone(served, demo):
    c = served.client
    r = c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == alone(demo, PROMPTS[0], 12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    chunks = list(
        c.completions.create(
            model="demo", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == alone(demo, PROMPTS[1], 10)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_and_chat_stream(served):
    c = served.client
    msgs = [{"role": "user", "content": "Tell me about Emma."}]
    r = c.chat.completions.create(model="demo", messages=msgs, max_tokens=8, temperature=0)
    full = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 8
    parts = c.chat.completions.create(
        model="demo", messages=msgs, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(parts)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_requests_equal_alone(served, demo):
    """6 streaming + 6 plain requests at once through 4 slots: each equals its solo decode."""

    def run(i):
        p, n = PROMPTS[i % len(PROMPTS)], 6 + i
        kw = dict(model="demo", prompt=p, max_tokens=n, temperature=0)
        if i % 2:
            return (
                "".join(
                    ch.choices[0].text for ch in served.client.completions.create(**kw, stream=True)
                ),
                p,
                n,
            )
        return served.client.completions.create(**kw).choices[0].text, p, n

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, range(12)))
    for text, p, n in results:
        assert text == alone(demo, p, n)


def test_cancel_mid_stream(served):
    before = served.engine.stats["requests_cancelled"]
    stream = served.client.completions.create(
        model="demo", prompt=PROMPTS[2], max_tokens=200, temperature=0.8, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 10
    while served.engine.stats["requests_cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.stats["requests_cancelled"] == before + 1
    while served.engine.num_running and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.num_running == 0
    ex = served.engine.executor
    assert ex.allocator.num_free == ex.allocator.capacity  # its pages came back
    # A non-streaming client that gives up is noticed too (its request is cancelled).
    body = {"prompt": PROMPTS[2], "max_tokens": 200, "ignore_eos": True, "temperature": 0.8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json=body, timeout=0.3)
    while served.engine.stats["requests_cancelled"] == before + 1 and time.time() < deadline + 10:
        time.sleep(0.05)
    assert served.engine.stats["requests_cancelled"] == before + 2


def test_malformed_requests(served):
    c, url = served.client, served.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    bad = [
        (dict(prompt="x", temperature=-1), "temperature"),
        (dict(prompt="x", n=2), "n"),
        (dict(prompt="x", max_tokens=0), "max_tokens"),
        (dict(prompt="x", echo=True), "echo"),
        (dict(prompt="x " * 300, max_tokens=10), "exceeds the engine's max_len=256"),
        (dict(prompt=[5000], max_tokens=10), "token ids must lie in"),
        (dict(prompt=""), "prompt: Value error, prompt is empty"),
        (dict(prompt=[]), "prompt is empty"),
    ]
    extra = [  # outside the openai client's own arguments; one killed the engine thread once
        (dict(top_k=2**40), "top_k must be an integer >= 0"),
        (dict(stop_token_ids=[10**6]), r"stop_token_ids must be integer ids in \[0, vocab_size"),
    ]
    for kw, needle in bad:
        with pytest.raises(openai.BadRequestError, match=needle):
            c.completions.create(model="demo", **{"max_tokens": 4, **kw})
    for kw, needle in extra:
        with pytest.raises(openai.BadRequestError, match=needle) as err:
            c.completions.create(model="demo", prompt="x", max_tokens=4, extra_body=kw)
        assert err.value.body["param"] == next(iter(kw))  # the field, not "prompt"
    assert served.engine.error is None
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="demo", messages=[], max_tokens=2)


def test_queue_full_is_429(demo):
    model, tok = demo
    ex = ModelExecutor(model, max_batch=1, max_len=64, page_size=16, prefill_chunk=16)
    app = create_app(Engine(ex, tok, max_queue=0), tok, model_name="demo")
    r = TestClient(app).post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_no_compilation_while_serving(served):
    """The engine's programs (decode, prefill, sampler) compiled once, at warm-up; the
    process-wide count moved only for the `generate` oracle's own programs."""
    assert served.engine.compile_count() == served.compiles[1]
    assert compile_count() >= served.compiles[0]


def test_graceful_shutdown_finishes_in_flight(served, demo):
    """Must stay last: shutting down lets the open stream run to its end."""
    stream = served.client.completions.create(
        model="demo", prompt=PROMPTS[3], max_tokens=40, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = next(iter(stream))
    stopper = threading.Thread(target=served.stop)
    stopper.start()
    rest = list(stream)
    stopper.join(30)
    assert not served.thread.is_alive()
    assert rest[-1].choices[0].finish_reason == "length"
    model, tok = demo
    want = generate(model, [tok.encode(PROMPTS[3])], 40).tokens[0]
    assert first.choices[0].text + "".join(ch.choices[0].text for ch in rest) == tok.decode(want)
    assert served.engine.num_running == 0
