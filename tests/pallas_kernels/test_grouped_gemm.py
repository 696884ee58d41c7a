"""Grouped GEMM / SwiGLU / moe_ffn: the same suite for every implementation.

``xla`` runs everywhere (CI on CPU); ``pallas`` (Mosaic GPU) runs on a Hopper GPU and is
lowering-checked on CPU in ``test_grouped_gemm_lowering.py``.

Tolerances (derived, not tuned). The kernels get the SAME quantized operands as the float32
oracle, so their only errors are (a) operand rounding inside the implementation and (b) the
final bf16 rounding:
* (b): bf16 keeps 8 significant bits, so |rounding| <= 2**-8 * |ref|.
* (a): the ``xla`` path rounds dequantized operands to bf16 (relative <= 2**-8 each, so
  <= 2**-7 per product); the ``pallas`` path multiplies exact FP8 values in f32 (Hopper's FP8
  wgmma accumulates with ~22 mantissa bits within one 128-wide K block, i.e. << 2**-7). Each
  product x_k*w_k thus carries an independent error of at most 2**-7 |x_k w_k|, uniform in
  sign, so the sum's error has std <= 2**-7 * sqrt(sum_k (x_k w_k)**2) / sqrt(3); we allow 6
  standard deviations (``_bound``).
* global: 1 - cos(out, ref) <= 2e-4 (relative error std ~2**-8 gives 1 - cos ~ 2**-17).
moe_ffn with FP8 activations vs an UNquantized float32 oracle additionally sees e4m3
rounding of x and of h (relative error uniform in +-2**-4, std 2**-4/sqrt(3) = 0.036 each):
total relative std ~0.051, so 1 - cos ~ 0.051**2 / 2 = 1.3e-3; we allow 4e-3 globally and
0.03 per token row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax import quant
from step3_jax.kernels.grouped_gemm import api, moe
from step3_jax.kernels.grouped_gemm import reference as ref
from step3_jax.kernels.grouped_gemm.config import TuningConfig
from step3_jax.kernels.grouped_gemm.dense_group import DenseGroup


def _has_hopper() -> bool:
    try:
        d = jax.devices()[0]
    except RuntimeError:
        return False
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")


IMPLS = [
    "xla",
    pytest.param(
        "pallas",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not _has_hopper(), reason="Mosaic GPU kernel needs a Hopper GPU"),
        ],
    ),
]

K, N, G = 256, 256, 5
HP = jax.lax.Precision.HIGHEST


def _fp8_case(seed, group_sizes, m, k=K, n=N, n_w=1):
    """Quantized random x [m, k] and weights [G, n, k] (block-FP8), tail rows of x poisoned."""
    keys = jax.random.split(jax.random.key(seed), 1 + n_w)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    xq, xs = quant.quantize_activations(x)
    # Rows past sum(group_sizes) belong to no group: poisoned scales there (NaN, or inf: what
    # `quant.quantize_activations` gives a block holding a NaN or inf) must not leak anywhere.
    total = int(np.sum(group_sizes))
    rows = jnp.arange(m)[:, None]
    xs = jnp.where(rows >= total, jnp.where(rows % 2 == 0, jnp.nan, jnp.inf), xs)
    ws = []
    for kk in keys[1:]:
        # Scales differ per 128x128 block (x 2**[-2, 2]) so a wrong block index is caught.
        g = len(group_sizes)
        w = jax.random.normal(kk, (g, n // 128, 128, k // 128, 128), jnp.float32)
        mult = jnp.exp2(jax.random.randint(kk, (g, n // 128, 1, k // 128, 1), -2, 3))
        w = (w * mult).reshape(g, n, k)
        ws.append(quant.quantize_weight_blocks(w))
    return xq, xs, ws, jnp.asarray(group_sizes, jnp.int32)


def _finite(x):
    """The poisoned (NaN / inf) tail rows as zeros for the oracle, which never reads them."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _bound(x32, w32, gs, ref_out):
    """Elementwise error bound (see module docstring)."""
    spread = jnp.sqrt(ref.grouped_matmul(x32**2, w32**2, gs))
    return 2.0**-8 * jnp.abs(ref_out) + 6 * 2.0**-7 * spread / np.sqrt(3) + 1e-6


def _cos_diff(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)


def _assert_close(out, want, bound, cos_tol=2e-4):
    out = np.asarray(out.astype(jnp.float32))
    assert np.all(np.isfinite(out)), "non-finite output"
    err = np.abs(out - np.asarray(want))
    worst = np.unravel_index(np.argmax(err - np.asarray(bound)), err.shape)
    assert np.all(err <= np.asarray(bound)), f"error {err[worst]} > {bound[worst]} at {worst}"
    assert _cos_diff(out, want) <= cos_tol


