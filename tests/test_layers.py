"""Layer tests: RMSNorm, RoPE, MFA attention, router, MoE (dense vs grouped), shared expert.

Each layer is checked against the float64 NumPy reference (tests/reference_numpy.py) and on the
properties that define it. Tolerances: float32 unit roundoff u = 2^-24 times a growth factor,
written next to each check; inputs are seeded random data, never zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from flax import nnx
from jaxtyping import TypeCheckError, jaxtyped

from step3_jax.layers import (
    MFAttention,
    MoE,
    RMSNorm,
    SwiGLU,
    apply_rope,
    experts_dense,
    mfa_attention_xla,
    rms_norm,
    route,
    swiglu,
)
from step3_jax.policy import KernelPolicy

U = 2.0**-24  # float32 unit roundoff
U_BF16 = 2.0**-8
F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(seed: int, *shape, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(scale * _rng(seed).standard_normal(shape), jnp.float32)


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


def _random_module(make, seed: int) -> nnx.Module:
    """``make()``'s module with every parameter (norm scales included) seeded random.

    Built abstractly (`nnx.eval_shape`): eager initialization would compile one small XLA
    program per parameter shape, seconds that the random values then overwrite anyway.
    """
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, ref.random_params(state, seed)))


# ----------------------------------------------------------------------------- RMSNorm
def test_rms_norm_matches_reference():
    x, w = _normal(0, 3, 5, 64, scale=3.0), _normal(1, 64)
    # mean of 64 squares (~sqrt(64) u), rsqrt and two products: 16 u is generous.
    assert _rel(rms_norm(x, w, 1e-5), ref.rmsnorm(np.float64(x), np.float64(w), 1e-5)) < 16 * U


def test_rms_norm_casts_before_the_weight_multiply():
    """bf16 input: normalize in float32, cast to bf16, THEN multiply by the weight (HF order)."""
    x = _normal(2, 4, 128, scale=5.0).astype(jnp.bfloat16)
    w = (1.0 + 0.3 * _normal(3, 128)).astype(jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(
        jnp.bfloat16
    )
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(normed * w, np.float32))


def test_rms_norm_module_scale_invariance_and_init():
    norm = RMSNorm(32, eps=1e-6)
    np.testing.assert_array_equal(np.asarray(norm.weight[...]), np.ones(32))
    x = _normal(4, 2, 32)
    # x and 7x normalize to the same vector (up to eps / mean(x^2) ~ 1e-6 and a few u).
    np.testing.assert_allclose(norm(7.0 * x), norm(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(norm(x)) ** 2, -1)), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- RoPE
THETA = 500000.0


def test_rope_matches_reference_neox_layout():
    x = _normal(5, 2, 6, 3, 32)
    pos = jnp.asarray(_rng(6).integers(0, 1000, (2, 6)), jnp.int32)
    # Angles pos * freq are rounded in float32: |error| <= pos * u (~6e-5 rad at pos 1000),
    # which moves each rotated value by up to that times |x|; plus a few u for cos/sin/products.
    tol = 1000 * U * 2 + 8 * U
    out = apply_rope(x, pos, THETA)
    assert _rel(out, ref.rope_neox(np.float64(x), np.asarray(pos), THETA)) < tol
    # NOT the interleaved (GPT-J) layout: pairs are (i, i + H/2).
    gptj = np.asarray(x).reshape(2, 6, 3, 16, 2)
    assert not np.allclose(
        np.asarray(out),
        ref.rope_neox(gptj.swapaxes(-1, -2).reshape(x.shape), np.asarray(pos), THETA),
        atol=1e-3,
    )


def test_rope_position_zero_is_identity_and_norm_is_preserved():
    x = _normal(7, 1, 4, 2, 64)
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros((1, 4), jnp.int32), THETA), x)
    pos = jnp.asarray([[1, 100, 5000, 65535]], jnp.int32)
    out = apply_rope(x, pos, THETA)
    # A rotation preserves each pair's norm up to cos^2 + sin^2 = 1 in float32 (a few u).
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out), axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-6
    )


def test_rope_scores_depend_only_on_relative_position():
    """q(m) . k(n) == q(m + s) . k(n + s): the property RoPE exists for."""
    q, k = _normal(8, 1, 1, 64), _normal(9, 1, 1, 64)

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]], jnp.int32), THETA)
        kn = apply_rope(k, jnp.array([[n]], jnp.int32), THETA)
        return float(jnp.sum(qm * kn))

    base = score(3, 10)
    # Angles up to ~1100 rad in float32 lose ~1100 * u absolute; |q||k| ~ 64 -> ~5e-3 worst case.
    for shift in (1, 17, 1000):
        assert abs(score(3 + shift, 10 + shift) - base) < 64 * 1100 * U * 4
    assert abs(score(3, 11) - base) > 1e-3  # and it does depend on the distance


# ----------------------------------------------------------------------------- MFA
@pytest.fixture(scope="module")
def attn() -> MFAttention:
    return _random_module(
        lambda: MFAttention(64, 32, 4, 16, rope_theta=THETA, rngs=nnx.Rngs(0), **F32), 10
    )


def _attn_weights(attn: MFAttention) -> dict[str, np.ndarray]:
    n_h = attn.num_heads * attn.head_dim
    d = attn.q_proj.shape[1]
    return {
        "q_proj.weight": np.float64(attn.q_proj[...]),
        "k_proj.weight": np.float64(attn.k_proj[...]),
        "v_proj.weight": np.float64(attn.v_proj[...]),
        "inter_norm.weight": np.float64(attn.inter_norm.weight[...]),
        "wq.weight": np.float64(attn.wq[...]).reshape(n_h, -1),
        "o_proj.weight": np.float64(attn.o_proj[...]).reshape(d, n_h),
    }


def test_mfa_shapes_are_single_kv_head(attn):
    assert attn.k_proj.shape == (16, 64) and attn.v_proj.shape == (16, 64)
    assert attn.wq.shape == (4, 16, 32) and attn.o_proj.shape == (64, 4, 16)
    assert attn.q_proj.shape == (32, 64) and attn.inter_norm.weight.shape == (32,)


_call = nnx.jit(lambda module, x: module(x))  # one compile per shape instead of eager ops


def test_mfa_matches_reference(attn):
    x = _normal(11, 2, 10, 64)
    cfg = ref.RefConfig(1, 4, 16, (), 1, 1e-5, THETA)
    pos = np.broadcast_to(np.arange(10), (2, 10))
    expect = ref.mfa(np.float64(x), _attn_weights(attn), "", cfg, pos)
    # Chain of 5 matmuls (q_proj, wq, QK, PV, o_proj), K <= 64: 5 * sqrt(64) u, x4 margin.
    assert _rel(_call(attn, x), expect) < 4 * 5 * 8 * U


def test_mfa_prefill_is_causal(attn):
    x = _normal(12, 2, 10, 64)
    y = x.at[:, 6].set(_normal(13, 2, 64))  # change token 6 only
    out_x, out_y = np.asarray(_call(attn, x)), np.asarray(_call(attn, y))
    np.testing.assert_array_equal(out_x[:, :6], out_y[:, :6])  # earlier tokens: bit-identical
    assert np.all(np.abs(out_x[:, 6:] - out_y[:, 6:]).max(-1) > 1e-3)  # later ones see it


def test_mfa_attention_ignores_nan_past_kv_lengths():
    """Cache slots at or past a sequence's length may hold garbage (NaN) and must not leak."""
    q, k, v = _normal(14, 2, 1, 4, 16), _normal(15, 2, 8, 16), _normal(16, 2, 8, 16)
    lengths = jnp.array([3, 8], jnp.int32)
    pos = (lengths - 1)[:, None]
    k_bad = k.at[0, 3:].set(jnp.nan)
    v_bad = v.at[0, 3:].set(jnp.nan)
    attend = jax.jit(mfa_attention_xla)
    out = attend(q, k_bad, v_bad, pos, kv_lengths=lengths)
    assert np.all(np.isfinite(np.asarray(out)))
    clean = attend(q, k, v, pos, kv_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(clean))
    # sequence 0 equals attention over its first 3 slots alone
    short = mfa_attention_xla(q[:1], k[:1, :3], v[:1, :3], pos[:1])
    np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(short), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 5])
