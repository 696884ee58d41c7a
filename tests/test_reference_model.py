"""The float32 JAX model against the independent float64 NumPy reference (tests/reference_numpy).

Tolerance derivation (normwise, relative to max|reference logit|):

* float32 unit roundoff u = 2^-24 ~ 6.0e-8 (matmul precision is "highest" in conftest, so CPU
  dots are true float32).
* One length-K dot product with random-sign terms accumulates rounding like a random walk:
  relative error ~ u * sqrt(K). The longest contraction in the tiny model is the dense FFN's
  down projection, K = F = 256, so sqrt(K) = 16.
* Errors of chained operations add (to first order): per layer the critical path has 7 matmuls
  (q_proj, wq, QK^T, PV, o_proj, gate/up, down) plus norms, softmax and RoPE whose elementwise
  errors are a few u; with L = 4 layers and the lm_head that is DEPTH = 7 * 4 + 1 = 29 steps.
* Normalizations do not amplify relative error (RMSNorm is scale invariant) and the residual
  stream only grows ~2x over 4 layers with these weights, so no extra condition factor.

  tol = u * sqrt(K) * DEPTH = 6.0e-8 * 16 * 29 ~ 2.8e-5.

The default kernels (`KernelPolicy()`: the grouped MoE `step3_jax.kernels.grouped_gemm.moe_ffn`
instead of the dense oracle) honour the model's dtype: a float32 model computes its routed
experts in float32 too, so the same tolerance applies to both (before, the grouped path
returned bf16 and missed by ~1e-3).

Measured (seeded data below): ~6e-7, so the bound holds with ~40x margin, while any modelling
mistake (router renormalized, inter_norm skipped, RoPE half-split vs interleaved, wrong scale)
moves the logits by >1e-2 relative: `test_tolerance_is_sensitive` checks that a 1% change of a
single norm weight already exceeds the tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from flax import nnx

import step3_jax as s3

CFG = s3.Step3Config.tiny()
U_F32 = 2.0**-24
MAX_CONTRACTION = max(
    CFG.hidden_size,
    CFG.share_q_dim,
    CFG.num_heads * CFG.head_dim,
    CFG.intermediate_size,
    CFG.moe_intermediate_size,
)
DEPTH = 7 * CFG.num_layers + 1
TOL = U_F32 * np.sqrt(MAX_CONTRACTION) * DEPTH  # ~2.8e-5
POLICIES = {"dense": s3.KernelPolicy.reference(), "default": s3.KernelPolicy()}
SEED = 1234


def build_model(policy: str, seed: int = SEED) -> s3.Step3Model:
    """The tiny model in float32 with seeded random weights (norm scales included)."""
    abstract = nnx.eval_shape(
        lambda: s3.Step3Model(
            CFG,
            rngs=nnx.Rngs(0),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            policy=POLICIES[policy],
        )
    )
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, ref.random_params(state, seed)))


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def forward(model, tokens) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens)), np.float64)


def normwise_error(x: np.ndarray, ref_x: np.ndarray) -> float:
    return float(np.max(np.abs(x - ref_x)) / np.max(np.abs(ref_x)))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(SEED + 1).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def dense_model() -> s3.Step3Model:
    return build_model("dense")


@pytest.fixture(scope="module")
def ref_weights(dense_model) -> dict[str, np.ndarray]:
    return ref.weights_from_nnx_state(nnx.state(dense_model), CFG)


@pytest.fixture(scope="module")
def ref_logits(ref_weights, tokens) -> np.ndarray:
    return ref.forward(ref_weights, tokens, CFG)


def test_reference_consumes_every_parameter(dense_model, ref_weights):
    n_model = sum(x.size for x in jax.tree.leaves(nnx.state(dense_model)))
    assert sum(w.size for w in ref_weights.values()) == n_model == CFG.param_count()
    assert ref_weights["model.layers.0.self_attn.wq.weight"].shape == (
        CFG.num_heads * CFG.head_dim,
        CFG.share_q_dim,
    )
    assert ref_weights["model.layers.0.self_attn.o_proj.weight"].shape == (
        CFG.hidden_size,
        CFG.num_heads * CFG.head_dim,
    )


def test_routing_is_well_posed(ref_weights, tokens):
    """The top-k choice must not hinge on a near-tie that float32 could flip."""
    for i, h2 in ref.post_attention_inputs(ref_weights, tokens, CFG).items():
        router = ref_weights[f"model.layers.{i}.moe.gate.weight"]
        assert ref.routing_margin(h2, router, CFG.top_k) > 10 * TOL, f"layer {i}"


@pytest.mark.parametrize("policy", list(POLICIES))
def test_forward_matches_reference(policy, ref_weights, ref_logits, tokens):
    model = build_model(policy)
    logits = forward(model, tokens)
    assert logits.shape == (*tokens.shape, CFG.vocab_size)
    err = normwise_error(logits, ref_logits)
    assert err < TOL, f"{policy}: normwise error {err:.2e} >= tol {TOL:.2e}"


def test_cached_prefill_matches_reference(dense_model, ref_logits, tokens):
    """The cache-writing path (positions given, KV read back from the cache) too."""
    cache = s3.KVCache.for_config(CFG, tokens.shape[0], 16, dtype=jnp.float32)
    logits, cache = nnx.jit(lambda m, t, c: m(t, cache=c))(dense_model, jnp.asarray(tokens), cache)
    assert normwise_error(np.asarray(logits, np.float64), ref_logits) < TOL
    np.testing.assert_array_equal(np.asarray(cache.lengths), [tokens.shape[1]] * tokens.shape[0])


def test_decoder_layer_halves_match_reference(dense_model, ref_weights, tokens):
    """attention_half + ffn_half of each layer, fed the reference's own residual stream."""
    states = ref.hidden_states(ref_weights, tokens, CFG)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    # One layer's critical path: 7 matmuls (see the module docstring).
    layer_tol = U_F32 * np.sqrt(MAX_CONTRACTION) * 7

    @nnx.jit
    def run(layer, x):
        x_mid, h2, routing, _ = layer.attention_half(x, positions)
        return x_mid + layer.ffn_half(h2, routing)

    for i, layer in enumerate(dense_model.layers):
        out = np.asarray(run(layer, jnp.asarray(states[i], jnp.float32)), np.float64)
        # Compare the layer's update (out - x), not the residual sum that hides it.
        err = normwise_error(out - states[i], states[i + 1] - states[i])
        assert err < layer_tol, f"layer {i}: {err:.2e} >= {layer_tol:.2e}"


def test_tolerance_is_sensitive(ref_weights, ref_logits, tokens):
    """A 1% change of one layer's inter_norm scale must exceed TOL (the test can fail)."""
    bumped = dict(ref_weights)
    key = "model.layers.1.self_attn.inter_norm.weight"
    bumped[key] = ref_weights[key] * 1.01
    assert normwise_error(ref.forward(bumped, tokens, CFG), ref_logits) > 10 * TOL


def test_router_not_renormalized_in_reference(ref_weights, tokens):
    """Pins the reference itself: top-k weights sum to < 1 (no renormalization)."""
    h2 = ref.post_attention_inputs(ref_weights, tokens, CFG)[CFG.moe_layer_ids[0]]
    router = ref_weights[f"model.layers.{CFG.moe_layer_ids[0]}.moe.gate.weight"]
    w, ids = ref.route(h2.reshape(-1, CFG.hidden_size), router, CFG.top_k)
    assert np.all(w.sum(-1) < 1.0 - 1e-3)
    assert np.all(np.diff(w, axis=-1) <= 0) and ids.shape == (tokens.size, CFG.top_k)