GROUPS = {
    "random": [37, 0, 64, 1, 61],  # sum 163 of M=200: 37 tail rows
    "empty_experts": [0, 0, 130, 0, 0],
    "one_takes_all": [0, 0, 0, 200, 0],
    "not_tile_multiples": [1, 7, 65, 129, 0],  # sum 202 of M=208
    "all_empty": [0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(GROUPS))
def test_grouped_matmul_fp8(impl, case):
    gs_list = GROUPS[case]
    m = 208 if case == "not_tile_multiples" else 200
    xq, xs, [(wq, ws)], gs = _fp8_case(hash(case) % 1000, gs_list, m)
    out = api.grouped_matmul(xq, wq, gs, x_scale=xs, w_scale=ws, implementation=impl)
    assert out.shape == (m, N) and out.dtype == jnp.bfloat16
    x32 = _finite(ref.dequantize_x(xq, xs))  # tail rows: oracle gives 0 there anyway
    w32 = ref.dequantize_w(wq, ws)
    want = ref.grouped_matmul(x32, w32, gs)
    _assert_close(out, want, _bound(x32, w32, gs, want), cos_tol=2e-4 if sum(gs_list) else 1)
    total = sum(gs_list)
    assert np.all(np.asarray(out[total:]) == 0), "rows past sum(group_sizes) must be zero"


HOPPER_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _has_hopper(), reason="Mosaic GPU kernel needs a Hopper GPU"),
]
# 128-row warpgroup tiles (a CTA of up to 256 rows): at M = 256 each weight tile is streamed
# once for all rows (the dense GEMMs of the attention role; `bench_dense_fp8.py` times them).
WIDE_TILES = {
    "1wg_128x128": TuningConfig(block_m=128, block_n=128),
    "2wg_m_256x128": TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="m"),
    "2wg_n_128x256": TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="n"),
}


@pytest.mark.parametrize("groups,m", [([37, 0, 130, 1, 61], 264), ([256], 256)])
@pytest.mark.parametrize("name", list(WIDE_TILES))
@pytest.mark.parametrize("n_w", [1, 2])
@pytest.mark.parametrize("_", [pytest.param(None, marks=HOPPER_ONLY)])
def test_wide_row_tiles_fp8(_, n_w, name, groups, m):
    """The kernel with 128-row warpgroup tiles (gate/up SwiGLU too) against the oracle."""
    xq, xs, wts, gs = _fp8_case(7, groups, m, n_w=n_w)
    cfg = WIDE_TILES[name]
    x32 = _finite(ref.dequantize_x(xq, xs))
    (wq, ws), *rest = wts
    w32 = ref.dequantize_w(wq, ws)
    if n_w == 1:
        out = api.grouped_matmul(
            xq, wq, gs, x_scale=xs, w_scale=ws, implementation="pallas", config=cfg
        )
        want = ref.grouped_matmul(x32, w32, gs)
        _assert_close(out, want, _bound(x32, w32, gs, want))
    else:
        (uq, us), u32 = rest[0], ref.dequantize_w(*rest[0])
        out = api.grouped_swiglu(
            xq, wq, uq, gs, x_scale=xs, w_gate_scale=ws, w_up_scale=us,
            implementation="pallas", config=cfg,
        )  # fmt: skip
        want = ref.grouped_swiglu(x32, w32, u32, gs)
        gate, up = ref.grouped_matmul(x32, w32, gs), ref.grouped_matmul(x32, u32, gs)
        eg, eu = _bound(x32, w32, gs, gate), _bound(x32, u32, gs, up)  # as in the test below
        bound = 1.1 * jnp.abs(up) * eg + jnp.abs(jax.nn.silu(gate)) * eu + 2.0**-8 * jnp.abs(want)
        _assert_close(out, want, bound)
    assert np.all(np.asarray(out[sum(groups) :]) == 0), "rows past sum(group_sizes) must be zero"


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_swiglu_fp8(impl):
    gs_list = [50, 0, 3, 90, 41]
    xq, xs, [(wg, sg), (wu, su)], gs = _fp8_case(7, gs_list, 192, n_w=2)
    out = api.grouped_swiglu(
        xq, wg, wu, gs, x_scale=xs, w_gate_scale=sg, w_up_scale=su, implementation=impl
    )
    x32 = _finite(ref.dequantize_x(xq, xs))
    g32, u32 = ref.dequantize_w(wg, sg), ref.dequantize_w(wu, su)
    want = ref.grouped_swiglu(x32, g32, u32, gs)
    gate, up = ref.grouped_matmul(x32, g32, gs), ref.grouped_matmul(x32, u32, gs)
    # d(silu(g) u) = silu'(g) u dg + silu(g) du with |silu'| <= 1.1.
    eg, eu = _bound(x32, g32, gs, gate), _bound(x32, u32, gs, up)
    bound = 1.1 * jnp.abs(up) * eg + jnp.abs(jax.nn.silu(gate)) * eu + 2.0**-8 * jnp.abs(want)
    _assert_close(out, want, bound)


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_matmul_bf16(impl):
    gs = jnp.asarray([60, 0, 33, 70, 17], jnp.int32)
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (192, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (G, N, K), jnp.float32) / 16).astype(jnp.bfloat16)
    out = api.grouped_matmul(x, w, gs, implementation=impl)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    want = ref.grouped_matmul(x32, w32, gs)
    _assert_close(out, want, _bound(x32, w32, gs, want))


