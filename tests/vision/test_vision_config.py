"""Step3VisionConfig: presets, HF round trip, derived token counts, clear errors."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from step3_jax.vision.config import Step3VisionConfig
from step3_jax.vision.encoder import Step3VisionModel

RELEASE_LIKE = {
    "architectures": ["Step3VLForConditionalGeneration"],
    "model_type": "step3_vl",
    "understand_projector_stride": 2,
    "projector_bias": False,
    "image_token_id": 128001,
    "vision_config": {
        "hidden_size": 1792, "intermediate_size": 15360, "output_hidden_size": 4096,
        "num_hidden_layers": 63, "num_attention_heads": 16, "image_size": 728,
        "patch_size": 14, "hidden_act": "quick_gelu", "model_type": "step3_vision_encoder",
    },
    "text_config": {"hidden_size": 7168},
}  # fmt: skip


def test_from_hf_config_and_back():
    c = Step3VisionConfig.from_hf_config(RELEASE_LIKE)
    assert c == dataclasses.replace(Step3VisionConfig.step3(), projector_bias=False)
    assert (
        Step3VisionConfig.from_hf_config({**c.to_hf_config(), "text_config": {"hidden_size": 7168}})
        == c
    )


def test_token_counts_match_the_processor():
    c = Step3VisionConfig.step3()
    assert (c.tokens_per_view(728), c.tokens_per_view(504)) == (169, 81)
    assert c.position_grid == 52 and c.head_dim == 112
    stride1 = Step3VisionConfig(projector_stride=1)  # vLLM's config default: wrong counts
    assert stride1.tokens_per_view(728) == 26 * 26


def test_real_size_model_param_count():
    c = Step3VisionConfig.step3()
    model = nnx.eval_shape(lambda: Step3VisionModel(c, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(a.shape)) for a in leaves) == c.param_count()
    assert 4.6e9 < c.param_count() < 4.8e9  # the release's ~5B vision half


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(num_heads=5), "divide by num_heads"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(image_size=730), "multiple of"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(num_layers=0), r"num_layers must be an integer in \[1, 4096\], got 0"),
        (dict(num_layers=10**6), r"num_layers must be an integer in \[1, 4096\]"),
        (dict(hidden_size=32.9), r"hidden_size must be an integer in \[1, 131072\], got 32.9"),
        (dict(patch_size="14"), "patch_size must be an integer"),
        (dict(image_token_id=-1), r"image_token_id must be an integer in \[0, "),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be a finite number"),
        (dict(enable_patch="false"), "enable_patch must be true or false"),
        (dict(projector_bias=1), "projector_bias must be true or false"),
    ],
)
def test_bad_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Step3VisionConfig(**kw)


def test_not_a_vl_config():
    with pytest.raises(ValueError, match="vision_config"):
        Step3VisionConfig.from_hf_config({"hidden_size": 7168})


def _hf(**top):
    """RELEASE_LIKE with top-level keys replaced (``vision_config.<key>`` for the vision ones)."""
    hf = {**RELEASE_LIKE, "vision_config": dict(RELEASE_LIKE["vision_config"])}
    for key, value in top.items():
        if key.startswith("vision_config."):
            hf["vision_config"][key.split(".", 1)[1]] = value
        else:
            hf[key] = value
    return hf


@pytest.mark.parametrize(
    "key, value, msg",
    [
        ("num_hidden_layers", 100_000, r"must be an integer in \[1, 4096\], got 100000"),
        ("num_hidden_layers", 10**9, r"must be an integer in \[1, 4096\], got 1000000000"),
        ("hidden_size", "abc", r"must be an integer in \[1, 131072\], got 'abc'"),
        ("hidden_size", 32.9, "must be an integer.*got 32.9"),  # not truncated to 32
        ("num_attention_heads", True, "must be an integer.*got True"),
        ("intermediate_size", -1, "must be an integer"),
        ("image_size", 10**8, "must be an integer"),
        ("layer_norm_eps", "1e-5", r"must be a finite number in \(0, 1\]"),
        ("layer_norm_eps", float("inf"), "must be a finite number"),
        ("enable_patch", "false", "must be true or false, got 'false'"),  # bool("false") is True
        ("enable_patch", 0, "must be true or false"),
        ("hidden_act", ["quick_gelu"], "must be one of"),
    ],
)
def test_hf_vision_keys_are_typed_and_bounded(key, value, msg):
    with pytest.raises(ValueError, match=rf"config key 'vision_config\.{key}' {msg}"):
        Step3VisionConfig.from_hf_config(_hf(**{f"vision_config.{key}": value}))


@pytest.mark.parametrize(
    "top, msg",
    [
        ({"vision_config": None}, "'vision_config' must be a mapping, got None"),
        ({"vision_config": "x" * 10**6}, "'vision_config' must be a mapping, got 'xxx"),
        ({"vision_config": [1]}, "'vision_config' must be a mapping"),
        ({"text_config": "oops"}, "'text_config' must be a mapping"),
        ({"text_config": {"hidden_size": "7168"}}, "'text_config.hidden_size' must be an integer"),
        ({"understand_projector_stride": 2.0}, "'understand_projector_stride' must be an integer"),
        ({"projector_bias": "no"}, "'projector_bias' must be true or false"),
        ({"image_token_id": -1}, r"'image_token_id' must be an integer in \[0, "),
        ({"image_token_id": 2**40}, "'image_token_id' must be an integer"),
    ],
)
def test_hf_top_level_keys_are_typed_and_bounded(top, msg):
    with pytest.raises(ValueError, match=msg) as err:
        Step3VisionConfig.from_hf_config(_hf(**top))
    assert len(str(err.value)) < 300  # a hostile value is quoted cut


def test_null_keys_take_the_defaults_and_the_release_fits_the_bounds():
    """The release's own values (and null = absent, as on the text side) still parse."""
    c = Step3VisionConfig.from_hf_config(
        _hf(**{"vision_config.num_channels": None, "text_config": None, "projector_bias": None})
    )
    assert c == Step3VisionConfig.step3()