def test_mfa_attention_bf16_with_batch(t):
    """bf16 attention with B >= 2 must run (XLA:CPU rejected a bf16 x bf16 -> f32 batched dot
    with a BTNH output layout) and match float32 on the same bf16-rounded inputs: the bf16
    probabilities and the bf16 output are 2 roundings of 2^-8 each."""
    q = _normal(17, 2, t, 4, 16).astype(jnp.bfloat16)
    k, v = (_normal(s, 2, 8, 16).astype(jnp.bfloat16) for s in (18, 19))
    pos = jnp.broadcast_to(jnp.arange(8 - t, 8, dtype=jnp.int32), (2, t))
    out = jax.jit(mfa_attention_xla)(q, k, v, pos)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert _rel(out.astype(jnp.float32), mfa_attention_xla(*f32, pos)) < 2 * U_BF16


# ----------------------------------------------------------------------------- router / MoE
E, K_TOP, D, F = 8, 2, 64, 48


@pytest.fixture(scope="module")
def moe() -> MoE:
    return _random_module(lambda: MoE(D, E, K_TOP, F, 40, rngs=nnx.Rngs(1), **F32), 20)


def test_router_is_top_k_of_float32_softmax_not_renormalized(moe):
    h = _normal(21, 3, 5, D)
    weights, ids = route(h, moe.router[...], K_TOP)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
    assert weights.shape == ids.shape == (3, 5, K_TOP)
    ref_w, ref_ids = ref.route(np.float64(h).reshape(-1, D), np.float64(moe.router[...]), K_TOP)
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1, K_TOP), ref_ids)
    np.testing.assert_allclose(np.asarray(weights).reshape(-1, K_TOP), ref_w, rtol=1e-5)
    sums = np.asarray(weights).sum(-1)
    assert np.all(sums < 1 - 1e-3)  # top-2 of 8: never renormalized to 1