WIDE_BF16 = TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="n")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "groups,m,config",
    [([60, 0, 33, 70, 17], 192, None), ([272], 272, None), ([272], 272, WIDE_BF16)],
    ids=["groups", "dense", "dense_128x256"],
)
def test_grouped_matmul_bias_and_quick_gelu(impl, groups, m, config):
    """The one-weight epilogue: quick_gelu(x @ w^T + bias) in f32 before the bf16 store,
    against the float32 oracle; rows past the groups stay zero. Bound: the plain GEMM's
    (`_bound`) through quick_gelu, whose slope is at most 1.13 in magnitude, plus the
    bf16 rounding of the result."""
    config = config if impl == "pallas" else None
    g = len(groups)
    gs = jnp.asarray(groups, jnp.int32)
    kx, kw, kb = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (m, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (g, N, K), jnp.float32) / 16).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (N,), jnp.float32).astype(jnp.bfloat16)
    out = api.grouped_matmul(
        x, w, gs, bias=b, activation="quick_gelu", implementation=impl, config=config
    )
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    pre = ref.grouped_matmul(x32, w32, gs)
    live = (jnp.arange(m) < sum(groups))[:, None]
    y = pre + b.astype(jnp.float32)
    want = jnp.where(live, y * jax.nn.sigmoid(1.702 * y), 0.0)
    bound = 2.0**-8 * jnp.abs(want) + 1.13 * (_bound(x32, w32, gs, pre) - 2.0**-8 * jnp.abs(pre))
    assert out.dtype == jnp.bfloat16 and out.shape == (m, N)
    _assert_close(out, want, bound)


def test_epilogue_validation():
    x = jnp.zeros((64, K), jnp.bfloat16)
    w = jnp.zeros((1, N, K), jnp.bfloat16)
    gs = jnp.asarray([64], jnp.int32)
    with pytest.raises(ValueError, match="bias must be a float"):
        api.grouped_matmul(x, w, gs, bias=jnp.zeros((N + 1,)), implementation="xla")
    with pytest.raises(ValueError, match="activation must be one of"):
        api.grouped_matmul(x, w, gs, activation="relu", implementation="xla")
    with pytest.raises(ValueError, match="one weight"):
        api.grouped(x, (w, w), gs, implementation="xla", bias=jnp.zeros((N,)))


def _moe_case(seed, t=48, d=256, f=256, e=6, k=3):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (t, d), jnp.float32).astype(jnp.bfloat16)
    ids = jax.random.randint(ks[1], (t, k), 0, e)
    rw = jax.random.uniform(ks[2], (t, k), jnp.float32)
    ws = [
        jax.random.normal(ks[3 + i], s, jnp.float32) / np.sqrt(s[-1])
        for i, s in enumerate([(e, f, d), (e, f, d), (e, d, f)])
    ]
    return x, ids, rw, ws


