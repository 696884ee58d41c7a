"""The multimodal wrapper: merging at placeholders, text-only equivalence, generate with images."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from vision_fixtures import load_tiny, random_vision_tensors

from step3_jax.config import Step3Config
from step3_jax.model import Step3Model
from step3_jax.policy import KernelPolicy
from step3_jax.vision import generate as vgen
from step3_jax.vision import model as vision_model
from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.model import Step3VLModel
from step3_jax.vision.preprocess import ImageSpecialTokens, expand_prompt, preprocess_images

TEXT = Step3Config.tiny()
VIS = Step3VisionConfig.tiny(text_hidden_size=TEXT.hidden_size, image_token_id=7)
SPECIAL = ImageSpecialTokens(
    image=7, im_start=1, im_end=2, patch_start=3, patch_end=4, patch_newline=5
)


@pytest.fixture(scope="module")
def model():
    text = Step3Model(
        TEXT, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
        policy=KernelPolicy.reference(),
    )  # fmt: skip
    return Step3VLModel(text, load_tiny(VIS, random_vision_tensors(VIS, seed=0)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, features):
    return nnx.merge(graphdef, state)(tokens, features=features)


def forward(m, tokens, features=None) -> np.ndarray:
    """``m(tokens, features=features)`` jitted (a Step3VLModel or, without features, a
    Step3Model)."""
    graphdef, state = nnx.split(m)
    if features is None:
        return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
    return np.asarray(_forward(graphdef, state, tokens, features))


def _image(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_no_image_equals_text_model(model):
    tokens = jnp.asarray(np.random.default_rng(0).integers(8, TEXT.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_array_equal(forward(model, tokens), forward(model.text, tokens))


def test_placeholder_without_image_is_an_error(model):
    with pytest.raises(ValueError, match="1 image placeholder positions .* 0 image feature rows"):
        model(jnp.asarray([[9, 7, 10]], jnp.int32))


def test_features_land_exactly_at_placeholders(model):
    pre = preprocess_images([_image(300, 300, 1)], VIS)  # no crops: 169 features
    ids = expand_prompt([9, 7, 10], pre.layouts, SPECIAL)[None]
    feats = model.image_features(pre)
    x = np.asarray(model.embed(jnp.asarray(ids), feats))
    text = np.asarray(model.text.embed(jnp.asarray(ids)))
    mask = ids[0] == 7
    np.testing.assert_array_equal(x[0, mask], np.asarray(feats))
    np.testing.assert_array_equal(x[0, ~mask], text[0, ~mask])  # markup keeps its embedding
    assert not np.allclose(
        np.asarray(model(jnp.asarray(ids), pre)), np.asarray(model.text(jnp.asarray(ids)))
    )


def test_image_features_order_crops_then_view(model):
    pre = preprocess_images([_image(728, 400, 2), _image(300, 300, 3)], VIS)
    feats = np.asarray(model.image_features(pre))
    views = np.asarray(model.embed_images(pre.pixel_values))
    crops = np.asarray(model.embed_images(pre.crop_pixel_values))
    want = np.concatenate([crops[0], crops[1], views[0], views[1]])
    assert pre.num_crops == (2, 0) and feats.shape == (2 * 81 + 2 * 169, TEXT.hidden_size)
    np.testing.assert_allclose(feats, want, rtol=1e-6, atol=1e-6)


def test_generate_with_images_matches_teacher_forcing(model, monkeypatch):
    calls = []
    orig = vision_model._embed_images  # every tower call goes through it
    monkeypatch.setattr(
        vision_model, "_embed_images", lambda f, px: calls.append(px.shape) or orig(f, px)
    )
    images = [[_image(728, 400, 4)], [_image(200, 260, 5), _image(640, 480, 6)]]
    prompts = [[9, 7, 11, 12], [13, 7, 14, 7]]
    res = vgen.generate(model, prompts, 5, images=images, special=SPECIAL)
    # one tower call per resolution present (3 global views, then 2 crops), none while decoding
    assert calls == [(3, 3, 728, 728), (2, 3, 504, 504)]
    expanded, feats = vgen.prepare(model, prompts, images, SPECIAL)
    rows = iter(np.split(np.asarray(feats), [2 * 81 + 169]))
    for b, (ids, new) in enumerate(zip(expanded, res.tokens, strict=True)):
        assert len(new) == 5
        full = jnp.asarray([ids + new[:-1]], jnp.int32)
        logits = forward(model, full, jnp.asarray(next(rows)))
        greedy = logits[0, len(ids) - 1 :].argmax(-1)
        assert greedy.tolist() == new, f"prompt {b}"


def test_generate_checks_image_count(model):
    with pytest.raises(ValueError, match="2 image placeholder token"):
        vgen.generate(model, [[9, 7, 7]], 2, images=[[_image(50, 50, 1)]], special=SPECIAL)


def test_generate_prepared_image_lengths(model):
    """Past ``image_lengths`` an ``<im_patch>`` id (a generated reply token fed back) keeps
    its text embedding; the feature rows stay with the prompt's placeholders."""
    (ids,), feats = vgen.prepare(model, [[9, 7, 11]], [[_image(64, 48, 7)]], SPECIAL)
    res = vgen.generate_prepared(model, [ids + [7]], feats, 1, image_lengths=[len(ids)])
    x = jnp.concatenate(
        [model.embed(jnp.asarray([ids]), feats), model.text.embed(jnp.asarray([[7]]))], axis=1
    )
    logits, _ = model.forward_embeds(x, jnp.arange(len(ids) + 1)[None])
    assert res.tokens[0] == [int(np.argmax(logits[0, -1]))]
    with pytest.raises(ValueError, match="image_lengths"):
        vgen.generate_prepared(model, [ids], feats, 1, image_lengths=[len(ids) + 1])


