"""Images through the serving engine (`Engine.submit(images=)` over a `ModelExecutor` holding a
tiny random float32 `Step3VLModel`): every image request's greedy output equals
`step3_jax.vision.generate.generate` decoding it alone, whatever it shares the batch with
(text requests, other image requests, chunked prefill that cuts through image placeholders);
the vision tower runs once per view at admission; no compilation once warm."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image
from vision_fixtures import random_vl_model

from step3_jax.config import Step3Config
from step3_jax.decode import generate as text_generate
from step3_jax.engine import Engine, ModelExecutor, QueueFull, SamplingParams
from step3_jax.engine.images import ImageInputs, pack_chunk_features
from step3_jax.vision import generate as vgen
from step3_jax.vision import model as vision_model
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.preprocess import ImageSpecialTokens

# Two layers (dense, then MoE with its shared expert): the tiny structure at half the compile
# time, which dominates these tests on CPU.
TEXT = dataclasses.replace(Step3Config.tiny(), num_layers=2, moe_layer_ids=(1,))
VIS = Step3VisionConfig.tiny(text_hidden_size=TEXT.hidden_size, image_token_id=7)
SPECIAL = ImageSpecialTokens(
    image=7, im_start=1, im_end=2, patch_start=3, patch_end=4, patch_newline=5
)
# One view: 171 prompt tokens per image; 300 x 500 px: 2 crops in a row + the view = 337.
SMALL, WIDE = (60, 40), (500, 300)

_COMPILES = [0]


def _on_event(event: str, *args, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


@pytest.fixture(scope="module")
def model():
    return random_vl_model(TEXT, VIS, text_seed=1, vision_seed=2)


def make_engine(model, **kw):
    ex = ModelExecutor(
        model, max_batch=3, max_len=560, page_size=16, prefill_chunk=64, prefill_rows=2,
        image_tokens=SPECIAL, **kw,
    )  # fmt: skip
    return Engine(ex)


def image(size, seed):
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def text_prompt(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(8, TEXT.vocab_size, n)]


def alone(model, prompt, images, n, cache_len=512):
    """The request decoded by itself with `vision.generate` (text: `step3_jax.generate`); one
    cache length, so every reference shares one compiled decode loop."""
    if not images:
        return text_generate(model.text, [prompt], n, max_cache_len=cache_len).tokens[0]
    return vgen.generate(
        model, [prompt], n, images=[images], special=SPECIAL, max_cache_len=cache_len
    ).tokens[0]


def run(eng, requests):
    """``requests``: (prompt, images, max_tokens) triples, through ``eng`` together."""
    return eng.generate(
        [p for p, _, _ in requests],
        [SamplingParams(max_tokens=n) for _, _, n in requests],
        images=[im for _, im, _ in requests],
    )


def test_image_and_text_in_one_batch_equal_alone(model):
    """An image request (its 171 placeholders cut by 64-token prefill chunks) and a text
    request share the slots and 2-row prefill calls: each equals its solo decode."""
    eng = make_engine(model)
    wave = [([9, 7, 10, 11], [image(SMALL, 0)], 6), (text_prompt(11, 1), [], 5)]
    out = run(eng, wave)
    assert len(out[0].prompt) == 3 + 171 and eng.stats["images_encoded"] == 1
    for req, (p, im, n) in zip(out, wave, strict=True):
        assert req.finish_reason == "length" and req.output == alone(model, p, im, n)
        assert req.images is None  # features dropped once in the cache


def test_no_recompiles_as_image_and_text_requests_come_and_go(model):
    """Once warm, a wave of other image counts, image sizes and text lengths compiles nothing;
    the VL executor has the text executor's two step programs plus the tower's."""
    eng = make_engine(model)
    ex = eng.executor
    before = ex.compile_count()
    run(eng, [([9, 7, 10], [image(SMALL, 3)], 3), (text_prompt(9, 2), [], 3)])
    # the decode step (the text model's), ONE prefill for text and image chunks alike, the
    # tower at 728 px (none new if an earlier test compiled them)
    assert ex._forward._cache_size() == 1 and ex._prefill_embeds._cache_size() == 1
    assert ex.compile_count() <= before + 3
    compiles = _COMPILES[0]
    wave = [
        ([21, 7, 7, 22], [image(SMALL, 7), image((50, 50), 8)], 3),
        (text_prompt(70, 5), [], 6),
        ([7, 20], [image(SMALL, 6)], 5),
        (text_prompt(3, 6), [], 2),
    ]
    out = run(eng, wave)
    assert _COMPILES[0] == compiles, "an image or text request recompiled the engine"
    assert [len(r.output) for r in out] == [3, 6, 5, 2]
    assert ex.allocator.num_free == ex.allocator.capacity


@pytest.mark.slow
def test_crops_and_several_images_equal_alone(model):
    """Two image requests (one with crops and two images) and two text requests share 3 slots;
    chunks hold the end of one image's placeholders and the start of the next; each equals
    its solo decode."""
    eng = make_engine(model)
    wave1 = [
        ([9, 7, 10, 11], [image(SMALL, 0)], 6),
        (text_prompt(11, 1), [], 5),
        ([12, 7, 13, 7, 14], [image(WIDE, 2), image(SMALL, 3)], 7),
        (text_prompt(70, 4), [], 4),
    ]
    out = run(eng, wave1)
    assert len(out[2].prompt) == 3 + 337 + 171 and eng.stats["images_encoded"] == 3
    for req, (p, im, n) in zip(out, wave1, strict=True):
        assert req.output == alone(model, p, im, n, cache_len=1024)


def test_tower_runs_once_per_view_at_admission(model, monkeypatch):
    """Preprocessing at submit, the tower at admission: one request's views per step (the
    oldest first), each view once, whatever the number of prefill chunks and decode steps.
    The vision module is flattened once per request, not once per tower call."""
    calls, flattens = [], []
    orig = vision_model._embed_images  # every tower call goes through it
    monkeypatch.setattr(
        vision_model, "_embed_images", lambda f, px: calls.append(px.shape) or orig(f, px)
    )
    orig_flatten = vision_model.flatten_tower
    monkeypatch.setattr(
        vision_model, "flatten_tower", lambda v: flattens.append(1) or orig_flatten(v)
    )
    eng = make_engine(model)
    wide = eng.submit([7, 9], SamplingParams(max_tokens=6), images=[image(WIDE, 10)])
    small = eng.submit([9, 7], SamplingParams(max_tokens=4), images=[image(SMALL, 11)])
    assert calls == []  # preprocessing only at submit
    view, crop = (1, 3, 728, 728), (1, 3, 504, 504)
    eng.step()  # admits both; the older one's tower, then its first prefill chunk
    assert calls == [view, crop, crop]
    assert len(flattens) == 1  # three tower calls, one flatten of the module
    assert (wide.request.prefilled, small.request.prefilled) == (64, 0)
    eng.step()
    assert calls == [view, crop, crop, view] and small.request.prefilled == 64
    eng.run_until_done()
    assert len(calls) == 4 and eng.stats["images_encoded"] == 2
    assert len(wide.result().output) == 6 and len(small.result().output) == 4


def test_image_errors(model):
    eng = make_engine(model)
    with pytest.raises(ValueError, match=r"1 image placeholder token\(s\) \(id 7\) but 2 image"):
        eng.submit([7, 9], images=[image(SMALL, 0), image(SMALL, 1)])
    with pytest.raises(ValueError, match=r"2 image placeholder token\(s\) \(id 7\) but 0 image"):
        eng.submit([7, 9, 7])  # a VL model refuses placeholders without images
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read image <bytes>"):
        eng.submit([7, 9], images=[b"not an image"])
    with pytest.raises(ValueError, match="image mode 'I;16' is not supported"):
        eng.submit([7, 9], images=[Image.fromarray(np.full((9, 9), 300, np.uint16))])
    with pytest.raises(ValueError, match=r"prompt \(344 tokens\) \+ max_tokens \(300\)"):
        eng.submit([7, 9, 9, 9, 9, 9, 9, 9], SamplingParams(max_tokens=300),
                   images=[image(WIDE, 0)])  # fmt: skip
    text = Engine(ModelExecutor(model.text, max_batch=2, max_len=64))
    assert not text.accepts_images and eng.accepts_images
    with pytest.raises(ValueError, match="images= needs a Step3-VL model .* text-only"):
        text.submit([7, 9], images=[image(SMALL, 0)])
    with pytest.raises(ValueError, match="a Step3VLModel needs image_tokens="):
        ModelExecutor(model, max_batch=1, max_len=64)
    with pytest.raises(ValueError, match="image_tokens= needs a Step3VLModel"):
        ModelExecutor(model.text, max_batch=1, max_len=64, image_tokens=SPECIAL)
    assert eng.num_waiting == 0  # nothing refused was queued


def test_one_image_alone_is_a_list_of_one(model):
    """A path or an array where a list of images goes: a path's characters were taken for
    images ("image file / does not exist"), an array failed on its truth value."""
    eng = make_engine(model)
    img = image(SMALL, 3)
    listed = eng.submit([7, 9], SamplingParams(max_tokens=2), images=[img]).request.prompt
    assert eng.submit([7, 9], SamplingParams(max_tokens=2), images=img).request.prompt == listed
    with pytest.raises(TypeError, match="images must be a list of images .* got int"):
        eng.submit([7, 9], images=3)
    text = Engine(ModelExecutor(model.text, max_batch=2, max_len=64))
    with pytest.raises(ValueError, match="images= needs a Step3-VL model"):
        text.submit([7, 9], images=np.zeros((30, 40, 3), np.uint8))


def test_queued_pixels_are_bounded(model):
    """Preprocessed pixels live from submit to the tower: their total is capped (429-style
    `QueueFull`), a request over the cap alone is refused, and the bytes come back when the
    tower runs or the request is cancelled."""
    view = 3 * 728 * 728 * 4  # float32 global view
    ex = ModelExecutor(model, max_batch=1, max_len=560, page_size=16, prefill_chunk=64,
                       image_tokens=SPECIAL)  # fmt: skip
    eng = Engine(ex, max_pixel_bytes=view + view // 2)
    with pytest.raises(ValueError, match=r"preprocess to 12\d+ bytes .* max_pixel_bytes=9"):
        eng.submit([7], images=[image(WIDE, 0)])  # a view and two crops
    first = eng.submit([7], SamplingParams(max_tokens=2), images=[image(SMALL, 0)])
    assert eng.pixel_bytes == view
    with pytest.raises(QueueFull, match="queued images hold 6359808 bytes of pixels"):
        eng.submit([7], images=[image(SMALL, 1)])
    eng.step()  # admission: the tower runs, the pixels are dropped
    assert eng.pixel_bytes == 0
    second = eng.submit([7], SamplingParams(max_tokens=2), images=[image(SMALL, 1)])
    second.cancel()  # still waiting (one slot): cancelled before its tower
    eng.run_until_done()
    assert eng.pixel_bytes == 0 and second.request.finish_reason == "cancelled"
    assert len(first.result().output) == 2


def test_chunk_features_and_packing():
    """`ImageInputs.chunk` picks the rows of the placeholders inside [start, end) in order;
    `pack_chunk_features` lays rows out row-major, zeros after (what `embed` indexes)."""
    prompt = [1, 7, 7, 2, 7, 3, 7, 7]
    inputs = ImageInputs.create(prompt, None, 7)
    inputs.features = np.arange(5 * 2, dtype=np.float32).reshape(5, 2) + 1
    np.testing.assert_array_equal(inputs.rows, [-1, 0, 1, -1, 2, -1, 3, 4])
    np.testing.assert_array_equal(inputs.chunk(2, 6), inputs.features[1:3])
    assert inputs.chunk(3, 4).shape == (0, 2)
    buf = pack_chunk_features([inputs.chunk(0, 3), None, inputs.chunk(6, 8)], 3, 4, 2, np.float32)
    np.testing.assert_array_equal(buf[:4], inputs.features[[0, 1, 3, 4]])
    assert buf.shape == (12, 2) and not buf[4:].any()
    with pytest.raises(ValueError, match=r"prefill row 0 must be \[<= 1, 2\]"):
        pack_chunk_features([inputs.chunk(0, 3)], 1, 1, 2, np.float32)


def test_image_features_fixed_batch_equals_one_call(model):
    """`image_features(batch=2)` (padded fixed-size tower calls, host assembly) gives the rows
    of the one-call path: 2 views and 2 crops, so both resolutions get a padded last call.
    Only XLA's batch-shape-dependent f32 summation order differs: per row at most a few f32
    ulps times sqrt(2704) (the longest sum: attention over the 728 px view's tokens)."""
    from step3_jax.vision.preprocess import preprocess_images

    pre = preprocess_images([image(WIDE, 11), image(SMALL, 12)], VIS)
    one = np.asarray(model.image_features(pre))
    fixed = model.image_features(pre, batch=2)
    assert isinstance(fixed, np.ndarray) and fixed.shape == one.shape == (2 * 81 + 169 + 169, 128)
    tol = 8 * np.finfo(np.float32).eps * np.sqrt(2704) * np.abs(one).max()
    np.testing.assert_allclose(fixed, one, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="batch must be None or >= 1, got 0"):
        model.image_features(pre, batch=0)
