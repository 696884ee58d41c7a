"""The official Step-3 release as published: every layout x bf16/block-FP8 x fp8 modes.

Tiny fake checkpoints are written by the ``safetensors`` package in the exact naming of the
release (vLLM's ``step3_vl.py`` / ``step3_text.py``, the HF model card's key_mapping):

* ``text``: the text model alone (``model.*``, ``lm_head.*``), config without nesting;
* ``vl``: the VL checkpoint on disk: the same text names beside ``vision_model.*``,
  ``vit_downsampler.*``, ``vit_downsampler2.*`` and ``vit_large_projector.*``, config nested
  under ``text_config`` with the quantization_config at the top level;
* ``hf_transformers``: the in-memory layout (``model.language_model.*``,
  ``model.vision_model.*``, ``model.vit_*``, ``lm_head.*``).

Dimensions are not multiples of 128 (ragged FP8 blocks) and each checkpoint has 3 shards.
The dequantized float32 model's logits are checked against the float64 NumPy reference.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from ckpt_fixtures import dequantize_reference, random_tensors, small_config, write_hf
from flax import nnx

from step3_jax.checkpoints import CheckpointMismatchError, hf_mapping, load_hf
from step3_jax.checkpoints.safetensors_io import read_tensor
from step3_jax.policy import KernelPolicy
from step3_jax.quant_model import Fp8Weight

CFG = small_config()
REF = KernelPolicy.reference()  # XLA attention and linears, the dense MoE oracle
LAYOUTS = ("text", "vl", "hf_transformers")
QCFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
# Relative error budget of the issue: float32 model vs float64 reference, max-abs normalized.
LOGITS_RTOL = 2e-4


def vision_tensors(seed: int) -> dict[str, np.ndarray]:
    """A stand-in vision half with the release's module names (shapes are arbitrary)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (8, 3, 2, 2),
        "vision_model.transformer.layers.0.mlp.fc1.weight": (16, 8),
        "vit_downsampler.weight": (12, 8, 2, 2),
        "vit_downsampler.bias": (12,),
        "vit_downsampler2.weight": (24, 12, 3, 3),
        "vit_downsampler2.bias": (24,),
        "vit_large_projector.weight": (CFG.hidden_size, 24),
        "vit_large_projector.bias": (CFG.hidden_size,),
    }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def in_layout(text: dict, vision: dict, layout: str) -> dict[str, np.ndarray]:
    if layout == "text":
        return dict(text)
    if layout == "vl":
        return {**text, **vision}
    out = {}
    for name, t in text.items():  # HF transformers: model.language_model.*, lm_head.* kept
        out[name.replace("model.", "model.language_model.", 1)] = t
    out.update({"model." + name: t for name, t in vision.items()})
    return out


def write_release(path, layout: str, fp8: bool, seed: int = 0, quant=None):
    text = random_tensors(CFG, seed=seed, fp8=fp8)
    vision = vision_tensors(seed + 100)
    write_hf(path, CFG, in_layout(text, vision, layout), num_shards=3)
    hf_text = CFG.to_hf_config()
    if layout == "text":
        cfg = hf_text
    else:
        cfg = {
            "architectures": ["Step3VLForConditionalGeneration"],
            "model_type": "step3_vl",
            "text_config": hf_text,
            "vision_config": {"hidden_size": 8, "output_hidden_size": 12},
        }
    if fp8 or quant is not None:
        cfg["quantization_config"] = quant or {**QCFG, "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    return text, vision


def reference_weights(text: dict) -> dict[str, np.ndarray]:
    """float64 HF-named weights: block-FP8 tensors dequantized in float64."""
    out = {}
    for name, t in text.items():
        if name.endswith(hf_mapping.SCALE_SUFFIX):
            continue
        scale = text.get(name + hf_mapping.SCALE_SUFFIX)
        if scale is None:
            out[name] = t.astype(np.float64)
        else:
            *_, n, k = t.shape
            s = np.repeat(np.repeat(scale.astype(np.float64), 128, -2), 128, -1)[..., :n, :k]
            out[name] = t.astype(np.float64) * s
    return out


def _leaves(model):
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_release_layout_dequantized_logits_match_float64_reference(tmp_path, layout, fp8):
    text, _ = write_release(tmp_path, layout, fp8, seed=3)
    assert (
        hf_mapping.detect_layout(
            json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
        )
        == layout
    )
    model = load_hf(
        tmp_path,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        fp8="dequantize",
        policy=REF,
    )
    assert model.config == CFG
    tokens = np.random.default_rng(7).integers(0, CFG.vocab_size, (2, 9))
    w = reference_weights(text)
    # Top-k routing is discontinuous: the comparison is only well posed when no token sits
    # within float32 rounding of an expert tie.
    for h2 in ref.post_attention_inputs(w, tokens, CFG).values():
        i = CFG.moe_layer_ids[0]
        assert ref.routing_margin(h2, w[f"model.layers.{i}.moe.gate.weight"], CFG.top_k) > 1e-4
    want = ref.forward(w, tokens, CFG)
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)), np.float64)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= LOGITS_RTOL, err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_release_layout_fp8_keep_holds_the_checkpoint_bits(tmp_path, layout):
    text, _ = write_release(tmp_path, layout, fp8=True, seed=4)
    model = load_hf(tmp_path, fp8="keep", policy=REF)
    leaves, kept = _leaves(model), 0
    for e in hf_mapping.entries(CFG):
        leaf = leaves[e.path]
        if not e.quantizable:
            assert not isinstance(leaf, Fp8Weight), e.hf_name
            continue
        assert isinstance(leaf, Fp8Weight), e.hf_name
        vals = np.asarray(leaf.values).reshape(e.hf_shape)
        assert vals.tobytes() == text[e.hf_name].tobytes(), e.hf_name
        np.testing.assert_array_equal(np.asarray(leaf.scales), text[e.scale_name])
        kept += 1
    assert kept == 27  # 15 attention linears + 6 dense + 3 stacked experts + 3 shared
    o = leaves[("layers", 0, "self_attn", "o_proj")]
    np.testing.assert_array_equal(
        np.asarray(o.dequantize()).reshape(CFG.hidden_size, -1),
        dequantize_reference(
            text["model.layers.0.self_attn.o_proj.weight"],
            text["model.layers.0.self_attn.o_proj.weight_scale_inv"],
        ),
    )
    logits = np.asarray(model(jnp.arange(5, dtype=jnp.int32)[None]), np.float32)
    assert np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("layout", ["vl", "hf_transformers"])