def _fp8_weights(ws):
    qs = [quant.quantize_weight_blocks(w) for w in ws]
    return [q for q, _ in qs], [s for _, s in qs]


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_ffn_fp8_expert_and_tensor_parallel(impl):
    """Full device == sum of EP shards == sum of TP (F-split) shards == fp32 oracle."""
    x, ids, rw, ws = _moe_case(11)
    qv, qs = _fp8_weights(ws)
    kw = dict(implementation=impl)
    full = moe.moe_ffn(
        x, ids, rw, *qv, w_gate_scale=qs[0], w_up_scale=qs[1], w_down_scale=qs[2], **kw
    )
    want = ref.moe_ffn(x, ids, rw, *qv, w_gate_scale=qs[0], w_up_scale=qs[1], w_down_scale=qs[2])
    out = np.asarray(full.astype(jnp.float32))
    assert _cos_diff(out, want) <= 4e-3
    rows = [_cos_diff(out[i], np.asarray(want)[i]) for i in range(out.shape[0])]
    assert max(rows) <= 0.03
    # Expert parallel: experts [0, 2) and [2, 6) on two "devices".
    ep = sum(
        moe.moe_ffn(
            x,
            ids,
            rw,
            *(q[a:b] for q in qv),
            first_expert=a,
            w_gate_scale=qs[0][a:b],
            w_up_scale=qs[1][a:b],
            w_down_scale=qs[2][a:b],
            **kw,
        ).astype(jnp.float32)
        for a, b in [(0, 2), (2, 6)]
    )
    # Tensor parallel: F split into two 128-wide halves (gate/up rows, down columns).
    tp = sum(
        moe.moe_ffn(
            x,
            ids,
            rw,
            qv[0][:, s],
            qv[1][:, s],
            qv[2][:, :, s],
            w_gate_scale=qs[0][:, sb],
            w_up_scale=qs[1][:, sb],
            w_down_scale=qs[2][:, :, sb],
            **kw,
        ).astype(jnp.float32)
        for s, sb in [(slice(0, 128), slice(0, 1)), (slice(128, 256), slice(1, 2))]
    )
    # Shards see the same quantized activations, so they agree with the full device up to
    # bf16 rounding of each partial (2**-8 relative) and a different f32 summation order.
    scale = np.abs(out).max()
    np.testing.assert_allclose(np.asarray(ep), out, atol=2 * 2.0**-8 * scale)
    assert _cos_diff(tp, want) <= 4e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_ffn_reads_pre_quantized_activations_as_they_are(impl):
    """An FP8 x with its scales (an AFD packet) is what moe_ffn would have made of the bf16 x:
    the same GEMM inputs, so bitwise the same output (bf16)."""
    x, ids, rw, ws = _moe_case(12)
    qv, qs = _fp8_weights(ws)
    kw = dict(w_gate_scale=qs[0], w_up_scale=qs[1], w_down_scale=qs[2], implementation=impl)
    xq, xs = quant.quantize_activations(x)
    got = moe.moe_ffn(xq, ids, rw, *qv, x_scale=xs, **kw)
    want = moe.moe_ffn(x, ids, rw, *qv, **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="x_scale"):
        moe.moe_ffn(x, ids, rw, *qv, x_scale=xs, **kw)  # x not FP8
    with pytest.raises(ValueError, match="x_scale"):
        moe.moe_ffn(xq, ids, rw, *qv, x_scale=xs[:, :1], **kw)  # wrong scale shape
    with pytest.raises(ValueError, match="x_scale"):
        moe.moe_ffn(xq, ids, rw, *ws, x_scale=xs, implementation=impl)  # float weights


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_ffn_bf16_and_shared(impl):
    x, ids, rw, ws = _moe_case(5, t=40)
    wb = [w.astype(jnp.bfloat16) for w in ws]
    out = moe.moe_ffn(x, ids, rw, *wb, implementation=impl)
    want = ref.moe_ffn(x, ids, rw, *[w.astype(jnp.float32) for w in wb])
    assert _cos_diff(out.astype(jnp.float32), want) <= 2e-4
    sh = moe.shared_expert_ffn(x, wb[0][1], wb[1][1], wb[2][1], implementation=impl)
    one = ref.moe_ffn(
        x, jnp.ones((40, 1), jnp.int32), jnp.ones((40, 1)), *[w.astype(jnp.float32) for w in wb]
    )
    assert _cos_diff(sh.astype(jnp.float32), one) <= 2e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_w", [1, 2])
