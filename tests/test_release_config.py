"""Config parity with vLLM's / SGLang's Step3TextConfig and the keys that change the math:
defaults for a diff-only sub-config, ``norm_expert_weight`` (renormalized top-k) and
``rope_scaling`` (linear implemented, every other type refused by name)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from step3_jax import Step3Config
from step3_jax.config import HF_TEXT_DEFAULTS
from step3_jax.layers.moe import MoE, route
from step3_jax.layers.rope import RopeScaling, apply_rope


# ----------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("vl", [{"model_type": "step3_vl"}, {"text_config": {}}, {}])
def test_empty_or_absent_text_config_is_the_release(vl):
    """Step3VLConfig builds Step3TextConfig() when text_config is missing or empty."""
    want = Step3Config.step3()
    assert Step3Config.from_hf_config(vl) == want
    assert Step3Config.from_hf_config({"text_config": None, "model_type": "step3_vl"}) == want


def test_only_non_default_keys_fill_the_rest_from_step3textconfig():
    c = Step3Config.from_hf_config(
        {"text_config": {"num_hidden_layers": 8, "moe_layers_enum": "4,5,6"}}
    )
    assert c == dataclasses.replace(Step3Config.step3(), num_layers=8, moe_layer_ids=(4, 5, 6))
    assert c.share_expert_dim == HF_TEXT_DEFAULTS["share_expert_dim"] == 5120


def test_default_moe_layers_that_do_not_fit_are_refused_by_name():
    with pytest.raises(ValueError, match="moe_layers_enum is absent"):
        Step3Config.from_hf_config({"text_config": {"num_hidden_layers": 8}})


# ----------------------------------------------------------------------------- norm_expert_weight
def test_norm_expert_weight_round_trips_and_is_strict():
    hf = {**Step3Config.tiny().to_hf_config(), "norm_expert_weight": True}
    c = Step3Config.from_hf_config(hf)
    assert c.moe_renormalize is True
    assert Step3Config.from_hf_config(c.to_hf_config()) == c
    with pytest.raises(ValueError, match="norm_expert_weight"):
        Step3Config.from_hf_config({**hf, "norm_expert_weight": "yes"})


def test_route_renormalize_matches_numpy():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((5, 3, 16)).astype(np.float32)
    router = rng.standard_normal((8, 16)).astype(np.float32) / 4
    w, ids = route(jnp.asarray(h), jnp.asarray(router), 3, renormalize=True)
    want_w, want_ids = ref.route(h.reshape(-1, 16).astype(np.float64), router.astype(np.float64), 3)
    want_w = want_w / want_w.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1, 3), want_ids)
    # float32 softmax of O(1) logits: a few ulps.
    np.testing.assert_allclose(np.asarray(w).reshape(-1, 3), want_w, rtol=1e-6, atol=1e-7)
    plain, _ = route(jnp.asarray(h), jnp.asarray(router), 3)
    assert not np.allclose(np.asarray(plain).sum(-1), 1.0)  # the default really differs


def test_moe_layer_renormalize_matches_reference():
    # The dense oracle; the grouped path shares `route` (where renormalize acts) with it.
    d, e, k, f = 32, 6, 2, 24
    moe = MoE(
        d, e, k, f, 16, renormalize=True,
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=__import__("flax").nnx.Rngs(3),
    )  # fmt: skip
    h = np.random.default_rng(1).standard_normal((2, 5, d)).astype(np.float32)
    got = np.asarray(moe(jnp.asarray(h), implementation="dense"), np.float64)
    w = {
        f"model.layers.0.moe.{n}.weight": np.asarray(getattr(moe, n)[...], np.float64)
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    x = h.reshape(-1, d).astype(np.float64)
    weights, ids = ref.route(x, np.asarray(moe.router[...], np.float64), k)
    weights = weights / weights.sum(-1, keepdims=True)
    want = np.zeros_like(x)
    for m in range(x.shape[0]):
        for j in range(k):
            gate, up, down = (
                w[f"model.layers.0.moe.{n}.weight"][ids[m, j]]
                for n in ("gate_proj", "up_proj", "down_proj")
            )
            want[m] += weights[m, j] * ref.swiglu(x[m], gate, up, down)
    s = moe.shared_expert
    want += ref.swiglu(
        x,
        *(
            np.asarray(getattr(s, n)[...], np.float64)
            for n in ("gate_proj", "up_proj", "down_proj")
        ),
    )
    # float32 contractions of length <= 32: 1e-5 relative to the output scale is ~100 ulps.
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got.reshape(-1, d), want, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- rope_scaling
@pytest.mark.parametrize(
    "scaling",
    [
        {"type": "linear", "factor": 4.0},
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_linear_rope_scaling_parses_and_round_trips(scaling):
    c = Step3Config.from_hf_config({**Step3Config.tiny().to_hf_config(), "rope_scaling": scaling})
    assert c.rope_scaling == RopeScaling("linear", 4.0)
    assert Step3Config.from_hf_config(c.to_hf_config()) == c
    hash(c)


def test_rope_parameters_form_of_transformers_5():
    hf = {**Step3Config.tiny().to_hf_config(), "rope_theta": None}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    c = Step3Config.from_hf_config(hf)
    assert c.rope_theta == 1234.0 and c.rope_scaling is None


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "llama3", "longrope", "su", "mrope"])
def test_other_rope_scaling_types_are_refused_by_name(rope_type):
    hf = {
        **Step3Config.tiny().to_hf_config(),
        "rope_scaling": {"rope_type": rope_type, "factor": 2.0},
    }
    with pytest.raises(ValueError, match=f"'{rope_type}' is not supported"):
        Step3Config.from_hf_config(hf)


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("factor", [float("inf"), float("nan"), "2", None, True, 0, -2.0])
def test_rope_scaling_factor_must_be_a_finite_positive_number(where, factor):
    """inf would send every RoPE position to 0; "2" / true / null are not numbers."""
    hf = {**Step3Config.tiny().to_hf_config(), where: {"rope_type": "linear", "factor": factor}}
    with pytest.raises(ValueError, match=rf"'{where}\.factor' must be a finite number > 0"):
        Step3Config.from_hf_config(hf)


@pytest.mark.parametrize("factor", [float("inf"), float("nan"), "2", 0.0])
def test_rope_scaling_dataclass_refuses_a_non_finite_factor(factor):
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        RopeScaling("linear", factor)


@pytest.mark.parametrize("theta", [True, "abc", float("inf"), [1.0]])
def test_rope_parameters_rope_theta_is_type_checked(theta):
    hf = {**Step3Config.tiny().to_hf_config(), "rope_parameters": {"rope_theta": theta}}
    with pytest.raises(ValueError, match=r"'rope_parameters\.rope_theta' must be a finite number"):
        Step3Config.from_hf_config(hf)


def test_null_rope_parameters_rope_theta_falls_back_to_rope_theta():
    hf = {**Step3Config.tiny().to_hf_config(), "rope_theta": 1234.0}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": None}
    assert Step3Config.from_hf_config(hf).rope_theta == 1234.0


def test_default_rope_scaling_is_plain_rope():
    hf = {**Step3Config.tiny().to_hf_config(), "rope_scaling": {"type": "default"}}
    assert Step3Config.from_hf_config(hf).rope_scaling is None


def test_apply_rope_linear_matches_reference_at_scaled_positions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 5000, (2, 7))
    got = apply_rope(
        jnp.asarray(x), jnp.asarray(pos, jnp.int32), 10000.0, RopeScaling("linear", 4.0)
    )
    want = ref.rope_neox(x.astype(np.float64), pos / 4.0, 10000.0)
    # float32 angles up to 1250 rad: absolute angle error ~1250 * 6e-8 = 7.5e-5.
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-4)
    plain = apply_rope(jnp.asarray(x), jnp.asarray(pos, jnp.int32), 10000.0)
    assert np.max(np.abs(np.asarray(plain) - want)) > 0.1


def test_model_honours_rope_scaling_and_renormalize():
    """The model must build its layers from these config fields (model.py passes
    ``rope_scaling=c.rope_scaling`` to MFAttention and ``renormalize=c.moe_renormalize`` to
    MoE): a config that asks for them must not silently run plain Step-3 math."""
    from flax import nnx

    from step3_jax.model import Step3Model

    c = dataclasses.replace(
        Step3Config.tiny(), rope_scaling=RopeScaling("linear", 2.0), moe_renormalize=True
    )
    model = Step3Model(c, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    attn, moe = model.layers[0].self_attn, model.layers[c.moe_layer_ids[0]].ffn
    assert attn.rope_scaling == c.rope_scaling and moe.renormalize
    jax.block_until_ready(model(jnp.arange(4, dtype=jnp.int32)[None]))


def test_config_stays_a_light_leaf():
    """RopeScaling lives in step3_jax.config so parsing a config imports no jax or layers."""
    import subprocess
    import sys

    code = "import sys, step3_jax.config; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "step3_jax.config" in loaded
    assert not {m for m in loaded if m == "jax" or m.startswith(("jax.", "step3_jax.layers"))}
