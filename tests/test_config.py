"""Step3Config: the published Step-3 numbers, HF config parsing and validation."""

from __future__ import annotations

import dataclasses

import pytest

from step3_jax import Step3Config

# The released Step-3 text config.json (text part), as HF stores it: moe_layers_enum is a
# comma-separated STRING and the context key has no trailing "s".
HF_STEP3 = {
    "architectures": ["Step3TextForCausalLM"],
    "model_type": "step3_text",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "num_attention_heads": 64,
    "num_attention_groups": 1,
    "num_hidden_layers": 61,
    "max_seq_len": 65536,
    "vocab_size": 128815,
    "rms_norm_eps": 1e-5,
    "moe_intermediate_size": 5120,
    "moe_num_experts": 48,
    "moe_top_k": 3,
    "rope_theta": 500000,
    "rope_scaling": None,
    "max_position_embedding": 65536,
    "share_expert_dim": 5120,
    "share_q_dim": 2048,
    "head_dim": 256,
    "norm_expert_weight": False,
    "moe_layers_enum": ",".join(str(i) for i in range(4, 60)),
}


def _billions(n: int) -> float:
    return round(n / 1e9, 2)


# ----------------------------------------------------------------------------- Step-3 numbers
def test_step3_parameter_counts():
    c = Step3Config.step3()
    assert _billions(c.param_count()) == 316.29
    assert _billions(c.activated_param_count()) == 38.84
    assert _billions(c.activated_param_count(include_embeddings=False)) == 36.99


def test_step3_component_counts():
    """The per-component figures of STEP3.md section 2, each from its own formula."""
    c = Step3Config.step3()
    d, r, n, h = 7168, 2048, 64, 256
    attn_linears = d * r + 2 * d * h + r * n * h + n * h * d  # q, k, v, wq, o
    assert round(attn_linears / 1e6, 2) == 169.35
    assert c.attention_params_per_layer == attn_linears + r + 2 * d  # + three norm scales
    assert round(c.dense_layer_ffn_params / 1e6, 1) == 396.4
    assert round(c.expert_params / 1e6, 1) == 110.1
    assert round(c.moe_layer_ffn_params / 1e9, 3) == 5.395
    assert round(c.vocab_size * c.hidden_size / 1e9, 3) == 0.923
    assert c.moe_layer_ids == tuple(range(4, 60))
    assert c.dense_layer_ids == (0, 1, 2, 3, 60)


def test_step3_kv_bytes():
    c = Step3Config.step3()
    assert c.kv_bytes_per_token(bytes_per_value=1, per_layer=True) == 512  # FP8
    assert c.kv_bytes_per_token(bytes_per_value=2, per_layer=True) == 1024  # bf16
    assert c.kv_bytes_per_token(bytes_per_value=1) == 512 * 61


def test_routing_sparsity():
    c = Step3Config.step3()
    assert round((c.top_k + 1) / (c.num_experts + 1), 4) == 0.0816


def test_tiny_keeps_the_structure():
    c = Step3Config.tiny()
    assert c.dense_layer_ids[0] == 0 and c.dense_layer_ids[-1] == c.num_layers - 1
    assert c.moe_layer_ids and c.share_expert_dim > 0 and c.top_k < c.num_experts
    assert c.param_count() < 2_000_000


# ----------------------------------------------------------------------------- HF configs
def test_from_hf_config_matches_step3():
    assert Step3Config.from_hf_config(HF_STEP3) == Step3Config.step3()


@pytest.mark.parametrize("key", ["max_position_embedding", "max_position_embeddings"])
def test_from_hf_config_max_position_key_with_and_without_s(key):
    hf = {k: v for k, v in HF_STEP3.items() if k != "max_position_embedding"}
    hf[key] = 4096
    assert Step3Config.from_hf_config(hf).max_position_embeddings == 4096


