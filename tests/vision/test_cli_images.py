"""Images on the command line and in chat: ``step3-jax generate/chat --image``, ``/image``,
`chat_generate(images=)`, on a tiny random Step3-VL checkpoint written here."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from step3_jax import cli
from step3_jax.chat import chat_generate, render_chat, stop_ids
from step3_jax.checkpoints import load_hf_vl, load_tokenizer, save_hf_vl
from step3_jax.checkpoints.demo import DEMO_DIR
from step3_jax.config import Step3Config
from step3_jax.policy import KernelPolicy
from step3_jax.vision import generate as vgen
from step3_jax.vision import model as vision_model
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.model import Step3VLModel
from step3_jax.vision.preprocess import SPECIAL_TOKEN_NAMES, ImageSpecialTokens

MARKUP = [n for k, n in SPECIAL_TOKEN_NAMES.items() if k != "image"]  # the demo has <im_patch>


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """The demo tokenizer + the release's image markup tokens, and a tiny random VL model."""
    path = tmp_path_factory.mktemp("tiny_vl")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO_DIR / name, path / name)
    tok = load_tokenizer(path)
    tok.hf.add_special_tokens(MARKUP)
    tok.save(path / "tokenizer.json")
    text = dataclasses.replace(Step3Config.tiny(), vocab_size=tok.vocab_size)
    vis = Step3VisionConfig.tiny(128, image_token_id=tok.hf.token_to_id("<im_patch>"))
    model = Step3VLModel.create(
        text, vis, rngs=nnx.Rngs(3), dtype=jnp.float32, param_dtype=jnp.float32,
        policy=KernelPolicy.reference(),
    )  # fmt: skip
    save_hf_vl(model, path)
    return path


@pytest.fixture(scope="module")
def vl(vl_dir):
    model = load_hf_vl(vl_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    return model, load_tokenizer(vl_dir)


def _png(path, w=60, h=40, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_generate_with_image(capsys, tmp_path, vl_dir):
    img = _png(tmp_path / "a.png")
    argv = ["generate", "--checkpoint", str(vl_dir), "--image", img, "--prompt", "Look:"]
    assert cli.main([*argv, "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert ">>> Look:" in out and _last_json(out)["batch"] == 1


def test_generate_image_marker_count_must_match(capsys, tmp_path, vl_dir):
    img = _png(tmp_path / "a.png")
    argv = ["generate", "--checkpoint", str(vl_dir), "--image", img, "--image", img]
    assert cli.main([*argv, "--prompt", "one <im_patch> only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 <im_patch> marker(s) but 2 --image" in err


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: str(p / "missing.png"), "does not exist"),
        (lambda p: (p / "bad.png").write_bytes(b"not a png") and str(p / "bad.png"), "cannot read"),
    ],
)
def test_unreadable_image_is_one_line_exit_2(capsys, tmp_path, vl_dir, make, fragment):
    path = make(tmp_path)
    assert cli.main(["generate", "--checkpoint", str(vl_dir), "--image", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--image {path}" in err and fragment in err


def test_image_with_text_only_checkpoint_is_exit_2(capsys, tmp_path):
    img = _png(tmp_path / "a.png")
    assert cli.main(["generate", "--image", img]) == 2  # the demo model
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the demo model is text-only" in err
    assert cli.main(["chat", "--checkpoint", str(DEMO_DIR), "--image", img]) == 2
    assert "no vision_config" in capsys.readouterr().err


def test_vl_checkpoint_without_image_tokens_is_exit_2(capsys, tmp_path, vl_dir):
    img = _png(tmp_path / "a.png")
    argv = ["generate", "--checkpoint", str(vl_dir), "--image", img]
    assert cli.main([*argv, "--tokenizer", str(DEMO_DIR / "tokenizer.json")]) == 2
    assert "lacks the image tokens ['<im_start>'" in capsys.readouterr().err


def test_chat_generate_with_image_equals_vision_generate(vl):
    model, tok = vl
    img = np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)  # 2 crops
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    res = chat_generate(model, tok, messages, images=[img], max_new_tokens=12, temperature=0)
    ids = tok.encode(render_chat(tok, messages))
    special = ImageSpecialTokens.from_tokenizer(tok)
    want = vgen.generate(
        model, [ids], 12, images=[[img]], special=special, stop_tokens=stop_ids(tok)
    )
    assert res.token_ids == want.tokens[0] and len(res.token_ids) > 4  # > first chunk
    assert res.prompt_tokens == len(ids) - 1 + 2 * 83 + 171  # 2 crops in one row + view
    # one bare image is wrapped (as preprocess_images does), not iterated per row
    bare = chat_generate(model, tok, messages, images=img, max_new_tokens=12, temperature=0)
    assert bare.token_ids == res.token_ids


def test_chat_generate_runs_the_tower_once(vl, monkeypatch):
    model, tok = vl
    calls = []
    orig = vision_model._embed_images  # every tower call goes through it
    monkeypatch.setattr(
        vision_model, "_embed_images", lambda f, px: calls.append(px.shape) or orig(f, px)
    )
    messages = [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "x"}]}]
    img = np.full((30, 40, 3), 7, np.uint8) + np.arange(40, dtype=np.uint8)[None, :, None]
    chat_generate(model, tok, messages, images=[img], max_new_tokens=9, temperature=0, chunk=2)
    assert calls == [(1, 3, 728, 728)]  # one view, once, for 9 tokens in 5 chunks


def test_chat_generate_image_errors(vl):
    model, tok = vl
    img = np.zeros((8, 8, 3), np.uint8) + 3
    with pytest.raises(ValueError, match="1 image placeholder token.*0 image"):
        chat_generate(model, tok, [{"role": "user", "content": [{"type": "image"}]}])
    for images in ([img], img, "a.png"):  # a bare array or path too
        with pytest.raises(ValueError, match="this model is text-only"):
            chat_generate(model.text, tok, [{"role": "user", "content": "hi"}], images=images)


def test_chat_repl_image_command(vl_dir, tmp_path):
    img = _png(tmp_path / "a.png", seed=2)
    stdin = io.StringIO(f"/image {tmp_path / 'nope.png'}\n/image {img}\nWhat is it?\nmore\n")
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(
        ["chat", "--checkpoint", str(vl_dir), "--max-new-tokens", "2", "--no-compile-cache"]
    )
    assert cli.cmd_chat(args, stdin, out, err) == 0
    log = err.getvalue()
    assert "[error: /image" in log and "does not exist" in log and "attached" in log
    assert out.getvalue().count("assistant> ") == 2
