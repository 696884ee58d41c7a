"""MFA decode attention: every implementation against the float32 oracle, on hostile data.

The same suite (class _Suite) runs for implementation="xla" on CPU in CI and for "pallas" on the
GPU machine (marked gpu). The Mosaic GPU lowering of every kernel variant is checked on CPU.

Tolerances (derived, not tuned):
* bf16 operands, f32 accumulation (xla path; pallas with a bf16 cache): P is rounded to bf16
  (relative 2^-9) before P.V and the output is rounded to bf16 (2^-9), so
  |out - ref| <= 2^-9 * max|v| + 2^-9 * |ref| per element; we allow 2x: atol = 2^-8 * max|v|,
  rtol = 2^-8. FP8 K/V values are exact in bf16/f16 and the oracle dequantizes the same bytes,
  so an FP8 cache adds nothing on the xla path.
* pallas with an FP8 cache additionally quantizes q to e4m3 per row (relative error per element
  <= 2^-4, std 2^-4/sqrt(3) = 0.036), so it is checked against the oracle fed the SAME
  dequantized q with the bound above (P' is f16, 2^-11; V is exact in f16) and lse within 2^-7
  (FP8 wgmma accumulation is ~2^-14 relative, not f32). Against the exact-q oracle each score
  moves by ~0.036 * |q||k| / sqrt(H) (0.054 at our k scale), i.e. a few % of the output norm:
  we require cosine >= 0.99 (1 - 0.054^2 / 2 = 0.9985 expected).
* pallas with a transposed V cache (``v_transposed``: P.V as an FP8 wgmma) also rounds
  P' = P * v_scale / c to e4m3 per row (c: the row's block max over 448). A normal e4m3 value
  is off by at most 2^-4 of itself, a subnormal one (P' < 2^-6) by at most 2^-10 absolute, so
  |out - ref| grows by at most 2^-4 * sum_s p_s |V_s| / l (the oracle run on |V|, per
  element) plus 2^-10 / 448 * max|V| per visible token (every block's c <= l's largest term).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.kernels.mfa_decode import TuningConfig, mfa_decode_attention, mfa_decode_reference
from step3_jax.kernels.mfa_decode.api import combine_splits, lower_pallas_for_gpu
from step3_jax.quant import dequantize_kv, quantize_activations, quantize_kv

N, H = 64, 256


def make_case(seed, lengths, s_cap, *, t=1, fp8=False, page_size=None, squeeze=False):
    """Random q/K/V (explicit seed), NaN in every cache slot at or beyond each length.

    Paged: the contiguous cache is cut into pages scattered over a shuffled pool that also
    holds NaN-only pages no sequence references.
    """
    rng = np.random.default_rng(seed)
    b = len(lengths)
    q = rng.standard_normal((b, t, N, H), np.float32)
    k = rng.standard_normal((b, s_cap, H), np.float32) * 1.5
    v = rng.standard_normal((b, s_cap, H), np.float32)
    lengths = np.asarray(lengths, np.int32)
    dead = np.arange(s_cap)[None, :] >= lengths[:, None]  # [B, S]
    kj, vj = jnp.asarray(k), jnp.asarray(v)
    if fp8:
        (kj, ks), (vj, vs) = quantize_kv(kj), quantize_kv(vj)
        ks = jnp.where(dead, jnp.nan, ks)
        vs = jnp.where(dead, jnp.nan, vs)
    else:
        kj, vj, ks, vs = kj.astype(jnp.bfloat16), vj.astype(jnp.bfloat16), None, None
    kj = jnp.where(dead[..., None], jnp.nan, kj.astype(jnp.float32)).astype(kj.dtype)
    vj = jnp.where(dead[..., None], jnp.nan, vj.astype(jnp.float32)).astype(vj.dtype)
    case = dict(
        q=jnp.asarray(q[:, 0] if squeeze else q, jnp.bfloat16),
        k=kj,
        v=vj,
        lengths=jnp.asarray(lengths),
        k_scale=ks,
        v_scale=vs,
    )
    if page_size is not None:
        case = _to_paged(case, page_size, rng)
    return case


def _to_paged(case, page_size, rng):
    k = case["k"]
    b, s_cap = k.shape[:2]
    per_seq = s_cap // page_size
    total = b * per_seq + 3  # 3 unreferenced NaN pages
    perm = rng.permutation(total)
    table = perm[: b * per_seq].reshape(b, per_seq).astype(np.int32)

    def scatter(x):
        if x is None:
            return None
        pages = x.reshape(b * per_seq, page_size, *x.shape[2:])
        pool = jnp.full((total, page_size, *x.shape[2:]), jnp.nan, jnp.float32).astype(x.dtype)
        return pool.at[jnp.asarray(table.reshape(-1))].set(pages)

    out = dict(case)
    for name in ("k", "v", "k_scale", "v_scale"):
        out[name] = scatter(case[name])
    out["block_table"] = jnp.asarray(table)
    return out


def transpose_v(case):
    """The case with V stored transposed: [B, H, S] (paged: [P, H, page])."""
    return {**case, "v": jnp.swapaxes(case["v"], 1, 2)}


def check(case, impl, fp8_pallas=False, v_transposed=False, **kw):
    """Runs ``impl`` on ``case`` (token-major V; transposed for the call if ``v_transposed``)
    against the float32 oracle with the tolerances of the module docstring."""
    call = transpose_v(case) if v_transposed else case
    out, lse = mfa_decode_attention(
        **call, return_lse=True, implementation=impl, v_transposed=v_transposed, **kw
    )
    sm = kw.get("sm_scale")
    ref_case = case
    if fp8_pallas:
        # The kernel runs QK as an FP8 wgmma on a per-row e4m3 q: compare against the oracle
        # fed that same quantized q (tight), and against the exact-q oracle by cosine (loose).
        exact = np.asarray(mfa_decode_reference(**case, sm_scale=sm), np.float32).ravel()
        got = np.asarray(out, np.float32).ravel()
        cos = got @ exact / max(np.linalg.norm(got) * np.linalg.norm(exact), 1e-30)
        assert cos >= 0.99, f"cosine to the exact-q oracle {cos:.5f} < 0.99"
        ref_case = {**case, "q": dequantize_kv(*quantize_kv(case["q"]))}
    ref, ref_lse = mfa_decode_reference(**ref_case, return_lse=True, sm_scale=sm)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert np.isfinite(out).all(), "NaN/inf leaked into the output"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    v = np.asarray(case["v"], np.float32)
    if case.get("v_scale") is not None:
        v = v * np.asarray(case["v_scale"])[..., None]
    vmax = np.nanmax(np.abs(v))
    atol = 2.0**-8 * vmax
    if fp8_pallas and v_transposed:  # + P rounded to e4m3 (module docstring)
        abs_case = {**ref_case, "v": jnp.abs(ref_case["v"].astype(jnp.float32))}
        abs_case["v"] = abs_case["v"].astype(case["v"].dtype)
        ref_abs = np.asarray(mfa_decode_reference(**abs_case, sm_scale=sm), np.float32)
        tokens = int(np.max(np.asarray(case["lengths"]), initial=0))
        bound = atol + 2.0**-4 * ref_abs + 2.0**-10 / 448 * tokens * vmax + 2.0**-8 * np.abs(ref)
        worst = float(np.max(np.abs(out - ref) / bound))  # (assert_allclose takes scalars only)
        assert worst <= 1.0, f"FP8 P.V error {worst:.3f} x its derived per-element bound"
    else:
        np.testing.assert_allclose(out, ref, atol=atol, rtol=2.0**-8)
    # FP8 wgmma accumulates with ~2^-14 relative precision (not f32): scores move by <~2^-9.
    lse_atol = 2.0**-7 if fp8_pallas else 1e-3
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=lse_atol, rtol=1e-4)
    return out


class _Suite:
    impl: str = "xla"
    long_len: int = 2048
    configs: dict[bool, TuningConfig] = {}  # per FP8-ness of the cache; empty: tuned default
    v_transposed: bool = False  # FP8 cases with V stored transposed (bf16 ones skipped)

    def run(self, case, **kw):
        fp8 = case["k"].dtype == jnp.float8_e4m3fn
        if self.configs and fp8 not in self.configs:
            pytest.skip("this cache dtype runs the tuned default in TestPallasGPU")
        if self.v_transposed and not fp8:
            pytest.skip("the transposed V layout is FP8-only")
        if fp8 in self.configs and "config" not in kw:
            kw["config"] = self.configs[fp8]
        fp8_pallas = fp8 and self.impl == "pallas"
        return check(case, self.impl, fp8_pallas=fp8_pallas, v_transposed=self.v_transposed, **kw)

    @pytest.mark.parametrize("fp8", [False, True])
    def test_ragged_with_zero_and_full(self, fp8):
        self.run(make_case(1, [0, 1, 77, 512, 300, 64], 512, fp8=fp8))

    @pytest.mark.parametrize("fp8", [False, True])
    def test_batch_one_squeezed(self, fp8):
        out = self.run(make_case(2, [200], 256, fp8=fp8, squeeze=True))
        assert out.shape == (1, N, H)

    @pytest.mark.parametrize("fp8", [False, True])
    @pytest.mark.parametrize("t", [2, 8])
    def test_multi_token_causal(self, fp8, t):
        # lengths[b] < T: the earliest queries see nothing (zeros, lse -inf).
        self.run(make_case(3 + t, [t, 3, 130, 256], 256, t=t, fp8=fp8))

    @pytest.mark.parametrize("fp8", [False, True])
    @pytest.mark.parametrize("page_size", [64, 128])
    def test_paged(self, fp8, page_size):
        self.run(make_case(4, [0, 129, 512, 383], 512, fp8=fp8, page_size=page_size))

    @pytest.mark.parametrize("fp8", [False, True])
    def test_long_context(self, fp8):
        n = self.long_len
        self.run(make_case(5, [n - 5, n // 3], n, fp8=fp8))

    @pytest.mark.parametrize("fp8", [False, True])
    def test_paged_pools_with_offsets(self, fp8):
        """K, V and scales at different page offsets of larger pools (the AFD arena's in-place
        read) give exactly the plain paged result: same pages, same kernel."""
        case = make_case(7, [0, 200, 512, 77], 512, fp8=fp8, page_size=128)
        want = self.run(case)
        names = ("k", "v", "k_scale", "v_scale")
        pad = {"k": 3, "v": 9, "k_scale": 5, "v_scale": 1}  # NaN pages in front of each
        pooled = dict(case)
        for n in names:
            if case[n] is not None:
                x = case[n]
                front = jnp.full((pad[n], *x.shape[1:]), jnp.nan, jnp.float32).astype(x.dtype)
                pooled[n] = jnp.concatenate([front, x, front])
        offsets = jnp.asarray([pad[n] for n in names], jnp.int32)
        kw = {"config": self.configs[fp8]} if fp8 in self.configs else {}
        if self.v_transposed:
            pooled, kw = transpose_v(pooled), {**kw, "v_transposed": True}
        got = mfa_decode_attention(**pooled, implementation=self.impl, page_offsets=offsets, **kw)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)

    def test_sm_scale_and_split_config(self):
        case = make_case(6, [1000, 17], 1024, fp8=True)
        # A transposed V cache runs only on the "seq" split (TuningConfig.for_transposed_v).
        config = TuningConfig(num_splits=3, wg_split="seq" if self.v_transposed else "head")
        self.run(case, sm_scale=0.1, config=config)


class TestXLA(_Suite):
    impl = "xla"


class TestXLATransposedV(_Suite):
    """V stored transposed (the FP8 P.V layout) on the XLA path and the oracle."""

    v_transposed = True


@pytest.mark.gpu
class TestPallasGPU(_Suite):
    impl = "pallas"
    long_len = 32768


@pytest.mark.gpu
class TestPallasGPUHeadSplit(TestPallasGPU):
    """Same suite with the compute warpgroups splitting head-dim halves (the FP8 default is
    "seq": alternate KV blocks) and the bf16 cache on the "seq" split."""

    configs = {  # noqa: RUF012 - read-only class table
        True: TuningConfig(wg_split="head", num_stages=4),
        False: TuningConfig(wg_split="seq", num_stages=2),
    }


@pytest.mark.gpu
class TestPallasGPUQInKernel(TestPallasGPU):
    """FP8 cache with q quantized inside the kernel (q_quant="kernel")."""

    configs = {True: TuningConfig(wg_split="seq", num_stages=4, q_quant="kernel")}  # noqa: RUF012


@pytest.mark.gpu
class TestPallasGPURingEpilogue(TestPallasGPU):
    """FP8 cache, q staged by TMA and the end-of-kernel exchange/output in freed ring slots."""

    configs = {  # noqa: RUF012
        True: TuningConfig(
            wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True, ring_epilogue=True
        )
    }


# The tuned FP8 default (H100 and H200 tables) spelled out, so the suite keeps covering this
# form if the tables change; TestPallasGPURingEpilogue covers the compute-converts form.
V_CONVERT_MEMORY = TuningConfig(
    wg_split="seq",
    num_stages=4,
    q_quant="kernel",
    q_tma=True,
    ring_epilogue=True,
    v_convert="memory",
)


@pytest.mark.gpu
class TestPallasGPUVConvertMemory(TestPallasGPU):
    """FP8 cache, tuned default with v_convert="memory" (wg 2 converts V to f16 buffers)."""

    configs = {True: V_CONVERT_MEMORY}  # noqa: RUF012


@pytest.mark.gpu
class TestPallasGPURagged(TestPallasGPU):
    """The ragged work list (pieces of each sequence's visible blocks, one CTA each, merged
    per sequence): the tuned FP8 form and the bf16 head split."""

    configs = {  # noqa: RUF012
        True: dataclasses.replace(V_CONVERT_MEMORY, ragged=True),
        False: TuningConfig(num_stages=2, ragged=True),
    }

    def test_many_pieces_per_sequence(self):
        # 40 sequences of 0..2048 tokens: pieces of ~1-6 blocks, up to 8 a sequence.
        rng = np.random.default_rng(12)
        case = make_case(12, rng.integers(0, 2049, 40).tolist(), 2048, t=2, fp8=True)
        cfg = dataclasses.replace(V_CONVERT_MEMORY, ragged=True, ragged_max_splits=8)
        check(case, "pallas", fp8_pallas=True, config=cfg)


@pytest.mark.gpu
class TestPallasGPUFp8PV(TestPallasGPU):
    """Transposed V cache: P.V as an FP8 wgmma on per-row e4m3 P (the tuned FP8 form, without
    the V conversion it no longer needs), and the ragged work list on top."""

    v_transposed = True

    def test_ragged_work_list(self):
        rng = np.random.default_rng(14)
        case = make_case(14, rng.integers(0, 2049, 40).tolist(), 2048, t=2, fp8=True)
        cfg = dataclasses.replace(V_CONVERT_MEMORY, ragged=True)
        check(case, "pallas", fp8_pallas=True, v_transposed=True, config=cfg)

    def test_block_s_128(self):
        case = make_case(15, [0, 129, 1024, 700], 1024, fp8=True, page_size=128)
        cfg = TuningConfig(wg_split="seq", num_stages=2, block_s=128, q_quant="kernel")
        check(case, "pallas", fp8_pallas=True, v_transposed=True, config=cfg)

    def test_long_chain_has_no_bias(self):
        """One CTA over 32K tokens (256 blocks a warpgroup): the FP8 P.V products must be
        summed in f32 (two-level accumulation), not in the FP8 MMA's ~13-bit D input, which
        would shrink the output by ~1%. Against the oracle on the same FP8 q, the regression
        slope of out on ref stays within 2^-8 of 1 (random P rounding moves it by ~1e-4)."""
        case = make_case(17, [32768], 32768, fp8=True)
        cfg = dataclasses.replace(V_CONVERT_MEMORY, num_splits=1)
        out = mfa_decode_attention(
            **transpose_v(case), implementation="pallas", v_transposed=True, config=cfg
        )
        ref_case = {**case, "q": dequantize_kv(*quantize_kv(case["q"]))}
        ref = np.asarray(mfa_decode_reference(**ref_case), np.float32).ravel()
        got = np.asarray(out, np.float32).ravel()
        slope = float(got @ ref / (ref @ ref))
        assert abs(slope - 1.0) <= 2.0**-8, f"output scaled by {slope:.5f}"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 7, 16, 103])
def test_forced_splits_gpu(splits):
    """Split counts the cost model picks at B <= 8 (not powers of two), tuned FP8 form."""
    case = make_case(13, [8192, 5000], 8192, fp8=True)
    check(
        case,
        "pallas",
        fp8_pallas=True,
        config=dataclasses.replace(V_CONVERT_MEMORY, num_splits=splits),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,v_transposed", [(None, False), (64, False), (None, True)])
def test_fp8_out_gpu(page_size, v_transposed):
    """``quantize_out`` through the kernel's epilogue (unsplit ring-epilogue grid) against
    the same config's bf16 output o_bf16 and `quantize_activations` of it. The kernel
    quantizes its f32 output o: e4m3 keeps 3 mantissa bits (relative 2^-4, subnormal step
    2^-9 s); o_bf16 is o rounded to bf16 (unit roundoff 2^-8); f32 -> e4m3 may round through
    f16 on the way (2^-11 more). Dequantized in f32, per element
    |deq(kernel) - o_bf16| <= (2^-4 + 2^-8 + 2^-11)(1 + 2^-8)|o_bf16| + 2^-10 s, and the
    scales agree within 2^-8 relative. (The first H200 run dequantized to bf16, one more
    2^-8 rounding, under a bound that took bf16's roundoff as 2^-9: worst 1.003x.)"""
    rng = np.random.default_rng(19)
    case = make_case(19, [0, *rng.integers(1, 1025, 9).tolist()], 1024, fp8=True,
                     page_size=page_size)  # fmt: skip
    call = transpose_v(case) if v_transposed else case
    kw = dict(implementation="pallas", v_transposed=v_transposed,
              config=dataclasses.replace(V_CONVERT_MEMORY, num_splits=1))  # fmt: skip
    plain = np.asarray(mfa_decode_attention(**call, **kw), np.float32)
    q8 = mfa_decode_attention(**call, quantize_out=True, **kw)
    b = plain.shape[0]
    assert q8.values.dtype == jnp.float8_e4m3fn and q8.values.shape == (b, 1, N, H)
    assert q8.scales.shape == (b, 1, N, 2)
    _, want_scales = quantize_activations(jnp.asarray(plain, jnp.bfloat16))
    scales = np.asarray(q8.scales)
    np.testing.assert_allclose(scales, np.asarray(want_scales), rtol=2.0**-8, atol=1e-30)
    deq = np.asarray(q8.astype(jnp.float32).dequantize())
    s = np.repeat(scales, 128, axis=-1)
    bound = (2.0**-4 + 2.0**-8 + 2.0**-11) * (1 + 2.0**-8) * np.abs(plain) + 2.0**-10 * s
    worst = float(np.max(np.abs(deq - plain) / bound))
    assert worst <= 1.0, f"FP8 o error {worst:.3f} x its derived per-element bound"
    assert not np.asarray(q8.values[0], np.float32).any(), "an empty sequence's o must be 0"


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 64])
def test_longest_first_order_gpu(page_size):
    """More sequences than SMs (two waves), ragged lengths: the tuned default hands the CTAs
    out longest first (`config.use_longest_first`). Each sequence is computed by the same
    code whichever slot runs it, so the output equals the index-order grid bitwise, and
    both match the oracle."""
    rng = np.random.default_rng(18)
    lengths = rng.integers(0, 1025, 200).tolist()
    case = make_case(18, lengths, 1024, fp8=True, page_size=page_size)
    out = check(case, "pallas", fp8_pallas=True)
    by_index = mfa_decode_attention(
        **case,
        implementation="pallas",
        config=dataclasses.replace(V_CONVERT_MEMORY, longest_first=False),
    )
    same = mfa_decode_attention(
        **case,
        implementation="pallas",
        config=dataclasses.replace(V_CONVERT_MEMORY, longest_first=True),
    )
    np.testing.assert_array_equal(np.asarray(by_index, np.float32), np.asarray(same, np.float32))
    assert out.shape == np.asarray(same).shape