@pytest.mark.parametrize(
    "enum", ["4,5,6", "4, 5, 6", " 4,5,6,", [4, 5, 6], (4, 5, 6)], ids=lambda e: repr(e)
)
def test_from_hf_config_moe_layers_enum_forms(enum):
    c = Step3Config.from_hf_config({**HF_STEP3, "moe_layers_enum": enum})
    assert c.moe_layer_ids == (4, 5, 6)
    assert isinstance(c.moe_layer_ids, tuple)


def test_from_hf_config_vl_nesting():
    vl = {"model_type": "step3_vl", "text_config": HF_STEP3, "vision_config": {"width": 1536}}
    assert Step3Config.from_hf_config(vl) == Step3Config.step3()


@pytest.mark.parametrize("preset", [Step3Config.step3, Step3Config.tiny])
def test_hf_round_trip(preset):
    c = preset()
    hf = c.to_hf_config()
    assert isinstance(hf["moe_layers_enum"], str)
    assert "max_position_embedding" in hf
    assert Step3Config.from_hf_config(hf) == c
    assert Step3Config.from_hf_config(hf).to_hf_config() == hf


def test_non_default_values_round_trip():
    c = dataclasses.replace(
        Step3Config.tiny(), rms_norm_eps=1e-6, rope_theta=10000.0, share_expert_dim=48
    )
    assert Step3Config.from_hf_config(c.to_hf_config()) == c


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("hidden_size", -1),
        ("num_layers", 0),
        ("num_heads", 0),
        ("head_dim", 0),
        ("head_dim", 31),
        ("share_q_dim", 0),
        ("intermediate_size", 0),
        ("num_experts", 0),
        ("top_k", 0),
        ("top_k", 9),  # > num_experts = 8
        ("moe_intermediate_size", 0),
        ("share_expert_dim", -1),
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", -1e-5),
        ("rope_theta", 0.0),
        ("max_position_embeddings", 0),
        ("moe_layer_ids", (1, 4)),  # layer 4 does not exist in a 4-layer model
        ("moe_layer_ids", (1, 1)),
        ("moe_layer_ids", (-1,)),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(Step3Config.tiny(), **{field: value})


def test_bad_hf_values_raise_naming_the_key():
    with pytest.raises(ValueError, match="num_attention_groups"):
        Step3Config.from_hf_config({**HF_STEP3, "num_attention_groups": 8})
    with pytest.raises(ValueError, match="moe_layers_enum"):
        Step3Config.from_hf_config({**HF_STEP3, "moe_layers_enum": "4,five,6"})
    with pytest.raises(ValueError, match="moe_layers_enum|moe_layer_ids"):
        Step3Config.from_hf_config({**HF_STEP3, "moe_layers_enum": "4,61"})


@pytest.mark.parametrize("text_config", ["oops", [1, 2], 3])
def test_text_config_that_is_not_a_mapping_is_refused_by_name(text_config):
    with pytest.raises(ValueError, match=r"'text_config' must be a mapping \(or null\), got"):
        Step3Config.from_hf_config({"model_type": "step3_vl", "text_config": text_config})


@pytest.mark.parametrize("enum", [[4.9, 5.0, 6.0], 5, [4, "five"], [True, 5]])
def test_moe_layers_enum_is_not_truncated_or_coerced(enum):
    with pytest.raises(ValueError, match="moe_layers_enum must list integer layer ids"):
        Step3Config.from_hf_config({**HF_STEP3, "moe_layers_enum": enum})


@pytest.mark.parametrize(
    "key", ["vocab_size", "rms_norm_eps", "norm_expert_weight", "moe_layers_enum", "text_config"]
)
def test_hostile_values_give_short_messages(key):
    """A megabyte-long string in config.json is quoted, cut, in the message naming the key."""
    with pytest.raises(ValueError, match=key) as err:
        Step3Config.from_hf_config({**HF_STEP3, key: "x" * 10**6})
    assert len(str(err.value)) < 300


def test_config_is_frozen_and_hashable():
    c = Step3Config.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_layers = 3  # type: ignore[misc]
    assert hash(c) == hash(Step3Config.tiny())