def test_router_is_float32_for_bf16_inputs(moe):
    h = _normal(22, 4, D).astype(jnp.bfloat16)
    weights, _ = route(h, moe.router[...].astype(jnp.bfloat16), K_TOP)
    assert weights.dtype == jnp.float32
    # float32 softmax: weights are not bf16-quantized (bf16 has 8 significant bits)
    as_bf16 = np.asarray(weights.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(np.asarray(weights), as_bf16)


def _moe_reference(moe: MoE, h: np.ndarray) -> np.ndarray:
    w = {
        "model.layers.0.moe.gate.weight": np.float64(moe.router[...]),
        "model.layers.0.moe.gate_proj.weight": np.float64(moe.gate_proj[...]),
        "model.layers.0.moe.up_proj.weight": np.float64(moe.up_proj[...]),
        "model.layers.0.moe.down_proj.weight": np.float64(moe.down_proj[...]),
    }
    for name in ("gate_proj", "up_proj", "down_proj"):
        w[f"model.layers.0.share_expert.{name}.weight"] = np.float64(
            getattr(moe.shared_expert, name)[...]
        )
    return ref.moe(np.float64(h), w, 0, K_TOP)


def test_moe_dense_matches_reference_with_shared_expert(moe):
    h = _normal(23, 2, 7, D)
    out = moe(h, implementation="dense")
    # router (K=64) then gate/up (K=64) and down (K=48) per expert: 3 * sqrt(64) u, x4 margin.
    assert _rel(out, _moe_reference(moe, np.asarray(h))) < 4 * 3 * 8 * U
    # The shared expert is really added: removing it changes the output by O(1).
    shared = np.asarray(moe.shared_expert(h))
    assert np.abs(shared).max() > 0.1 * np.abs(np.asarray(out)).max()
    routed = experts_dense(
        h.reshape(-1, D),
        *route(h.reshape(-1, D), moe.router[...], K_TOP),
        moe.gate_proj[...],
        moe.up_proj[...],
        moe.down_proj[...],
    )
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(routed).reshape(h.shape) + shared, rtol=1e-5, atol=1e-6
    )


def test_moe_external_routing_equals_internal(moe):
    h = _normal(24, 3, 4, D)
    np.testing.assert_array_equal(np.asarray(moe(h, routing=moe.route(h))), np.asarray(moe(h)))
    # A different routing changes the result (the argument is really used).
    w, ids = moe.route(h)
    assert _rel(moe(h, routing=(w, (ids + 1) % E)), moe(h)) > 1e-2