@pytest.mark.parametrize(
    "images, match",
    [
        (["cat.png"], r"images\[0\] must be the list of prompt 0's images .*got str"),
        ([_image(40, 30, 1)], r"images\[0\] must be the list of prompt 0's images .*got ndarray"),
        ("cat.png", r"images must be a list with one list of images per prompt .*got str"),
        (_image(40, 30, 1), r"images must be a list with one list of images per prompt .*ndarray"),
    ],
)
def test_generate_images_must_be_nested_per_prompt(model, images, match):
    # Not nested, a path was iterated per character and an array per row.
    with pytest.raises(
        TypeError, match=match + r"; one image for one prompt: images=\[\[image\]\]"
    ):
        vgen.generate(model, [[9, 7, 11]], 2, images=images, special=SPECIAL)


def test_generate_prepared_checks_features_on_the_host(model):
    """`Step3VLModel.embed` cannot count placeholders under jit: `generate_prepared` checks the
    features against the prompt before its jitted prefill."""
    prompt = [9, 11, 7, 7, 7, 7, 12]  # 4 placeholders
    rng = np.random.default_rng(3)
    f = jnp.asarray(rng.standard_normal((4, TEXT.hidden_size)), jnp.float32)
    for features, lengths, match in [
        (f[:1], None, r"the prompt has 4 image placeholder positions \(id 7\) but 1 image feature"),
        (None, None, r"the prompt has 4 image placeholder positions \(id 7\) but 0 image feature"),
        (f, [4], r"the prompt has 2 image placeholder positions \(id 7\) but 4 image feature"),
        (f, [-5], r"image_lengths=\[-5\] must give one length in \[0, the prompt's length\]"),
        (f[:, :64], None, rf"features must be \[I, hidden_size={TEXT.hidden_size}\] .*\(4, 64\)"),
        (f[None], None, rf"features must be \[I, hidden_size={TEXT.hidden_size}\] .*\(1, 4, "),
    ]:
        with pytest.raises(ValueError, match=match):
            vgen.generate_prepared(model, [prompt], features, 2, image_lengths=lengths)
    # two prompts: their placeholders together (5) against the rows
    with pytest.raises(ValueError, match="has 5 image placeholder positions .* but 4 image"):
        vgen.generate_prepared(model, [prompt, [9, 7, 12]], f, 2)