def test_combine_splits_matches_single_pass():
    """Partials over disjoint key ranges, merged by lse, equal one pass over all keys."""
    case = make_case(7, [384, 0, 130], 384, fp8=False)
    ref, ref_lse = mfa_decode_reference(**case, return_lse=True)
    parts, lses = [], []
    for lo, hi in ((0, 128), (128, 256), (256, 384)):
        c = dict(case)
        sl = slice(lo, hi)
        c["k"], c["v"] = case["k"][:, sl], case["v"][:, sl]
        c["lengths"] = jnp.clip(case["lengths"] - lo, 0, hi - lo)
        o, lse = mfa_decode_reference(**c, return_lse=True)
        parts.append(o.astype(jnp.float32))
        lses.append(lse)
    out, lse = combine_splits(jnp.stack(parts), jnp.stack(lses))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], rtol=1e-5)


def test_bad_inputs_raise():
    case = make_case(8, [3, 4], 64)
    with pytest.raises(ValueError, match="k_scale"):
        mfa_decode_attention(**{**case, "k_scale": case["lengths"]}, implementation="xla")
    with pytest.raises(ValueError, match="implementation"):
        mfa_decode_attention(**case, implementation="cuda")
    with pytest.raises(ValueError, match="lengths"):
        mfa_decode_attention(**{**case, "lengths": case["lengths"][:1]}, implementation="xla")
    with pytest.raises(ValueError, match="block_s"):
        TuningConfig(block_s=96)