def test_dense_group_rides_the_routed_launch(impl, n_w):
    """A dense group (own weights [N_d, K_d], N_d < N, K_d < K, rows after the routed ones)
    gives what a one-group call on its rows and columns gives, and leaves the routed rows as
    they are without it: the same operands and K order, so bitwise on both paths."""
    gs_list, m, row0, rows = [37, 0, 64, 1, 20], 200, 128, 72
    _, _, ws, gs = _fp8_case(21, gs_list, m, k=384, n=384, n_w=n_w)
    xq, xs = quant.quantize_activations(jax.random.normal(jax.random.key(20), (m, 384)))
    total = int(np.sum(gs_list))
    between = (jnp.arange(m) >= total) & (jnp.arange(m) < row0)
    xs = jnp.where(between[:, None], jnp.nan, xs)  # rows of no group: must not leak
    n_d, k_d = 128, 256
    keys = jax.random.split(jax.random.key(22), n_w)
    dense = [quant.quantize_weight_blocks(jax.random.normal(kk, (n_d, k_d))) for kk in keys]
    group = DenseGroup(
        tuple(w for w, _ in dense), tuple(sc for _, sc in dense), row0=row0, rows=rows
    )
    wv, sv = tuple(w for w, _ in ws), tuple(sc for _, sc in ws)
    kw = dict(implementation=impl, zero_tail=False)
    got = api.grouped(xq, wv, gs, x_scale=xs, w_scales=sv, dense=group, **kw)
    routed = api.grouped(xq, wv, gs, x_scale=xs, w_scales=sv, **kw)
    np.testing.assert_array_equal(np.asarray(got[:total]), np.asarray(routed[:total]))
    one = api.grouped(
        xq[row0 : row0 + rows, :k_d],
        tuple(w[None] for w in group.weights),
        np.asarray([rows], np.int32),
        x_scale=xs[row0 : row0 + rows, : k_d // 128],
        w_scales=tuple(sc[None] for sc in group.w_scales),
        **kw,
    )
    np.testing.assert_array_equal(np.asarray(got[row0 : row0 + rows, :n_d]), np.asarray(one))
    # ... and that one-group call is right (float32 oracle, the bound of the module docstring).
    x32 = ref.dequantize_x(xq[row0 : row0 + rows, :k_d], xs[row0 : row0 + rows, : k_d // 128])
    w32 = [ref.dequantize_w(w[None], sc[None]) for w, sc in dense]
    one_gs = jnp.asarray([rows], jnp.int32)
    outs = [ref.grouped_matmul(x32, w, one_gs) for w in w32]
    if n_w == 1:
        _assert_close(one, outs[0], _bound(x32, w32[0], one_gs, outs[0]))
    else:
        want = jax.nn.silu(outs[0]) * outs[1]
        eg, eu = (_bound(x32, w, one_gs, o) for w, o in zip(w32, outs, strict=True))
        bound = 1.1 * jnp.abs(outs[1]) * eg + jnp.abs(jax.nn.silu(outs[0])) * eu
        _assert_close(one, want, bound + 2.0**-8 * jnp.abs(want))


def test_dense_group_validation():
    xq, xs, [(w, sc)], gs = _fp8_case(23, [10, 10, 10, 10, 10], 64)
    wd, sd = quant.quantize_weight_blocks(jnp.ones((128, 128)))
    call = lambda g: api.grouped(xq, (w,), gs, x_scale=xs, w_scales=(sc,), dense=g)
    with pytest.raises(ValueError, match="rows"):
        call(DenseGroup((wd,), (sd,), row0=56, rows=16))  # past x's 64 rows
    with pytest.raises(ValueError, match="w_scales"):
        call(DenseGroup((wd,), (), row0=48, rows=16))
    with pytest.raises(ValueError, match="fit"):
        big, bs = quant.quantize_weight_blocks(jnp.ones((384, 128)))
        call(DenseGroup((big,), (bs,), row0=48, rows=16))  # N_d > N
    with pytest.raises(ValueError, match="weight"):
        call(DenseGroup((wd, wd), (sd, sd), row0=48, rows=16))  # two weights, one routed
    with pytest.raises(TypeError, match="DenseGroup"):
        call((wd,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fp8", [True, False])
def test_moe_ffn_shared_expert_in_the_routed_launch(impl, fp8):
    """moe_ffn(shared=...) == routed experts + the shared expert run on its own, on an
    expert-parallel shard with a shared slice narrower than F (the 1A3F FFN device's case:
    1,792 of 5,120), and == the float32 oracle."""
    t, f_s = 45, 128  # T*K = 135 sorted rows: the shared rows start at 136
    x, ids, rw, ws = _moe_case(31, t=t)
    ks = jax.random.split(jax.random.key(32), 3)
    d = x.shape[1]
    sh = [
        jax.random.normal(kk, s) / np.sqrt(s[1])
        for kk, s in zip(ks, [(f_s, d)] * 2 + [(d, f_s)], strict=True)
    ]
    a, b = 2, 6  # this device's experts
    if fp8:
        (qv, qs), (sv, ss) = _fp8_weights([w[a:b] for w in ws]), _fp8_weights(sh)
        kw = dict(w_gate_scale=qs[0], w_up_scale=qs[1], w_down_scale=qs[2])
    else:
        qv, sv = [w[a:b].astype(jnp.bfloat16) for w in ws], [w.astype(jnp.bfloat16) for w in sh]
        kw, ss = {}, None
    kw |= dict(first_expert=a, implementation=impl)
    got = moe.moe_ffn(x, ids, rw, *qv, shared=tuple(sv), shared_scales=ss, **kw)
    routed = moe.moe_ffn(x, ids, rw, *qv, **kw).astype(jnp.float32)
    sk = (
        {}
        if ss is None
        else dict(zip(("w_gate_scale", "w_up_scale", "w_down_scale"), ss, strict=True))
    )
    alone = moe.shared_expert_ffn(x, *sv, implementation=impl, **sk).astype(jnp.float32)
    # Both forms round routed and shared outputs to bf16 (u = 2**-8); the fused one adds them
    # in f32 and rounds once, the separate one rounds the sum again; a shared output may also
    # round the other way after a different f32 summation order (XLA path): 2u |shared|.
    u = 2.0**-8
    bound = u * (jnp.abs(routed) + 2 * jnp.abs(alone) + jnp.abs(routed + alone)) + 1e-6
    _assert_close(got, routed + alone, bound)
    # The float32 oracle: the routed experts plus the shared one as a one-expert MoE.
    scale_kw = {k: v for k, v in kw.items() if k.endswith("scale")}
    want = ref.moe_ffn(x, ids, rw, *qv, first_expert=a, **scale_kw)
    one = dict(zip(("w_gate_scale", "w_up_scale", "w_down_scale"), ss or (None,) * 3, strict=True))
    one = {k: None if v is None else v[None] for k, v in one.items()}
    ones = (jnp.zeros((t, 1), jnp.int32), jnp.ones((t, 1)))
    want = want + ref.moe_ffn(x, *ones, *(w[None] for w in sv), **one)
    assert _cos_diff(got.astype(jnp.float32), want) <= (4e-3 if fp8 else 2e-4)


def test_default_implementation_on_cpu_is_xla_without_warning():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only check")
    x = jax.random.normal(jax.random.key(0), (16, 128), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (2, 128, 128), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray([9, 4], jnp.int32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = api.grouped_matmul(x, w, gs)
    want = api.grouped_matmul(x, w, gs, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert np.all(np.asarray(out[13:]) == 0) and np.any(np.asarray(out[:13]) != 0)


def test_validation_errors():
    x = jnp.zeros((8, 256), jnp.bfloat16)
    w = jnp.zeros((2, 128, 256), jnp.float8_e4m3fn)
    gs = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="w_scale"):
        api.grouped_matmul(x, w, gs)
    with pytest.raises(ValueError, match="K=256"):
        api.grouped_matmul(x, jnp.zeros((2, 128, 128), jnp.bfloat16), gs)
    with pytest.raises(ValueError, match="group_sizes"):
        api.grouped_matmul(x, w.astype(jnp.bfloat16), jnp.asarray([8], jnp.int32))
    with pytest.raises(ValueError, match="FP8 x needs FP8 weights"):
        api.grouped_matmul(x.astype(jnp.float8_e4m3fn), w.astype(jnp.bfloat16), gs)
    with pytest.raises(ValueError, match="implementation"):
        api.grouped_matmul(x, w.astype(jnp.bfloat16), gs, implementation="triton")
    with pytest.raises(ValueError, match="only accepted with float8"):
        api.grouped_matmul(x, w.astype(jnp.bfloat16), gs, w_scale=jnp.ones((2, 1, 2)))
    with pytest.raises(ValueError, match="W8A16"):
        moe.moe_ffn(
            x,
            jnp.zeros((8, 3), jnp.int32),
            jnp.zeros((8, 3)),
            w,
            w,
            jnp.zeros((2, 256, 128), jnp.float8_e4m3fn),
            quantize_activations=False,
        )
    with pytest.raises(ValueError, match="w_down"):
        moe.moe_ffn(
            x,
            jnp.zeros((8, 3), jnp.int32),
            jnp.zeros((8, 3)),
            w.astype(jnp.bfloat16),
            w.astype(jnp.bfloat16),
            w.astype(jnp.bfloat16),
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_ffn_reads_experts_in_place_from_a_pool(impl):
    """Experts read at an offset inside a larger pool (the AFD arena's in-place path) give
    exactly what the same experts give as their own arrays: same kernel, same operands."""
    x, ids, rw, ws = _moe_case(21, e=4)
    qv, qs = _fp8_weights(ws)
    keys = jax.random.split(jax.random.key(22), 3)
    pools = [  # 3 decoy experts before and 2 after the 4 real ones, random FP8 values
        jnp.concatenate(
            [
                jax.random.normal(kk, (3, *q.shape[1:])).astype(q.dtype),
                q,
                jax.random.normal(kk, (2, *q.shape[1:])).astype(q.dtype),
            ]
        )
        for kk, q in zip(keys, qv, strict=True)
    ]
    scales = dict(w_gate_scale=qs[0], w_up_scale=qs[1], w_down_scale=qs[2])
    want = moe.moe_ffn(x, ids, rw, *qv, implementation=impl, **scales)
    run = jax.jit(
        lambda off: moe.moe_ffn(
            x,
            ids,
            rw,
            *pools,
            implementation=impl,
            num_local_experts=4,
            weight_offset=off,
            **scales,
        )
    )
    np.testing.assert_array_equal(np.asarray(run(jnp.int32(3))), np.asarray(want))
    assert not np.array_equal(np.asarray(run(jnp.int32(0))), np.asarray(want))
    # As in the AFD arena: gate and up at different offsets of ONE pool, down in another.
    gate_up = jnp.concatenate([pools[0], qv[1]])  # up's experts at matrices 9..12
    both = moe.moe_ffn(
        x,
        ids,
        rw,
        gate_up,
        gate_up,
        pools[2],
        implementation=impl,
        num_local_experts=4,
        weight_offset=(jnp.int32(3), jnp.int32(9), jnp.int32(3)),
        **scales,
    )
    np.testing.assert_array_equal(np.asarray(both), np.asarray(want))
    with pytest.raises(ValueError, match="go together"):
        moe.moe_ffn(x, ids, rw, *pools, implementation=impl, num_local_experts=4, **scales)
    with pytest.raises(ValueError, match="group_sizes"):  # without an offset, G must equal P
        api.grouped_matmul(x, pools[0].astype(jnp.bfloat16), jnp.asarray([4, 4], jnp.int32))


@pytest.mark.parametrize(
    "tk,k,e_local,first",
    [(768, 3, 16, 16), (24, 1, 1, 0), (300, 3, 48, 0), (2049, 1, 16, 0), (2048, 2, 16, 8)],
)
def test_dispatch_is_the_stable_sort_by_local_expert(tk, k, e_local, first):
    """`moe._dispatch`: the stable order of the (token, route) pairs by local expert
    (non-local pairs last), its inverse, and the per-expert counts; by compare-and-count up
    to `RANK_BY_COUNT_MAX_PAIRS` pairs, by a sort past it (2,049)."""
    ids = jnp.asarray(np.random.default_rng(tk).integers(0, 48, (tk // k, k)), jnp.int32)
    order, inverse, valid, sizes = moe._dispatch(ids, first, e_local)
    local = np.asarray(ids).reshape(-1) - first
    ok = (local >= 0) & (local < e_local)
    key = np.where(ok, local, e_local)
    want = np.argsort(key, kind="stable")
    np.testing.assert_array_equal(np.asarray(order), want)
    np.testing.assert_array_equal(np.asarray(inverse)[want], np.arange(tk))
    np.testing.assert_array_equal(np.asarray(valid), ok)
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(key, minlength=e_local + 1)[:-1])


def _small_fp8():
    """A tiny block-FP8 grouped case: x [8, 256] bf16, w [3, 128, 256] FP8 (3 groups)."""
    x = jax.random.normal(jax.random.key(30), (8, 256), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(31), (3, 128, 256), jnp.float32)
    wq, ws = quant.quantize_weight_blocks(w)
    return x, wq, ws, jnp.asarray([3, 3, 2], jnp.int32)


def test_fp8_scales_must_be_float32():
    """An int32 w_scale (e.g. from a loader) truncated every scale below 1 to 0: the output
    was silently all zeros. A bf16 x_scale silently lost precision. Both are refused."""
    x, wq, ws, gs = _small_fp8()
    xq, xs = quant.quantize_activations(x)
    with pytest.raises(ValueError, match=r"w_scale\[0\] must be float32 \(3, 1, 2\), got int32"):
        api.grouped_matmul(x, wq, gs, w_scale=ws.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"x_scale must be float32 \(8, 2\), got bfloat16"):
        api.grouped_matmul(xq, wq, gs, x_scale=xs.astype(jnp.bfloat16), w_scale=ws)
    with pytest.raises(ValueError, match=r"w_scale\[1\] must be float32"):
        api.grouped_swiglu(x, wq, wq, gs, w_gate_scale=ws, w_up_scale=ws.astype(jnp.float16))
    d, ds = quant.quantize_weight_blocks(jnp.ones((128, 128)))
    with pytest.raises(ValueError, match="w_scales must be 1 x f32 .* got \\['int32"):
        api.grouped(
            xq, (wq,), jnp.asarray([3, 3, 0], jnp.int32), x_scale=xs, w_scales=(ws,),
            dense=DenseGroup((d,), (ds.astype(jnp.int32),), row0=6, rows=2),
        )  # fmt: skip
    ids, ew = jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1))
    wd, wds = quant.quantize_weight_blocks(jnp.ones((3, 256, 128)))
    with pytest.raises(ValueError, match="x_scale .*float32 \\(8, 2\\); got .*x_scale bfloat16"):
        moe.moe_ffn(
            xq, ids, ew, wq, wq, wd, w_gate_scale=ws, w_up_scale=ws, w_down_scale=wds,
            x_scale=xs.astype(jnp.bfloat16),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"w_scale\[0\] must be float32"):
        moe.moe_ffn(x, ids, ew, wq, wq, wd, w_gate_scale=ws.astype(jnp.int32), w_up_scale=ws,
                    w_down_scale=wds)  # fmt: skip


def test_offsets_past_the_pool_raise():
    """An offset past the pool was clamped by `lax.dynamic_index_in_dim`: every group past it
    silently ran on the pool's last weight. Offsets known here (ints, concrete arrays) are
    checked; traced ones are not read back (no host sync under jit)."""
    x = jax.random.normal(jax.random.key(32), (8, 32), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(33), (3, 16, 32), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray([4, 4], jnp.int32)
    msg = r"group_offset=5 with G=2 groups needs a pool of >= 7 weights .*got P=3"
    with pytest.raises(ValueError, match=msg):
        api.grouped_matmul(x, w, gs, group_offset=5)
    with pytest.raises(ValueError, match="group_offset=-1"):
        api.grouped_matmul(x, w, gs, group_offset=-1)
    with pytest.raises(ValueError, match="group_offset=2 with G=2"):
        api.grouped_matmul(x, w, gs, group_offset=jnp.int32(2))  # concrete: eager call
    with pytest.raises(ValueError, match="group_offset=2 with G=2"):
        api.grouped_swiglu(x, w, w, gs, group_offset=(0, 2))
    with pytest.raises(ValueError, match="group_offset must be an int scalar"):
        api.grouped_matmul(x, w, gs, group_offset=1.5)
    ok = api.grouped_matmul(x, w, gs, group_offset=1)
    want = api.grouped_matmul(x, w[1:], gs)
    np.testing.assert_array_equal(np.asarray(ok, np.float32), np.asarray(want, np.float32))
    traced = jax.jit(lambda o: api.grouped_matmul(x, w, gs, group_offset=o))
    traced(jnp.int32(1))  # a traced offset is the caller's to keep in range: no check
    wg = jax.random.normal(jax.random.key(34), (4, 16, 32), jnp.float32).astype(jnp.bfloat16)
    wd = jnp.swapaxes(wg, 1, 2)
    ids = jnp.tile(jnp.asarray([[0, 1]], jnp.int32), (8, 1))
    ew = jnp.ones((8, 2), jnp.float32)
    run = lambda off: moe.moe_ffn(x, ids, ew, wg, wg, wd, num_local_experts=2, weight_offset=off)
    msg = r"weight_offset=3 with G=2 groups needs a pool of >= 5 weights .*got P=4"
    with pytest.raises(ValueError, match=msg):
        run(3)
    with pytest.raises(ValueError, match="weight_offset=3 with G=2"):
        run((0, 0, jnp.int32(3)))
    assert run(2).shape == (8, 32)


def test_group_sizes_values_and_lists():
    """Concrete group_sizes (an eager call, NumPy, a list) must be >= 0 with sum <= M: they
    were clamped silently. A list is accepted (it raised AttributeError: no .shape). Traced
    sizes are never read back."""
    x, wq, ws, gs = _small_fp8()
    with pytest.raises(ValueError, match=r"group_sizes must be >= 0 with sum <= 8 .*\[3, 6, 2\]"):
        api.grouped_matmul(x, wq, jnp.asarray([3, 6, 2], jnp.int32), w_scale=ws)
    with pytest.raises(ValueError, match=r"group_sizes must be >= 0 .*\[4, -1, 2\]"):
        api.grouped_matmul(x, wq, np.asarray([4, -1, 2], np.int32), w_scale=ws)
    with pytest.raises(ValueError, match="group_sizes must be int"):
        api.grouped_matmul(x, wq, [3.0, 3.0, 2.0], w_scale=ws)
    as_list = api.grouped_matmul(x, wq, [3, 3, 2], w_scale=ws)
    want = api.grouped_matmul(x, wq, gs, w_scale=ws)
    np.testing.assert_array_equal(np.asarray(as_list, np.float32), np.asarray(want, np.float32))
    traced = jax.jit(lambda g: api.grouped_matmul(x, wq, g, w_scale=ws))
    traced(jnp.asarray([3, 6, 2], jnp.int32))  # traced: not read back, clamped as documented


def test_integer_operands_are_refused():
    """Float expert ids were truncated (0.7 -> expert 0); int x / weights ran silently."""
    x = jax.random.normal(jax.random.key(35), (8, 32), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(36), (2, 16, 32), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="x must be a float \\[M, K\\], got int32"):
        api.grouped_matmul(x.astype(jnp.int32), w, gs)
    with pytest.raises(ValueError, match="weights must be float .*got int8"):
        api.grouped_matmul(x, w.astype(jnp.int8), gs)
    wd = jnp.swapaxes(w, 1, 2)
    ids = jnp.full((8, 1), 0.7, jnp.float32)
    with pytest.raises(ValueError, match=r"expert_ids must be int \[T=8, K\], got float32"):
        moe.moe_ffn(x, ids, jnp.ones((8, 1)), w, w, wd)