def _grouped_available() -> bool:
    try:
        from step3_jax.kernels.grouped_gemm import moe_ffn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _grouped_available(), reason="step3_jax.kernels.grouped_gemm.moe_ffn missing"
)
def test_moe_dense_and_grouped_agree(moe):
    """Same float32 weights, both paths. The grouped path keeps the module's float32 (it used to
    return bf16): the two differ only in summation order, a few float32 roundings per
    contraction of length <= max(D, F): tolerance 8 * 2^-24 * sqrt(max(D, F))."""
    h = _normal(25, 2, 16, D)
    dense = moe(h, implementation="dense")
    grouped = moe(h, implementation="xla")  # the sorted grouped path
    assert grouped.shape == dense.shape
    assert grouped.dtype == dense.dtype == jnp.float32
    assert _rel(grouped, dense) < 8 * 2.0**-24 * np.sqrt(max(D, F))
    # and it is not trivially equal to the shared expert alone
    assert _rel(moe.shared_expert(h), dense) > 1e-2


def test_moe_rejects_unknown_implementation(moe):
    with pytest.raises(ValueError, match="implementation"):
        moe(_normal(26, 1, D), implementation="sparse")
    with pytest.raises(ValueError, match="KernelPolicy.moe"):
        KernelPolicy(moe="fast")


def test_swiglu_matches_reference():
    mlp = _random_module(lambda: SwiGLU(D, 96, rngs=nnx.Rngs(2), **F32), 27)
    x = _normal(28, 5, D)
    expect = ref.swiglu(
        np.float64(x),
        *(np.float64(getattr(mlp, n)[...]) for n in ("gate_proj", "up_proj", "down_proj")),
    )
    assert _rel(mlp(x), expect) < 4 * 2 * np.sqrt(96) * U


# ----------------------------------------------------------------------------- jaxtyping
def _checked(fn):
    beartype = pytest.importorskip("beartype").beartype  # dev extra; absent on the GPU image
    return jaxtyped(typechecker=beartype)(fn)


def test_jaxtyping_shapes_are_checked():
    """The public annotations are real: consistent shapes pass, inconsistent ones raise."""
    q, k, pos = _normal(30, 2, 3, 4, 8), _normal(31, 2, 5, 8), jnp.zeros((2, 3), jnp.int32)
    assert _checked(mfa_attention_xla)(q, k, k, pos).shape == q.shape
    with pytest.raises(TypeCheckError):
        _checked(mfa_attention_xla)(q, _normal(32, 2, 5, 6), k, pos)  # H differs from q's
    with pytest.raises(TypeCheckError):
        _checked(mfa_attention_xla)(q, k, k, jnp.zeros((2, 4), jnp.int32))  # T differs
    router = _normal(33, E, D)
    assert _checked(route)(_normal(34, 3, D), router, 2)[0].shape == (3, 2)
    with pytest.raises(TypeCheckError):
        _checked(route)(_normal(35, 3, D + 1), router, 2)  # D differs from the router's
    with pytest.raises(TypeCheckError):
        _checked(apply_rope)(_normal(36, 2, 3, 8), jnp.zeros((2, 4), jnp.int32), THETA)
    with pytest.raises(TypeCheckError):
        _checked(rms_norm)(_normal(37, 3, 8), _normal(38, 9), 1e-5)
    with pytest.raises(TypeCheckError):
        _checked(swiglu)(jnp.zeros((2, 4), jnp.int32), router, router, router.T)  # not float


