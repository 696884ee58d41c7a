"""The tower's token padding (`pad_tokens`): padded keys masked in every attention path, the
real tokens' outputs unchanged, padded rows finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from vision_fixtures import embed, load_tiny, random_pixels, random_vision_tensors

from step3_jax.vision import layers
from step3_jax.vision.config import NUM_PREFIX_TOKENS, Step3VisionConfig
from step3_jax.vision.layers import attention, pad_tokens

CFG = Step3VisionConfig.tiny()
EPS32 = float(np.finfo(np.float32).eps)
# Padded vs unpadded, float32, same weights: each real row's math is the same, only XLA's
# blocking of the longer GEMMs/reductions may reorder sums: per op <= eps * sqrt(K) relative
# (K <= 64, the tiny MLP width), ~10 ops per layer (qkv, 2 attention contractions, softmax,
# out, 2 norms, fc1, fc2, residuals), 2 layers + 2 convs + projector: 30 eps * 8 ~ 3e-5. Any
# leak through a padded key is O(1) relative (the pad rows' values are unrelated).
PAD_RTOL = 30 * EPS32 * np.sqrt(CFG.intermediate_size)


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _qkv(seed: int, b=2, t=5, s=11, n=2, h=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
    # Keys/values past the real ones are large and unrelated: a leak shows at O(1).
    k = jax.random.normal(ks[1], (b, s, n, h), jnp.float32) * 3.0
    v = jax.random.normal(ks[2], (b, s, n, h), jnp.float32) * 10.0
    return q, k, v


@pytest.mark.parametrize("kv_len", [1, 7, 11])
def test_masked_attention_equals_attention_over_the_real_keys(kv_len):
    q, k, v = _qkv(0)
    got = attention(q, k, v, "xla", kv_len)
    ref = attention(q, k[:, :kv_len], v[:, :kv_len], "xla")
    # softmax over kv_len logits + one contraction of length kv_len, float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=8 * EPS32 * np.abs(v).max())
    if kv_len < k.shape[1]:  # the mask matters here: unmasked is far off
        assert _rel_err(attention(q, k, v, "xla"), ref) > 0.05


def test_cudnn_path_passes_a_mask_jax_honours(monkeypatch):
    """cuDNN runs only on a GPU: capture the arguments the "cudnn" path hands to
    `jax.nn.dot_product_attention` and run them through the same API's XLA implementation,
    which gives the masked result only if ``key_value_seq_lengths`` is right."""
    q, k, v = _qkv(1)
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        seen.append((implementation, kwargs.get("key_value_seq_lengths")))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", spy)
    got = attention(q, k, v, "cudnn", 7)
    assert seen[0][0] == "cudnn"
    np.testing.assert_array_equal(seen[0][1], [7, 7])
    ref = attention(q, k[:, :7], v[:, :7], "xla")
    np.testing.assert_allclose(got, ref, rtol=0, atol=8 * EPS32 * np.abs(v).max())
    attention(q, k, v, "cudnn", k.shape[1])  # kv_len == S: no mask at all
    assert seen[1][1] is None


@pytest.mark.parametrize("kv_len", [0, 12, -1])
def test_bad_kv_len_is_rejected(kv_len):
    q, k, v = _qkv(2)
    with pytest.raises(ValueError, match="kv_len"):
        attention(q, k, v, "xla", kv_len)


def test_pad_tokens():
    x = jax.random.normal(jax.random.key(3), (2, 13, 4))
    y, n = pad_tokens(x, 8)
    assert y.shape == (2, 16, 4) and n == 13
    np.testing.assert_array_equal(y[:, :13], x)
    np.testing.assert_array_equal(y[:, 13:], 0)
    same, n = pad_tokens(x[:, :8], 8)
    assert same.shape == (2, 8, 4) and n is None
    assert pad_tokens(x, 1)[1] is None
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="token multiple"):
            pad_tokens(x, bad)


# 728: 2708 tokens -> 2712; 504: 1300 -> 1304; 84: 40 (already a multiple of 8, no pad);
# 98: 53 -> 56 (and -> 64 with multiple 64).
@pytest.mark.parametrize(
    "size,multiple", [(728, 8), (504, 8), (84, 8), (98, 8), (98, 64)]
)  # fmt: skip
def test_padded_tower_equals_unpadded(size, multiple):
    model = load_tiny(CFG, random_vision_tensors(CFG, seed=11))
    pixels = random_pixels(2, size, seed=size)
    model.token_multiple = 1
    ref, unpadded = embed(model, pixels), nnx.graphdef(model)
    model.token_multiple = multiple
    got = embed(model, pixels)
    assert nnx.graphdef(model) != unpadded  # its own program: token_multiple is static
    assert got.shape == ref.shape == (2, CFG.tokens_per_view(size), CFG.text_hidden_size)
    assert _rel_err(got, ref) <= PAD_RTOL


@pytest.mark.parametrize("size,padded", [(98, 56), (84, 40)])
def test_tower_runs_its_layers_on_the_padded_length(size, padded):
    """The padding really happens (the layers' GEMMs see ``padded`` rows), and only then."""
    model = load_tiny(CFG, random_vision_tensors(CFG, seed=12))
    pixels = jnp.asarray(random_pixels(1, size, seed=0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).features(x))(state, pixels)
    assert f"1,{padded},{CFG.intermediate_size}" in str(jaxpr).replace(" ", "")  # fc1 output
    real = NUM_PREFIX_TOKENS + CFG.grid(size) ** 2
    assert (padded == real) == ("pad[" not in str(jaxpr))


def test_padded_rows_stay_finite():
    model = load_tiny(CFG, random_vision_tensors(CFG, seed=13))
    pixels = jnp.asarray(random_pixels(2, 98, seed=1))
    vm = model.vision_model
    x, kv_len = pad_tokens(vm.embeddings(pixels, jnp.float32), 64)
    assert kv_len == 53 and x.shape[1] == 64
    out = np.asarray(vm.encode(x, kv_len=kv_len))
    assert np.isfinite(out).all()
    # and the real rows are the unpadded tower's
    ref = np.asarray(vm.encode(x[:, :kv_len]))
    assert _rel_err(out[:, :kv_len], ref) <= PAD_RTOL


def test_padded_fp8_tower_equals_unpadded():
    """FP8 linears quantize activations per token: the zero rows padded in (amax 0) must not
    produce a NaN scale, and the real rows' quantization must not see the padded ones."""
    from step3_jax.vision.encoder import quantize_linears

    model = load_tiny(CFG, random_vision_tensors(CFG, seed=14))
    quantize_linears(model)
    pixels = random_pixels(1, 98, seed=3)  # 53 tokens -> 56
    model.token_multiple = 1
    ref = embed(model, pixels)
    model.token_multiple = 8
    got = embed(model, pixels)
    assert np.isfinite(got).all()
    # the same FP8 rounding of the same rows: only float32 reordering, as above
    assert _rel_err(got, ref) <= PAD_RTOL


def test_token_multiple_is_validated():
    from step3_jax.vision.encoder import Step3VisionModel

    for bad in (0, 8.0, True):
        with pytest.raises(ValueError, match="token_multiple"):
            nnx.eval_shape(lambda b=bad: Step3VisionModel(CFG, rngs=nnx.Rngs(0), token_multiple=b))


@pytest.mark.gpu
def test_cudnn_masked_attention_matches_xla_at_the_real_shape():
    """One 728 px view of the release (2708 tokens padded to 2712, 16 heads of 112), bf16:
    cuDNN's padding mask against the XLA path's explicit one and against the real keys alone."""
    b, s, n, h, kv_len = 1, 2712, 16, 112, 2708
    ks = jax.random.split(jax.random.key(21), 3)
    q = jax.random.normal(ks[0], (b, s, n, h), jnp.bfloat16)
    # padded keys/values large and unrelated: any leak is O(1)
    k = jax.random.normal(ks[1], (b, s, n, h), jnp.bfloat16).at[:, kv_len:].multiply(30)
    v = jax.random.normal(ks[2], (b, s, n, h), jnp.bfloat16).at[:, kv_len:].multiply(100)
    got = jax.jit(lambda q, k, v: attention(q, k, v, "cudnn", kv_len))(q, k, v)
    ref = jax.jit(lambda q, k, v: attention(q, k, v, "xla", kv_len))(q, k, v)
    alone = jax.jit(lambda q, k, v: attention(q, k, v, "xla"))(q, k[:, :kv_len], v[:, :kv_len])
    assert np.isfinite(np.asarray(got, np.float32)).all()  # padded query rows included
    # bf16 probabilities (2**-9 relative each) weighting |v| <= max|v| of the real rows, plus
    # the bf16 output rounding: a few 2**-8 * max|v|.
    atol = 4 * 2.0**-8 * float(jnp.abs(v[:, :kv_len]).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=atol)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(alone, np.float32), atol=atol
    )


@pytest.mark.gpu
def test_cudnn_padded_bf16_tower_tracks_float32():
    t = random_vision_tensors(CFG, seed=22)
    ref = load_tiny(CFG, t)
    ref.token_multiple = 1
    bf16 = load_tiny(CFG, t, dtype=jnp.bfloat16)
    bf16.attention_implementation = "cudnn"
    assert bf16.token_multiple == 8
    pixels = random_pixels(1, 504, seed=23)  # 1300 tokens -> 1304
    a, b = embed(ref, pixels), embed(bf16, pixels)
    # as test_vision_tower.test_bf16_tower_tracks_float32: bf16 keeps 8 bits, a few dozen
    # roundings deep
    cos = np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.999 and np.isfinite(b).all()
