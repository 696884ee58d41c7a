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
        (dict(num_layers=0), "num_layers must be > 0"),
    ],
)
def test_bad_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Step3VisionConfig(**kw)


def test_not_a_vl_config():
    with pytest.raises(ValueError, match="vision_config"):
        Step3VisionConfig.from_hf_config({"hidden_size": 7168})