def test_decoder_layer_names_its_pieces_in_the_hlo():
    """Profiles tell the layer's kernels apart by jax name scope (`harness.op_scope`): every
    piece of a cached MoE layer shows up in the lowered program's op names."""
    import step3_jax as s3
    from step3_jax.cache import KVCache
    from step3_jax.model import DecoderLayer

    cfg = s3.Step3Config.tiny()
    moe_id = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    layer = DecoderLayer(cfg, moe_id, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    cache = KVCache.create(cfg.num_layers, 2, 16, cfg.head_dim, dtype=jnp.float32)
    x = jnp.ones((2, 1, cfg.hidden_size), jnp.float32)
    pos = jnp.zeros((2, 1), jnp.int32)

    def lowered(policy):
        def run(layer, x, cache):
            x_mid, h2, routing, cache = layer.attention_half(x, pos, cache, policy=policy)
            return x_mid + layer.ffn_half(h2, routing, policy), cache

        return nnx.jit(run).lower(layer, x, cache).as_text(debug_info=True)

    text = lowered(s3.KernelPolicy())
    scopes = ("input_norm", "qkv_proj", "inter_norm", "wq", "rope", "kv_write", "attend")
    scopes += ("o_proj", "post_norm", "router", "moe/routed_experts", "moe/shared_expert")
    missing = [s for s in scopes if f"/{s}/" not in text]
    assert not missing, f"name scopes missing from the lowered layer: {missing}"
    # As one more group of the routed launches (opt-in) the shared expert has no scope of
    # its own.
    assert "/moe/shared_expert/" not in lowered(s3.KernelPolicy(shared_expert="routed"))


def test_where_the_shared_expert_runs():
    """`KernelPolicy.shared_expert`: "routed" puts the shared expert in the routed launches
    where the shapes allow (F_s <= F) and raises where they do not; "own" and None (measured
    faster) keep it a SwiGLU of its own; the outputs agree either way."""
    from step3_jax.layers.moe import MoE, shared_in_routed_launch

    def moe(shared_dim):
        return MoE(64, 4, 2, 32, shared_dim, rngs=nnx.Rngs(3), dtype=jnp.float32,
                   param_dtype=jnp.float32)  # fmt: skip

    def fused(m, choice):
        experts = (m.gate_proj[...], m.up_proj[...], m.down_proj[...])
        return shared_in_routed_launch(m.shared_expert, experts, choice) is not None

    slice_, full, wide = moe(16), moe(32), moe(48)
    assert not any(fused(m, c) for m in (slice_, full, wide) for c in (None, "own"))
    assert fused(slice_, "routed") and fused(full, "routed")
    with pytest.raises(ValueError, match="shared_expert='routed'"):
        fused(wide, "routed")  # F_s > F
    h = jax.random.normal(jax.random.key(4), (5, 64), jnp.float32)
    for m in (slice_, full):
        own, routed = (m(h, implementation="xla", shared=c) for c in ("own", "routed"))
        np.testing.assert_allclose(np.asarray(routed), np.asarray(own), rtol=1e-5, atol=1e-5)


def test_shared_expert_in_the_routed_launch_reads_expert_pools_too():
    """The AFD FFN device reads its routed experts in place (`ExpertPool`): the shared expert
    in the same launches must still be there (a bug once dropped it for pools)."""
    from step3_jax.layers.moe import ExpertPool, MoE, experts_grouped

    m = MoE(64, 4, 2, 32, 16, rngs=nnx.Rngs(5), dtype=jnp.float32, param_dtype=jnp.float32)
    h = jax.random.normal(jax.random.key(6), (7, 64), jnp.float32)
    weights, ids = m.route(h)
    experts = [m.gate_proj[...], m.up_proj[...], m.down_proj[...]]
    pad = lambda w: jnp.concatenate([jnp.zeros_like(w[:3]), w, jnp.zeros_like(w[:2])])
    pools = [ExpertPool(pad(w), jnp.asarray(3, jnp.int32), None, 4) for w in experts]
    sh = m.shared_expert
    shared = (sh.gate_proj[...], sh.up_proj[...], sh.down_proj[...])
    run = lambda ws, s: experts_grouped(h, weights, ids, *ws, 0, "xla", shared=s)
    fused_pool, fused_plain = run(pools, shared), run(experts, shared)
    np.testing.assert_array_equal(np.asarray(fused_pool), np.asarray(fused_plain))
    want = run(experts, None) + sh(h, implementation="xla")
    np.testing.assert_allclose(np.asarray(fused_pool), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_float_linear_writes_its_own_dtype():
    """`project` with a 16-bit activation and output asks the dot for that type (what the GEMM
    writes; the products still accumulate in float32), not float32 and a convert pass after
    it (docs/LOG.md, "The MLP: bf16 GEMM outputs"); a float32 output (the router, the
    lm_head) or float32 activations keep float32. The bf16 result equals float32
    accumulation rounded once, to one bf16 ulp."""
    from step3_jax.layers.linear import project

    kx, kw = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (16, 512), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (96, 512), jnp.float32).astype(jnp.bfloat16)

    def dot_types(out_dtype, x=x):
        jaxpr = jax.make_jaxpr(lambda x, w: project(x, w, "...k,nk->...n", out_dtype))(x, w)
        return [e.params["preferred_element_type"] for e in jaxpr.eqns if "dot" in str(e.primitive)]

    assert dot_types(jnp.bfloat16) == [jnp.bfloat16]
    assert dot_types(jnp.float32) == [jnp.float32]
    assert dot_types(jnp.float32, x.astype(jnp.float32)) == [jnp.float32]
    got = np.asarray(project(x, w, "...k,nk->...n").astype(jnp.float32))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    # float32 accumulation (K * 2^-24 relative of sum |x||w|), then one bf16 rounding (2^-8)
    spread = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)).T
    assert np.all(np.abs(got - exact) <= 2.0**-8 * np.abs(exact) + 512 * 2.0**-24 * spread)