def test_vision_half_is_skipped_or_handed_to_the_callback(tmp_path, layout):
    _, vision = write_release(tmp_path, layout, fp8=False, seed=5)
    load_hf(tmp_path, policy=REF)  # skipped by default: no error
    got = {}
    load_hf(
        tmp_path,
        policy=REF,
        vision=lambda tensors: got.update({n: read_tensor(i) for n, i in tensors.items()}),
    )
    assert set(got) == set(vision)  # on-disk names whatever the layout
    for name, t in vision.items():
        np.testing.assert_array_equal(got[name], t)


def test_unknown_tensor_beside_the_vision_half_is_still_unexpected(tmp_path):
    text = random_tensors(CFG, seed=6)
    extra = {**vision_tensors(6), "vit_downsampler3.weight": np.ones((2, 2), np.float32)}
    write_hf(tmp_path, CFG, {**text, **extra}, num_shards=2)
    with pytest.raises(CheckpointMismatchError, match="1 unexpected") as err:
        load_hf(tmp_path, policy=REF)
    assert "vit_downsampler3.weight" in str(err.value)


def test_mixed_layouts_are_reported_as_duplicates(tmp_path):
    text = random_tensors(CFG, seed=8)
    both = {**text, "model.language_model.norm.weight": text["model.norm.weight"]}
    write_hf(tmp_path, CFG, both, num_shards=2)
    with pytest.raises(CheckpointMismatchError, match="duplicates"):
        load_hf(tmp_path, policy=REF)


@pytest.mark.parametrize(
    "quant, match",
    [
        ({**QCFG, "weight_block_size": [64, 64]}, r"weight_block_size=\[64, 64\]"),
        ({**QCFG, "weight_block_size": [128, 64]}, r"weight_block_size=\[128, 64\]"),
        ({"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
        ({**QCFG, "activation_scheme": "static"}, "activation_scheme='static'"),
        ({**QCFG, "fmt": "e5m2"}, "fmt='e5m2'"),
    ],
)
def test_unsupported_quantization_config_is_refused_by_name(tmp_path, quant, match):
    write_release(tmp_path, "vl", fp8=True, seed=9, quant=quant)
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path, policy=REF)


def test_text_subconfig_with_only_non_default_keys_loads(tmp_path):
    """transformers saves sub-configs as a diff against Step3TextConfig's defaults."""
    text = random_tensors(CFG, seed=10)
    write_hf(tmp_path, CFG, text, num_shards=2)
    full = CFG.to_hf_config()
    defaults = {
        "num_attention_groups": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "norm_expert_weight": False,
        "rope_scaling": None,
    }
    diff = {k: v for k, v in full.items() if defaults.get(k, object()) != v}
    assert "rms_norm_eps" not in diff and "rope_theta" not in diff
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "step3_vl", "text_config": diff})
    )
    assert load_hf(tmp_path, policy=REF).config == CFG


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("norm_expert_weight", True, "norm_expert_weight=True"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
    ],
)
def test_load_refuses_a_config_the_model_would_silently_ignore(tmp_path, key, value, match):
    """Until Step3Model wires rope_scaling / moe_renormalize into its layers, a checkpoint
    asking for them is refused at load instead of running plain Step-3 math; once wired,
    it loads with the layers set."""
    from step3_jax.config import Step3Config
    from step3_jax.model import Step3Model

    write_hf(tmp_path, CFG, random_tensors(CFG, seed=0), num_shards=2)
    hf = {**CFG.to_hf_config(), key: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    want = Step3Config.from_hf_config(hf)
    probe = nnx.eval_shape(lambda: Step3Model(want, rngs=nnx.Rngs(0)))
    moe, attn = probe.layers[CFG.moe_layer_ids[0]].ffn, probe.layers[0].self_attn
    wired = (moe.renormalize, attn.rope_scaling) == (want.moe_renormalize, want.rope_scaling)
    if not wired:
        with pytest.raises(NotImplementedError, match=match):
            load_hf(tmp_path, policy=REF)
        return
    model = load_hf(tmp_path, policy=REF)
    assert model.layers[0].self_attn.rope_scaling == want.rope_scaling
