"""The stored fused q/k/v weight (`MFAttention.fuse_qkv`, ``quantize_model(fuse_qkv=...)``).

Why bitwise checks are the right ones here: fusing stores the SAME numbers (float rows, FP8
values and their scale rows) in one matrix. A fused projection computes each output column as
the same dot product of the same operands as the separate projection; on XLA:CPU those dots
are bit-identical (checked below for float32, bfloat16 and the XLA forms of the FP8 GEMM).
Against today's per-call concatenation of "pallas"-form weights the fused weight is the very
operand that concatenation builds, so even the kernel path must agree bitwise.

On a GPU, XLA/cuBLAS may pick another GEMM algorithm (split-K, tiles) for N = R + 2H than for
N = R or H, so the summation ORDER of the fused and separate projections can differ there:
comparisons across shapes (``exact=ON_CPU``) then check a 0.999 cosine per output instead (the
bound test_fp8_pallas_linear.py derives for an FP8 re-quantization flip of q), and greedy tokens
are compared on CPU only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from step3_jax import KernelPolicy, Step3Config, Step3Model
from step3_jax.layers.mfa import MFAttention
from step3_jax.quant_model import (
    Fp8Weight,
    concat_rows,
    fuse_qkv,
    quantize_model,
    split_rows,
)

# R and H multiples of 128: block-FP8 rows concatenate exactly. Small D keeps CPU time low.
D, R, N, H = 256, 256, 2, 128
SMALL = Step3Config(
    vocab_size=256,
    hidden_size=D,
    num_layers=2,
    num_heads=N,
    head_dim=H,
    share_q_dim=R,
    intermediate_size=256,
    moe_layer_ids=(1,),
    num_experts=4,
    top_k=2,
    moe_intermediate_size=128,
    share_expert_dim=128,
    max_position_embeddings=256,
)


def _attn(seed=0, dtype=jnp.float32, r=R, h=H) -> MFAttention:
    return MFAttention(D, r, N, h, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def _inputs(dtype, b=3, t=4):
    x = jax.random.normal(jax.random.key(11), (b, t, D), jnp.float32).astype(dtype)
    return x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


ON_CPU = jax.devices()[0].platform == "cpu"


def _assert_same(got, want, exact=True):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:  # see the module docstring
            assert np.sum(g * w) >= 0.999 * np.sqrt(np.sum(g * g) * np.sum(w * w))


def _assert_fp8_same(a: Fp8Weight, b: Fp8Weight):
    assert (a.granularity, a.shape) == (b.granularity, b.shape)
    assert np.asarray(a.values).tobytes() == np.asarray(b.values).tobytes()
    assert np.asarray(a.scales).tobytes() == np.asarray(b.scales).tobytes()


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_float_layer_equals_unfused_bitwise(dtype):
    plain, fused = _attn(1, dtype), _attn(1, dtype).fuse_qkv()
    assert fused.fused_qkv and not plain.fused_qkv
    assert not any(hasattr(fused, n) for n in ("q_proj", "k_proj", "v_proj"))
    assert fused.qkv_proj.shape == (R + 2 * H, D) and fused.qkv_proj.dtype == dtype
    _assert_same(fused.qkv_weights(), plain.qkv_weights())  # rows of q, then k, then v
    x, pos = _inputs(dtype)
    _assert_same(fused.qkv(x, pos), plain.qkv(x, pos), exact=ON_CPU)
    _assert_same(fused(x), plain(x), exact=ON_CPU)


@pytest.mark.parametrize(
    "granularity,impl",
    [("block", "xla"), ("block", "xla_fp8"), ("channel", "xla"), ("channel", None)],
)
def test_fused_fp8_layer_equals_unfused_bitwise(granularity, impl):
    """Quantized, then fused: the parts are the unfused weights and the XLA FP8 forms give the
    same bits (the activation is quantized per token over D either way)."""
    plain = quantize_model(_attn(2, jnp.bfloat16), "fp8", fuse_qkv=False, granularity=granularity)
    fused = quantize_model(_attn(2, jnp.bfloat16), "fp8", fuse_qkv=True, granularity=granularity)
    assert fused.fused_qkv and not plain.fused_qkv
    for got, want in zip(fused.qkv_weights(), plain.qkv_weights(), strict=True):
        _assert_fp8_same(got, want)
    x, pos = _inputs(jnp.bfloat16)
    _assert_same(fused.qkv(x, pos, impl), plain.qkv(x, pos, impl), exact=ON_CPU)


def test_quantize_model_fuses_by_default_where_exact():
    """``quantize_model`` stores q/k/v as ONE weight by default when the block rows
    concatenate exactly: the concatenation of the separately quantized weights, bit for bit,
    computing the same outputs."""
    separate = quantize_model(_attn(3, jnp.bfloat16), "fp8", fuse_qkv=False)
    fused = quantize_model(_attn(3, jnp.bfloat16), "fp8")  # default: fuse
    assert fused.fused_qkv and not separate.fused_qkv
    want = concat_rows((separate.q_proj[...], separate.k_proj[...], separate.v_proj[...]))
    _assert_fp8_same(fused.qkv_proj[...], want)
    x, pos = _inputs(jnp.bfloat16)
    _assert_same(fused.qkv(x, pos), separate.qkv(x, pos))


def test_fusing_a_float_model_then_quantizing_quantizes_each_part():
    """A fused float ``qkv_proj`` is quantized part by part: the same FP8 values and scales
    as quantizing the separate weights, then fusing."""
    want = quantize_model(_attn(4), "fp8").qkv_proj[...]
    got = quantize_model(_attn(4).fuse_qkv(), "fp8").qkv_proj[...]
    _assert_fp8_same(got, want)
    bf16 = quantize_model(_attn(4), "bf16", fuse_qkv=True)
    assert bf16.fused_qkv and not isinstance(bf16.qkv_proj[...], Fp8Weight)


def test_split_rows_inverts_concat_rows_for_ragged_last_block():
    """Block-FP8: every part but the last must be 128-row aligned; the last may be ragged."""
    key = jax.random.key(5)
    ws = [
        Fp8Weight.quantize(jax.random.normal(k, (n, 200), jnp.float32))
        for k, n in zip(jax.random.split(key, 3), (128, 256, 96), strict=True)
    ]
    fused = concat_rows(ws)
    assert fused.scales.shape == (1 + 2 + 1, 2)
    np.testing.assert_array_equal(
        np.asarray(fused.dequantize()), np.concatenate([np.asarray(w.dequantize()) for w in ws])
    )
    for got, want in zip(split_rows(fused, (128, 256, 96)), ws, strict=True):
        _assert_fp8_same(got, want)


# ----------------------------------------------------------------------------- errors
def test_fusing_twice_is_a_clear_error():
    a = _attn().fuse_qkv()
    with pytest.raises(ValueError, match="already fused"):
        a.fuse_qkv()
    fuse_qkv(a)  # the model-level helper skips fused layers (idempotent)
    assert a.fused_qkv


def test_mismatched_weights_are_clear_errors():
    a = _attn()
    a.k_proj.set_value(jnp.ones((H, D + 1), jnp.float32))
    with pytest.raises(ValueError, match=r"k_proj has shape \(128, 257\).*K=256"):
        a.fuse_qkv()
    a = _attn()
    a.v_proj.set_value(jnp.ones((H // 2, D), jnp.float32))
    with pytest.raises(ValueError, match=r"v_proj must be \[128, D\]"):
        a.fuse_qkv()
    a = _attn()
    a.k_proj.set_value(Fp8Weight.quantize(a.k_proj[...]))
    with pytest.raises(ValueError, match="mix Fp8Weight and plain arrays"):
        a.fuse_qkv()
    with pytest.raises(ValueError, match="cannot be cut into rows"):
        split_rows(jnp.ones((10, 4)), (4, 4))
    with pytest.raises(ValueError, match=r"row sizes: sizes\[1\] must be an integer >= 1, got -4"):
        split_rows(jnp.ones((10, 4)), (14, -4))  # sums to 10: was a 10-row part and nothing
    with pytest.raises(ValueError, match="no MFAttention"):
        fuse_qkv(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))


def test_block_fp8_with_unaligned_rows_fuses_only_when_asked():
    """R = 64: q_proj's only scale block would also cover k_proj rows, so block-FP8 rows do
    not concatenate exactly. Default: left unfused (as before); fuse_qkv=True: an error."""
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quantize_model(_attn(r=64), "fp8", fuse_qkv=True)
    assert not quantize_model(_attn(r=64), "fp8").fused_qkv
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quantize_model(_attn(r=64).fuse_qkv(), "fp8")
    # Per-channel scales concatenate for any row counts.
    assert quantize_model(_attn(r=64), "fp8", granularity="channel").fused_qkv


# ----------------------------------------------------------------------------- whole model
def _model(seed=0, cfg=SMALL, dtype=jnp.float32) -> Step3Model:
    return Step3Model(
        cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype, policy=KernelPolicy.reference()
    )


def test_demo_model_fused_fp8_decode_equals_unfused():
    """The shipped demo model (R = 64: per-channel FP8 is the exact fusable form) decodes the
    same greedy tokens fused and unfused (logits bitwise: test_fused_model_forward_...)."""
    from step3_jax.checkpoints.demo import load_demo
    from step3_jax.decode import generate

    plain, tok = load_demo()
    fused, _ = load_demo()
    kw = dict(granularity="channel")
    quantize_model(plain, "fp8", fuse_qkv=False, **kw)
    quantize_model(fused, "fp8", **kw)
    assert all(layer.self_attn.fused_qkv for layer in fused.layers)
    assert not any(layer.self_attn.fused_qkv for layer in plain.layers)
    prompts = [tok.encode("It is a truth universally acknowledged"), tok.encode("Emma")]
    if ON_CPU:
        assert generate(fused, prompts, 12).tokens == generate(plain, prompts, 12).tokens
    else:  # see the module docstring
        fwd, tokens = nnx.jit(lambda m, t: m(t)), jnp.asarray([prompts[0]], jnp.int32)
        _assert_same(fwd(fused, tokens), fwd(plain, tokens), exact=False)


def test_hf_round_trip_of_a_fused_model(tmp_path):
    """Save fused -> the unfused model's tensors, bitwise (float and block-FP8); load with
    ``fuse_qkv=True`` -> a fused model equal to the original."""
    from step3_jax.checkpoints import load_hf, save_hf
    from step3_jax.checkpoints.safetensors_io import index_checkpoint, read_tensor

    def tensors(path):  # our reader: the safetensors package's numpy one has no float8
        return {n: read_tensor(i) for n, i in index_checkpoint(path).items()}

    for name, prep, fp8 in (
        ("f32", lambda m: m, "dequantize"),
        ("fp8", lambda m: quantize_model(m, "fp8", fuse_qkv=False), "keep"),
    ):
        plain = prep(_model(5))
        save_hf(plain, tmp_path / f"{name}_plain")
        fused = fuse_qkv(prep(_model(5)))
        save_hf(fused, tmp_path / f"{name}_fused")
        a, b = tensors(tmp_path / f"{name}_plain"), tensors(tmp_path / f"{name}_fused")
        assert a.keys() == b.keys() and "model.layers.0.self_attn.k_proj.weight" in a
        assert ("model.layers.0.self_attn.k_proj.weight_scale_inv" in a) == (name == "fp8")
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (name, k)
        dt = jnp.float32
        back = load_hf(tmp_path / f"{name}_fused", dtype=dt, param_dtype=dt, fp8=fp8, fuse_qkv=True)
        assert all(layer.self_attn.fused_qkv for layer in back.layers)
        _assert_same(nnx.state(back, nnx.Param), nnx.state(fused, nnx.Param))


def test_orbax_round_trip_of_a_fused_model(tmp_path):
    """Orbax saves the fused leaf as is; the restore target is built the same way (fused).
    An unfused target does not match: a clear CheckpointFormatError."""
    from step3_jax.checkpoints import CheckpointFormatError, restore_orbax, save_orbax

    for name, build in (
        ("f32", lambda: fuse_qkv(_model(6))),
        ("fp8", lambda: quantize_model(_model(6, dtype=jnp.bfloat16), "fp8")),
    ):
        model = build()
        save_orbax(tmp_path / name, 1, model)
        restored = restore_orbax(tmp_path / name, nnx.eval_shape(build))
        assert all(layer.self_attn.fused_qkv for layer in restored.layers)
        _assert_same(nnx.state(restored, nnx.Param), nnx.state(model, nnx.Param))
    with pytest.raises(CheckpointFormatError):
        restore_orbax(tmp_path / "f32", nnx.eval_shape(lambda: _model(6)))


def test_afd_attention_values_of_a_fused_model_are_the_unfused_ones():
    """The executors place ``layer_state.attention_values``: a fused model gives the same
    separate q_proj/k_proj/v_proj, so AFD runs from either."""
    from step3_jax.sharding import layer_state

    plain, fused = _model(7), fuse_qkv(_model(7))
    for a, b in zip(plain.layers, fused.layers, strict=True):
        want = layer_state.attention_values(a, plain.config)
        got = layer_state.attention_values(b, fused.config)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


def test_fused_model_forward_and_cached_decode_equal_unfused():
    cfg = dataclasses.replace(SMALL, num_layers=1, moe_layer_ids=())
    plain, fused = _model(8, cfg), fuse_qkv(_model(8, cfg))
    tokens = jax.random.randint(jax.random.key(9), (2, 5), 0, cfg.vocab_size, jnp.int32)
    _assert_same(fused(tokens), plain(tokens), exact=ON_CPU)  # see the module docstring
    if not ON_CPU:  # greedy tokens may flip on a near-tie when the summation order differs
        return
    from step3_jax.decode import generate

    assert (
        generate(fused, [[1, 2, 3], [4, 5]], 4).tokens
        == generate(plain, [[1, 2, 3], [4, 5]], 4).tokens
    )