# ---------------------------------------------------------------- input validation
@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda r: MoE(32, 4, 8, 16, 0, rngs=r),
            r"MoE: top_k must be in \[1, num_experts=4\], got 8",
        ),
        (
            lambda r: MoE(32, 4, 0, 16, 0, rngs=r),
            r"MoE: top_k must be in \[1, num_experts=4\], got 0",
        ),
        (lambda r: MoE(32, 4, 2, 0, 0, rngs=r), "MoE: expert_dim must be an integer >= 1, got 0"),
        (lambda r: MoE(32, 4, 2, 16, -1, rngs=r), "MoE: shared_dim must be an integer >= 0"),
        (lambda r: MoE(32.0, 4, 2, 16, 0, rngs=r), "MoE: hidden_size must be an integer"),
        (lambda r: MFAttention(32, 32, 2, 15, rngs=r), "MFAttention: head_dim must be even"),
        (
            lambda r: MFAttention(32, 32, 0, 16, rngs=r),
            "MFAttention: num_heads must be an integer >= 1",
        ),
        (
            lambda r: MFAttention(32, True, 2, 16, rngs=r),
            "MFAttention: share_q_dim must be an integer",
        ),
    ],
    ids=["topk>E", "topk0", "F0", "shared<0", "float-D", "odd-H", "N0", "bool-R"],
)
def test_layers_reject_bad_sizes(make, match):
    """These used to construct and then fail inside jax at the first call (top_k in jax's
    top_k, top_k=0 as a modulo by zero, an odd head_dim as a RoPE broadcast error)."""
    with pytest.raises(ValueError, match=match):
        make(nnx.Rngs(0))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda a, m: m(_normal(40, 2, 3, 16)),
            r"MoE: h must be \[\.\.\., hidden_size=32\], got \(2, 3, 16\)",
        ),
        (
            lambda a, m: m(_normal(41, 2, 3, 32), routing=m.route(_normal(41, 2, 3, 32))[:1]),
            "MoE: routing must be",
        ),
        (
            lambda a, m: m(_normal(42, 6, 32), routing=m.route(_normal(42, 2, 32))),
            "MoE: routing must be.*one row per token",
        ),
        (lambda a, m: m.route(_normal(43, 3, 16)), "MoE: h must be"),
        (
            lambda a, m: a(_normal(44, 3, 32)),
            r"MFAttention: x must be \[B, T, hidden_size=32\], got \(3, 32\)",
        ),
        (lambda a, m: a(_normal(45, 2, 3, 16)), "MFAttention: x must be"),
        (
            lambda a, m: a(_normal(46, 2, 3, 32), positions=jnp.arange(5)),
            r"MFAttention: positions must be \[B, T\] = \(2, 3\).*got \(5,\)",
        ),
        (
            lambda a, m: a(_normal(47, 2, 3, 32), positions=jnp.zeros((2, 4), jnp.int32)),
            "MFAttention: positions must be",
        ),
    ],
    ids=[
        "moe-D",
        "moe-routing-pair",
        "moe-routing-rows",
        "route-D",
        "mfa-rank2",
        "mfa-D",
        "mfa-pos-rank",
        "mfa-pos-T",
    ],
)
def test_layers_reject_bad_input_shapes(call, match):
    """Static shape checks at the top of the calls (they hold under jit too, where shapes are
    static); these used to fail in opt_einsum, a tuple unpack or a reshape."""
    attn = MFAttention(32, 32, 2, 16, rngs=nnx.Rngs(0), **F32)
    moe = MoE(32, 4, 2, 16, 8, rngs=nnx.Rngs(1), **F32)
    with pytest.raises(ValueError, match=match):
        call(attn, moe)
    with pytest.raises(ValueError, match=match):
        nnx.jit(call)(attn, moe)


def test_mfa_accepts_positions_shared_by_the_batch():
    """[1, T] positions broadcast over the batch (the shape check must keep allowing it)."""
    attn = MFAttention(32, 32, 2, 16, rngs=nnx.Rngs(0), **F32)
    x = _normal(48, 2, 3, 32)
    shared = attn(x, positions=jnp.arange(3, dtype=jnp.int32)[None])
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(attn(x)))