@pytest.mark.parametrize(
    "fp8,t,paged,splits,wg_split,q_quant,fast",
    [
        (True, 1, False, 1, "head", "xla", False),
        (False, 2, True, 2, "head", "xla", False),
        (True, 3, True, 4, "seq", "xla", False),
        (True, 1, False, 1, "seq", "kernel", False),
        (True, 1, False, 1, "seq", "kernel", True),
        (True, 2, True, 3, "seq", "kernel", True),
        (True, 1, False, 2, "seq", "xla", True),
    ],
)
def test_gpu_lowering_on_cpu(fp8, t, paged, splits, wg_split, q_quant, fast):
    """The real Mosaic GPU lowering (layouts, smem budget, TMA shapes) runs on a CPU host."""
    sd = jax.ShapeDtypeStruct
    dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    b, s_cap, page = 4, 1024, 128
    kv_shape = (b * s_cap // page, page, H) if paged else (b, s_cap, H)
    scale = sd(kv_shape[:2], jnp.float32) if fp8 else None
    table = sd((b, s_cap // page), jnp.int32) if paged else None
    lowered = lower_pallas_for_gpu(
        sd((b, t, N, H), jnp.bfloat16),
        sd(kv_shape, dt),
        sd(kv_shape, dt),
        sd((b,), jnp.int32),
        k_scale=scale,
        v_scale=scale,
        block_table=table,
        config=TuningConfig(
            num_stages=2 if not fp8 else 4,
            num_splits=splits,
            wg_split=wg_split,
            q_quant=q_quant,
            q_tma=fast and q_quant == "kernel",
            ring_epilogue=fast,
        ),
    )
    assert "mosaic_gpu" in lowered.as_text()[:20000]


@pytest.mark.parametrize(
    "paged,v_convert,v_transposed",
    [(False, "memory", False), (True, "compute", False), (False, "memory", True)],
)
def test_fp8_out_lowering_on_cpu(paged, v_convert, v_transposed):
    """``quantize_out`` on an unsplit ring-epilogue grid: the kernel itself writes e4m3 o and
    its [B, T, 2, 64] scales (a third output) and that lowers for CUDA on a CPU host (the
    FP8 P.V form of a transposed V cache too)."""
    sd = jax.ShapeDtypeStruct
    b, s_cap, page = 8, 1024, 128
    kv_shape = (b * s_cap // page, page, H) if paged else (b, s_cap, H)
    v_shape = (b, H, s_cap) if v_transposed else kv_shape
    table = sd((b, s_cap // page), jnp.int32) if paged else None
    config = TuningConfig(
        num_stages=4, num_splits=1, wg_split="seq", q_quant="kernel", q_tma=True,
        ring_epilogue=True, v_convert=v_convert,
    )  # fmt: skip
    lowered = lower_pallas_for_gpu(
        sd((b, 1, N, H), jnp.bfloat16),
        sd(kv_shape, jnp.float8_e4m3fn),
        sd(v_shape, jnp.float8_e4m3fn),
        sd((b,), jnp.int32),
        k_scale=sd(kv_shape[:2], jnp.float32),
        v_scale=sd(kv_shape[:2], jnp.float32),
        block_table=table,
        config=config,
        quantize_out=True,
        v_transposed=v_transposed,
    )
    outs = jax.tree.leaves(lowered.out_info)
    assert [o.dtype for o in outs] == [jnp.float8_e4m3fn, jnp.float32, jnp.float32]
    assert outs[0].shape == (b, 1, N, H) and outs[1].shape == (b, 1, 2, N)


def test_quantize_out_xla_is_the_activation_format():
    """Off the kernel (XLA, or a split grid) ``quantize_out`` is `quantize_activations` of
    the bf16 output per head (scales [.., N, 2]): bitwise, T=1 squeezed like the output."""
    case = make_case(11, [40, 64], 64, squeeze=True)
    plain = mfa_decode_attention(**case, implementation="xla")
    q8 = mfa_decode_attention(**case, implementation="xla", quantize_out=True)
    values, scales = quantize_activations(plain)
    assert q8.values.shape == (2, N, H) and q8.scales.shape == (2, N, 2)
    assert q8.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q8.values), np.asarray(values))
    np.testing.assert_array_equal(np.asarray(q8.scales), np.asarray(scales))


def test_default_sm_scale_is_inverse_sqrt_head_dim():
    case = make_case(9, [40, 64], 64)
    a = mfa_decode_attention(**case, implementation="xla")
    b = mfa_decode_attention(**case, implementation="xla", sm_scale=1 / math.sqrt(H))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("b", [1, 3, 8, 32, 64, 98, 99, 128, 256])
@pytest.mark.parametrize("s_cap", [1024, 4096, 32768])
def test_num_splits_fill_one_wave(b, s_cap):
    """Split-K (the default rule) never spills into a second wave nor below one block a split."""
    from step3_jax.kernels.mfa_decode.config import choose_num_splits

    j = choose_num_splits(b, s_cap, 64, 132)
    assert 1 <= j <= s_cap // 64
    if j > 1:
        assert b * j <= 132


def test_config_validation():
    with pytest.raises(ValueError, match="even num_stages"):
        TuningConfig(wg_split="seq", num_stages=3)
    with pytest.raises(ValueError, match="wg_split"):
        TuningConfig(wg_split="rows")
    with pytest.raises(ValueError, match="shared memory"):
        TuningConfig(num_stages=4).validate_smem(jnp.bfloat16, jnp.float32)


def test_v_convert_memory_config_rules():
    """v_convert="memory": "seq" split, block_s=64, an FP8 cache; one more f16 [64, 256] tile
    (32 KiB) than the default, which fits at 4 stages only with the ring epilogue."""
    with pytest.raises(ValueError, match="v_convert"):
        TuningConfig(v_convert="wg2")
    with pytest.raises(ValueError, match="wg_split='seq'"):
        TuningConfig(wg_split="head", num_stages=4, v_convert="memory")
    with pytest.raises(ValueError, match="block_s=64"):
        TuningConfig(wg_split="seq", block_s=128, num_stages=2, v_convert="memory")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        TuningConfig(wg_split="seq", num_stages=2, v_convert="memory").validate_smem(
            jnp.bfloat16, jnp.float32
        )
    fp8 = jnp.float8_e4m3fn
    base = dataclasses.replace(V_CONVERT_MEMORY, v_convert="compute")
    extra = V_CONVERT_MEMORY.smem_bytes(fp8, jnp.float32) - base.smem_bytes(fp8, jnp.float32)
    assert extra == 64 * H * 2
    for cfg in (V_CONVERT_MEMORY, dataclasses.replace(V_CONVERT_MEMORY, q_tma=False)):
        cfg.validate_smem(fp8, jnp.float32)
    with pytest.raises(ValueError, match="shared memory"):
        dataclasses.replace(V_CONVERT_MEMORY, ring_epilogue=False).validate_smem(fp8, jnp.float32)


@pytest.mark.parametrize(
    "t,paged,splits,q_tma",
    [(1, False, 1, True), (2, True, 3, True), (1, False, 2, False)],
)
def test_gpu_lowering_on_cpu_v_convert_memory(t, paged, splits, q_tma):
    """v_convert="memory" reaches the kernel through api._kernel_shape (else the GPU suite
    and the benchmark would test and time the default) and lowers for CUDA (barriers, the
    N=256 P.V wgmma, smem budget)."""
    from step3_jax.kernels.mfa_decode import api

    sd = jax.ShapeDtypeStruct
    b, s_cap, page = 4, 1024, 128
    kv_shape = (b * s_cap // page, page, H) if paged else (b, s_cap, H)
    kv = sd(kv_shape, jnp.float8_e4m3fn)
    scale = sd(kv_shape[:2], jnp.float32)
    table = sd((b, s_cap // page), jnp.int32) if paged else None
    q, lengths = sd((b, t, N, H), jnp.bfloat16), sd((b,), jnp.int32)
    cfg = dataclasses.replace(V_CONVERT_MEMORY, num_splits=splits, q_tma=q_tma)
    ks = api._kernel_shape(q, kv, lengths, table, H**-0.5, cfg, 132)
    assert ks.v_convert == "memory", "api._kernel_shape drops TuningConfig.v_convert"
    traced = api._pallas_jit.trace(ks, q, kv, kv, lengths, scale, scale, table)
    lowered = traced.lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()[:20000]


def test_default_implementation_off_hopper_is_xla_silently():
    """implementation=None off-Hopper: the XLA path, silently (the one dispatch rule of
    `step3_jax.kernels.dispatch`: a warning only when a Hopper GPU is present but the call's
    shape keeps the kernel out); an explicit "pallas" is an error naming the reason."""
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("the fallback is only taken without a Hopper GPU")
    case = make_case(10, [5, 64], 64, fp8=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mfa_decode_attention(**case)
    with pytest.raises(ValueError, match="implementation='pallas' cannot run here: needs a Hopper"):
        mfa_decode_attention(**{**case, "implementation": "pallas"})
    ref = mfa_decode_attention(**case, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_paged_block_table_must_be_integer():
    case = make_case(11, [5, 64], 128, page_size=64)
    with pytest.raises(ValueError, match="block_table"):
        mfa_decode_attention(
            **{**case, "block_table": case["block_table"].astype(jnp.float32)},
            implementation="xla",
        )


@pytest.mark.parametrize(
    "cfg",
    [
        TuningConfig(wg_split="seq", num_stages=4, q_quant="kernel"),
        dataclasses.replace(V_CONVERT_MEMORY, ragged=True),  # with the ragged work list
    ],
    ids=["seq_qkernel", "ragged"],
)
def test_gpu_lowering_on_cpu_with_page_offsets(cfg):
    """The in-place pool path (page offsets per operand, scales in their own pool) lowers."""
    from step3_jax.kernels.mfa_decode import api

    sd = jax.ShapeDtypeStruct
    b, page = 4, 1024
    args = (
        sd((b, 1, N, H), jnp.bfloat16),
        sd((12, page, H), jnp.float8_e4m3fn),
        sd((12, page, H), jnp.float8_e4m3fn),
        sd((b,), jnp.int32),
        sd((30, page), jnp.float32),
        sd((30, page), jnp.float32),
        sd((b, 1), jnp.int32),
        sd((4,), jnp.int32),
    )
    ks = api._kernel_shape(args[0], args[1], args[3], args[6], H**-0.5, cfg, 132)
    ks = dataclasses.replace(ks, page_offsets=True)
    lowered = api._pallas_jit.trace(ks, *args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()[:20000]


@pytest.mark.parametrize(
    "paged,t,cfg,offsets",
    [
        (False, 1, None, False),  # the tuned FP8 form, made transposed-V
        (128, 2, None, False),
        (64, 1, None, False),  # the engine's page size: one V^T page = one TMA box
        (False, 1, TuningConfig(wg_split="seq", num_stages=4, num_splits=2), False),
        (128, 1, TuningConfig(wg_split="seq", num_stages=2, block_s=128), False),  # 128B swizzle
        (False, 3, dataclasses.replace(V_CONVERT_MEMORY, ragged=True), False),
        (128, 1, None, True),  # the AFD arena's in-place pools
    ],
    ids=["tuned", "tuned_paged_t2", "paged64", "split2", "block128", "ragged", "page_offsets"],
)
def test_gpu_lowering_on_cpu_v_transposed(paged, t, cfg, offsets):
    """FP8 P.V (transposed V cache) lowers for CUDA: the V^T TMA box, the 64- and 128-byte
    swizzled V^T and P tiles, the FP8 wgmma's operand checks and the smem budget."""
    from step3_jax.kernels.mfa_decode import api

    sd = jax.ShapeDtypeStruct
    b, s_cap, page = 4, 1024, paged
    kv_shape = (b * s_cap // page, page, H) if paged else (b, s_cap, H)
    fp8 = jnp.float8_e4m3fn
    args = [
        sd((b, t, N, H), jnp.bfloat16),
        sd(kv_shape, fp8),
        sd((kv_shape[0], H, kv_shape[1]), fp8),
        sd((b,), jnp.int32),
        sd(kv_shape[:2], jnp.float32),
        sd(kv_shape[:2], jnp.float32),
        sd((b, s_cap // page), jnp.int32) if paged else None,
    ]
    ks = api._kernel_shape(args[0], args[1], args[3], args[6], H**-0.5, cfg, 132, True)
    assert ks.v_transposed and ks.v_convert == "compute"
    if offsets:
        ks = dataclasses.replace(ks, page_offsets=True)
        args.append(sd((4,), jnp.int32))
    lowered = api._pallas_jit.trace(ks, *args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()[:20000]


def test_v_transposed_rules():
    """The transposed V layout is FP8-only and runs on the "seq" split; a head-split config or
    a bf16 cache is a clear error, and the layout never changes the bytes of the cache."""
    cfg = TuningConfig(wg_split="head", num_stages=4)
    with pytest.raises(ValueError, match="wg_split='seq'"):
        cfg.for_transposed_v()
    seq = dataclasses.replace(V_CONVERT_MEMORY, v_convert="memory").for_transposed_v()
    assert seq.v_convert == "compute"
    fp8, bf16 = jnp.float8_e4m3fn, jnp.bfloat16
    # FP8 P.V needs less shared memory than converting V (no f16 tiles).
    assert seq.smem_bytes(fp8, jnp.float32, v_transposed=True) < V_CONVERT_MEMORY.smem_bytes(
        fp8, jnp.float32
    )
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        seq.validate_smem(bf16, bf16, v_transposed=True)
    case = make_case(16, [3, 40], 64)  # bf16 cache
    with pytest.raises(ValueError, match="v_transposed=True"):
        mfa_decode_attention(**transpose_v(case), implementation="xla", v_transposed=True)
    case = make_case(16, [3, 40], 64, fp8=True)
    with pytest.raises(ValueError, match="k and v must both be"):  # not actually transposed
        mfa_decode_attention(**case, implementation="xla", v_transposed=True)


def test_paged_ids_and_lengths_out_of_range_raise():
    """A page id outside the pool was clamped (100 -> the last page) or wrapped (-1) by the
    XLA gather: a read of another sequence's page (the kernel would read out of bounds).
    lengths past the capacity or negative were accepted. Concrete values are checked; only
    the pages a sequence reads count (entries past ceil(lengths / page_size) are unused)."""
    case = make_case(12, [100, 64], 128, page_size=64)  # table [2, 2] over a pool of 7 pages
    table = np.asarray(case["block_table"])
    call = lambda **kw: mfa_decode_attention(**{**case, **kw}, implementation="xla")
    for bad in (100, -1):
        t = table.copy()
        t[0, 1] = bad
        msg = rf"block_table entries must be in \[0, P_total=7\) .*got {bad} \(row 0, page 1"
        with pytest.raises(ValueError, match=msg):
            call(block_table=jnp.asarray(t))
    t = table.copy()
    t[1, 1] = 100  # sequence 1 holds 64 tokens: its second page is never read
    np.testing.assert_array_equal(
        np.asarray(call(block_table=jnp.asarray(t)), np.float32), np.asarray(call(), np.float32)
    )
    with pytest.raises(ValueError, match=r"lengths must be in \[0, max_pages \* page_size=128\]"):
        call(lengths=jnp.asarray([129, 64], jnp.int32))
    contiguous = make_case(13, [5, 7], 64)
    for bad in (65, -3):
        with pytest.raises(ValueError, match=rf"lengths must be in \[0, S=64\], got {bad} at b=1"):
            mfa_decode_attention(**{**contiguous, "lengths": jnp.asarray([5, bad], jnp.int32)})


def test_page_offsets_are_validated_before_the_gather():
    """The page_offsets path gathered pages before any check: a 1-D block_table was accepted
    and an offset past a pool gave NaN (jnp.take's fill)."""
    case = make_case(14, [100, 64], 128, page_size=64)
    offsets = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match=r"block_table must be int32 \[B=2, max_pages\]"):
        mfa_decode_attention(
            **{**case, "block_table": case["block_table"][0]}, page_offsets=offsets
        )
    bad = jnp.asarray([0, 5, 0, 0], jnp.int32)
    msg = r"block_table \+ page_offsets\[1\] entries must be in \[0, P_total=7\) \(v's pool\)"
    with pytest.raises(ValueError, match=msg):
        mfa_decode_attention(**case, page_offsets=bad, implementation="xla")
    with pytest.raises(ValueError, match="lengths must be in"):
        mfa_decode_attention(
            **{**case, "lengths": jnp.asarray([-1, 5], jnp.int32)}, page_offsets=offsets
        )
    got = mfa_decode_attention(**case, page_offsets=offsets, implementation="xla")
    want = mfa_decode_attention(**case, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_value_checks_never_read_traced_arrays():
    """Under jit (the decode loop, the engine, the AFD step) lengths and block tables are
    tracers: nothing is read back (no host sync); out-of-range values are the caller's."""
    case = make_case(15, [100, 64], 128, page_size=64)
    run = jax.jit(lambda lengths, table: mfa_decode_attention(
        **{**case, "lengths": lengths, "block_table": table}, implementation="xla"))  # fmt: skip
    bad_table = case["block_table"].at[0, 1].set(100)
    assert run(jnp.asarray([200, 64], jnp.int32), bad_table).shape == (2, 1, N, H)


def test_sm_scale_and_list_inputs():
    """sm_scale="x" failed inside float() without naming it, and NaN gave NaN output; lengths
    as a Python list raised AttributeError (no .shape)."""
    case = make_case(16, [5, 7], 64)
    for bad in ("x", float("nan"), float("inf"), 0.0, -0.1, True):
        with pytest.raises(ValueError, match="sm_scale must be a finite positive number"):
            mfa_decode_attention(**case, sm_scale=bad)
    as_list = mfa_decode_attention(**{**case, "lengths": [5, 7]}, sm_scale=np.float32(0.1))
    want = mfa_decode_attention(**case, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(as_list, np.float32), np.asarray(want, np.float32))
    paged = make_case(17, [100, 64], 128, page_size=64)
    table = np.asarray(paged["block_table"]).tolist()
    got = mfa_decode_attention(**{**paged, "block_table": table}, page_offsets=[0, 0, 0, 0])
    want = mfa_decode_attention(**paged)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
