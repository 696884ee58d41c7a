"""Images through ``/v1/chat/completions`` with the official `openai` client: a uvicorn server on
127.0.0.1 in this process over a tiny random float32 Step3-VL model and the demo tokenizer with
the release's image tokens. A base64 PNG made with Pillow in a chat message gives, streamed or
not, exactly the text `step3_jax.vision.generate` decodes for the same prompt and image; every
malformed image gets its 4xx JSON error naming the field; remote URLs are never fetched."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image
from vision_fixtures import random_vl_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from step3_jax import cli  # noqa: E402
from step3_jax.checkpoints import load_tokenizer, save_hf_vl  # noqa: E402
from step3_jax.checkpoints.demo import DEMO_DIR  # noqa: E402
from step3_jax.config import Step3Config  # noqa: E402
from step3_jax.engine import Engine, ModelExecutor, SamplingParams  # noqa: E402
from step3_jax.server import main as server_main  # noqa: E402
from step3_jax.server.app import create_app  # noqa: E402
from step3_jax.server.chat_format import format_chat  # noqa: E402
from step3_jax.vision import generate as vgen  # noqa: E402
from step3_jax.vision.config import Step3VisionConfig  # noqa: E402
from step3_jax.vision.preprocess import SPECIAL_TOKEN_NAMES, ImageSpecialTokens  # noqa: E402

MAX_IMAGES, MAX_IMAGE_BYTES = 2, 40_000
URL = "messages[0].content[1].image_url.url"


def png(w=60, h=40, seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


def message(*urls, text="What is in the picture?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """The demo tokenizer (its chat template writes <im_patch> per image part) + the image
    markup tokens, and a tiny random VL model of its vocabulary."""
    path = tmp_path_factory.mktemp("vl_tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO_DIR / name, path / name)
    tok = load_tokenizer(path)
    tok.hf.add_special_tokens([n for k, n in SPECIAL_TOKEN_NAMES.items() if k != "image"])
    tok.save(path / "tokenizer.json")
    tok = load_tokenizer(path)
    special = ImageSpecialTokens.from_tokenizer(tok)
    text_cfg = dataclasses.replace(
        Step3Config.tiny(), vocab_size=tok.vocab_size, num_layers=2, moe_layer_ids=(1,)
    )
    vis = Step3VisionConfig.tiny(text_cfg.hidden_size, image_token_id=special.image)
    model = random_vl_model(text_cfg, vis, text_seed=4, vision_seed=5)
    save_hf_vl(model, path)  # a checkpoint folder for `step3-jax serve --checkpoint`
    return model, tok, special, path


@pytest.fixture(scope="module")
def served(vl):
    model, tok, special, _ = vl
    ex = ModelExecutor(
        model, max_batch=2, max_len=448, page_size=16, prefill_chunk=64, image_tokens=special
    )
    engine = Engine(ex, tok, eos_id=tok.eos_id)
    img = np.asarray(Image.open(io.BytesIO(png(seed=9))))
    engine.generate([[special.image]], SamplingParams(max_tokens=2), images=[[img]])  # warm
    app = create_app(
        engine, tok, model_name="vl", max_images=MAX_IMAGES, max_image_bytes=MAX_IMAGE_BYTES
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield engine, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    server.should_exit = True
    thread.join(30)


def test_image_chat_equals_vision_generate_streamed_or_not(served, vl):
    model, tok, special, _ = vl
    engine, _, client = served
    raw = png(seed=1)
    msgs = message(data_url(raw))
    r = client.chat.completions.create(model="vl", messages=msgs, max_tokens=8, temperature=0)
    # The same prompt and image decoded alone by `generate(images=)`.
    prompt = format_chat([{"role": "user", "content": [{"type": "text", "text": msgs[0][
        "content"][0]["text"]}, {"type": "image_url"}]}], tok)  # fmt: skip
    img = np.asarray(Image.open(io.BytesIO(raw)))
    want = vgen.generate(
        model, [prompt.token_ids], 8, images=[[img]], special=special,
        stop_tokens=prompt.stop_token_ids,
    ).tokens[0]  # fmt: skip
    assert len(want) == 8 and r.choices[0].message.content == tok.decode(want)
    assert r.usage.prompt_tokens == len(prompt.token_ids) - 1 + 171  # the image's layout
    chunks = list(
        client.chat.completions.create(
            model="vl", messages=msgs, max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tok.decode(want)
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert engine.stats["images_encoded"] >= 3  # warm-up + 2 requests


def test_concurrent_image_and_text_chats_equal_alone(served):
    """Two image chats and a text chat at once through 2 slots: each reply equals the same
    request sent alone; nothing compiles (the warm-up compiled the 728 px tower)."""
    engine, _, client = served
    requests = [
        message(data_url(png(seed=2))),
        [{"role": "user", "content": "Hello there, who are you?"}],
        message(data_url(png(50, 50, seed=3)), text="And this one?"),
    ]

    def ask(msgs):
        r = client.chat.completions.create(model="vl", messages=msgs, max_tokens=6, temperature=0)
        return r.choices[0].message.content

    solo = [ask(m) for m in requests]
    programs = engine.compile_count()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, requests))
    assert together == solo and engine.compile_count() == programs


def _post(url, body=None, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kw)


@pytest.mark.parametrize(
    "url, status, param, needle",
    [
        ("https://example.com/cat.png", 400, URL, "remote image URLs are not fetched"),
        ("http://169.254.169.254/latest", 400, URL, "send a data: URL"),
        ("file:///etc/passwd", 400, URL, "must be a data: URL"),
        ("data:image/png;base64,!!notbase64!!", 400, URL, "invalid base64"),
        ("data:image/png," + "x" * 10, 400, URL, "must be base64-encoded"),
        (data_url(b"hello, not an image"), 400, URL, "does not hold a PNG, JPEG or WebP"),
        (data_url(png(), "image/gif"), 400, URL, "unsupported image media type 'image/gif'"),
        (data_url(png(mode="I;16")), 400, URL, "image mode 'I;16' is not supported"),
        (data_url(png()[:200]), 400, URL, "cannot decode image"),  # truncated
        (data_url(png(150, 150)), 413, URL, "more than the limit of 40000"),
    ],
)
def test_malformed_images_are_4xx(served, url, status, param, needle):
    engine, base, _ = served
    r = _post(base, {"messages": message(url), "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param and needle in err["message"]
    assert engine.error is None and httpx.get(base + "/health").json()["status"] == "ok"


def test_request_level_limits(served):
    engine, base, client = served
    ok = data_url(png())
    r = _post(base, {"messages": message(ok, ok, ok), "max_tokens": 2})
    assert r.status_code == 400 and "3 images in one request; at most 2" in r.text
    big = {"messages": [{"role": "user", "content": "x" * 2_000_000}]}
    r = _post(base, big)
    assert r.status_code == 413 and "more than the limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while buffered
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 50_000
        yield b'"}]}'

    r = httpx.post(base + "/v1/chat/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and "more than the limit" in r.json()["error"]["message"]
    r = _post(base, {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages[0].content[0]"
    assert "'input_audio' found using 'type' does not match" in err["message"]
    r = _post(base, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url"
    with pytest.raises(openai.BadRequestError, match=r"1 image\(s\) were given"):
        client.chat.completions.create(  # two markers: one image part + one typed <im_patch>
            model="vl", messages=message(ok, text="<im_patch> and"), max_tokens=2
        )
    assert engine.num_waiting == 0


def test_text_only_model_refuses_images(vl):
    model, tok, _, _ = vl
    engine = Engine(ModelExecutor(model.text, max_batch=1, max_len=64), tok)
    client = TestClient(create_app(engine, tok, model_name="t"))  # no lifespan: never runs
    r = client.post("/v1/chat/completions", json={"messages": message(data_url(png()))})
    err = r.json()["error"]
    assert r.status_code == 400 and "this model is text-only" in err["message"]
    assert err["param"] == URL


def test_serve_cli_loads_a_vl_checkpoint(vl, monkeypatch):
    """``step3-jax serve --checkpoint DIR`` of a Step3-VL checkpoint builds an engine that takes
    images; the demo model's takes text only (uvicorn replaced: nothing is served)."""
    built = []

    def fake_serve(args, load_model):
        built.append(server_main.build_engine(args, load_model)[0])
        return 0

    monkeypatch.setattr(server_main, "serve", fake_serve)
    argv = ["serve", "--no-warmup", "--max-len", "400", "--max-batch", "2"]
    assert cli.main([*argv, "--checkpoint", str(vl[3])]) == 0
    assert cli.main(argv) == 0  # the demo model
    assert [e.accepts_images for e in built] == [True, False]
    assert built[0].executor.image_tokens == vl[2]
