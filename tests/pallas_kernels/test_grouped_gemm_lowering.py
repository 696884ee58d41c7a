"""CPU-side checks of the Mosaic GPU kernel: the real GPU lowering, and the tile table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.kernels.grouped_gemm import mosaic_gpu
from step3_jax.kernels.grouped_gemm.config import TuningConfig, dense_config, tuned_config
from step3_jax.kernels.grouped_gemm.dense_group import DenseGroup

pytestmark = pytest.mark.skipif(not mosaic_gpu.available(), reason="no Mosaic GPU Pallas API")


def _operands(m: int, k: int, n: int, g: int, pool: int | None = None, dt=jnp.float8_e4m3fn):
    """Abstract operands of the kernel: x, weights [pool or g, n, k] (``dt``), group sizes,
    the x and weight block scales (used only when ``dt`` is FP8)."""
    return (
        jax.ShapeDtypeStruct((m, k), dt),
        jax.ShapeDtypeStruct((pool or g, n, k), dt),
        jax.ShapeDtypeStruct((g,), jnp.int32),
        jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((g, n // 128, k // 128), jnp.float32),
    )


def _assert_lowers_for_cuda(args, n_w: int, fp8: bool, config: TuningConfig, kw=None):
    """Lowers `grouped_gemm_mgpu` for CUDA on abstract operands ``args`` = (x, w, gs, xs, ws,
    *extra) with ``n_w`` copies of w (and of ws when ``fp8``) and asserts it is a Mosaic GPU
    kernel. ``kw(*extra)``: the call's other keywords, built from the extra operands inside
    the traced function (a traced pool offset, a dense group's weights, a bias)."""

    def f(x, w, gs, xs, ws, *extra):
        return mosaic_gpu.grouped_gemm_mgpu(
            x,
            (w,) * n_w,
            gs,
            x_scale=xs if fp8 else None,
            w_scales=(ws,) * n_w if fp8 else None,
            config=config,
            **(kw(*extra) if kw else {}),
        )

    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("wgs,wg_dim", [(1, "n"), (2, "n"), (2, "m")])
@pytest.mark.parametrize("mode", ["fp8", "fp8_swiglu", "bf16"])
def test_lowers_for_cuda(mode, wgs, wg_dim):
    """``lower(lowering_platforms=("cuda",))`` runs Mosaic GPU's layout inference and
    lowering on a CPU-only machine: catches layout, TMA box and shape errors in CI."""
    fp8 = mode.startswith("fp8")
    args = _operands(200, 256, 256, 4, dt=jnp.float8_e4m3fn if fp8 else jnp.bfloat16)
    n_w = 2 if "swiglu" in mode else 1
    cfg = TuningConfig(num_sms=132, num_compute_wgs=wgs, wg_dim=wg_dim)
    _assert_lowers_for_cuda(args, n_w, fp8, cfg)


@pytest.mark.parametrize("block_m,wgs,wg_dim", [(64, 1, "n"), (128, 2, "n"), (64, 2, "m")])
@pytest.mark.parametrize("fp8", [False, True])
def test_bias_and_activation_epilogue_lowers_for_cuda(fp8, block_m, wgs, wg_dim):
    """The one-weight epilogue (a per-column bias read from GMEM in the accumulator's column
    layout, then quick_gelu) lowers in every kernel variant, the vision MLP's 128 x 256 CTA
    included."""
    dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    args = (*_operands(272, 256, 512, 1, dt=dt), jax.ShapeDtypeStruct((512,), jnp.bfloat16))
    cfg = TuningConfig(block_m=block_m, num_sms=132, num_compute_wgs=wgs, wg_dim=wg_dim)
    kw = lambda b: dict(bias=b, activation="quick_gelu")  # noqa: E731
    _assert_lowers_for_cuda(args, 1, fp8, cfg, kw)


def test_epilogue_refuses_swiglu_and_unknown_activations():
    args = _operands(64, 256, 256, 1, dt=jnp.bfloat16)
    x, w, gs = (jnp.zeros(a.shape, a.dtype) for a in args[:3])
    cfg = TuningConfig(num_sms=132)
    with pytest.raises(ValueError, match="one weight"):
        mosaic_gpu.grouped_gemm_mgpu(x, (w, w), gs, config=cfg, activation="quick_gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        mosaic_gpu.grouped_gemm_mgpu(x, (w,), gs, config=cfg, activation="gelu")


@pytest.mark.parametrize("n_w", [1, 2])
def test_wide_row_tiles_lower_for_cuda(n_w):
    """128-row warpgroup tiles (a 256 x 128 CTA; `bench_dense_fp8.py`'s wide configs)."""
    args = _operands(m=256, k=256, n=256, g=2)
    cfg = TuningConfig(block_m=128, num_compute_wgs=2, wg_dim="m", num_sms=132)
    _assert_lowers_for_cuda(args, n_w, True, cfg)


def test_lowers_for_cuda_with_a_traced_pool_offset():
    """The in-place pool path (weights [P, N, K], groups at a traced offset) lowers too."""
    args = (*_operands(m=192, k=256, n=256, g=3, pool=9), jax.ShapeDtypeStruct((), jnp.int32))
    kw = lambda off: dict(group_offset=off)  # noqa: E731
    _assert_lowers_for_cuda(args, 2, True, TuningConfig(num_sms=132), kw)


@pytest.mark.parametrize("wgs,wg_dim", [(1, "n"), (2, "n"), (2, "m")])
@pytest.mark.parametrize("mode", ["fp8", "fp8_swiglu", "bf16"])
def test_dense_group_lowers_for_cuda(mode, wgs, wg_dim):
    """A dense group (the shared expert in the routed launch: its own [N_d, K_d] weights,
    N_d < N and K_d < K, rows after the routed ones) lowers in every kernel variant."""
    n_d, k_d = 256, 256
    fp8 = mode.startswith("fp8")
    dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    n_w = 2 if "swiglu" in mode else 1
    cfg = TuningConfig(num_sms=132, num_compute_wgs=wgs, wg_dim=wg_dim)
    args = (
        *_operands(200, 384, 512, 3, dt=dt),
        jax.ShapeDtypeStruct((n_d, k_d), dt),
        jax.ShapeDtypeStruct((n_d // 128, k_d // 128), jnp.float32),
    )

    def kw(wd, wds):
        dense = DenseGroup((wd,) * n_w, (wds,) * n_w if fp8 else (), row0=136, rows=64)
        return dict(zero_tail=False, dense=dense)

    _assert_lowers_for_cuda(args, n_w, fp8, cfg, kw)


@pytest.mark.parametrize("zero_tail", [True, False])
def test_tile_table_covers_every_row_once(zero_tail):
    """Tiles cover each grouped row exactly once, inside an 8-aligned in-bounds TMA box, with
    the right group; with zero_tail the remaining rows are covered by group -1 tiles."""
    rng = np.random.default_rng(0)
    m, bm, g = 400, 64, 7
    table = jax.jit(mosaic_gpu._tile_table, static_argnums=(1, 2, 3, 4))
    for trial in range(20):
        sizes = rng.integers(0, 90, g) * (rng.random(g) < 0.7)
        if trial == 0:
            sizes = np.array([0] * (g - 1) + [m])  # one group takes everything
        sizes = np.minimum(sizes, m - np.concatenate([[0], np.cumsum(sizes)[:-1]]).clip(0, m))
        max_tiles = -(-m // bm) + 2 * g + (-(-m // bm) if zero_tail else 0)
        tab = np.asarray(table(jnp.asarray(sizes, jnp.int32), m, bm, max_tiles, zero_tail))
        count = tab[4, 0]
        owner = np.full(m, -2)
        hits = np.zeros(m, int)
        for t in range(count):
            grp, row0, rows, box = tab[:4, t]
            assert box % 8 == 0 and 0 <= box <= m - bm
            if grp >= 0:
                assert box <= row0 and row0 + rows <= box + bm
            hits[row0 : row0 + rows] += 1
            owner[row0 : row0 + rows] = grp
        ends = np.cumsum(sizes)
        want_owner = np.searchsorted(ends, np.arange(m), side="right")
        total = ends[-1]
        assert np.all(hits[:total] == 1) and np.all(owner[:total] == want_owner[:total])
        assert np.all(hits[total:] == (1 if zero_tail else 0))
        if zero_tail:
            assert np.all(owner[total:] == -1)


def test_tuning_config_validation_and_tables():
    with pytest.raises(ValueError, match="block_m"):
        TuningConfig(block_m=96)
    with pytest.raises(ValueError, match="block_n"):
        TuningConfig(block_n=256)
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        TuningConfig(max_concurrent_steps=1)
    with pytest.raises(ValueError, match="wg_dim"):
        TuningConfig(wg_dim="k")
    small = tuned_config("NVIDIA H100 80GB HBM3", 768)
    large = tuned_config("NVIDIA H100 80GB HBM3", 24576)
    assert small.num_compute_wgs == 1 and large.num_compute_wgs == 2
    # H200 measured best with two warpgroups split along N at every M (moe_h200_tune.json).
    assert tuned_config("NVIDIA H200", 768) == large
    assert tuned_config("NVIDIA H200", 24576) == large
    assert tuned_config("cpu", 768) == TuningConfig()
    wide = TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="n")
    h100 = "NVIDIA H100 80GB HBM3"
    assert dense_config(h100, 2712, 15360, 1792, fp8=False) == wide  # the vision MLP's fc1
    # bf16 elsewhere: the grouped table (an N not a multiple of the 256-wide CTA, or small M)
    assert dense_config(h100, 1024, 384, 1792, fp8=False) == tuned_config(h100, 1024)
    assert dense_config(h100, 768, 15360, 1792, fp8=False) == small


def test_pipeline_depth_fits_smem():
    """The depth that was refused on the H100 (6 steps of the 2-warpgroup SwiGLU tile:
    264,288 > 232,448 bytes) is lowered; small tiles keep the requested depth."""
    assert mosaic_gpu._fit_steps(6, 64, 128, 2, True, out_bytes=16384) == 5
    assert mosaic_gpu._fit_steps(4, 64, 128, 1, True, out_bytes=16384) == 4
    assert mosaic_gpu._fit_steps(8, 64, 128, 1, True, out_bytes=16384) == 8


def test_dense_picks_are_the_measured_best():
    """At M = 256 and 512 `dense_config` picks, for every attention-half GEMM shape swept on
    the H100, a config within 3% of the fastest one measured
    (benchmarks/results/dense_fp8_h100_m256_cd0f7bd.json): the table follows its data."""
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    from benchmarks.bench_dense_fp8 import CONFIGS, SHAPES

    path = os.path.join(root, "benchmarks/results/dense_fp8_h100_m256_cd0f7bd.json")
    with open(path) as f:
        rows = json.load(f)["rows"]
    times: dict = {}
    for row in rows:
        if row.get("config") in CONFIGS and row.get("time_us"):
            times.setdefault((row["shape"]["m"], row["name"]), {})[row["config"]] = row["time_us"]
    assert len(times) == 10  # 5 shapes x M = 256, 512
    for (m, name), by_config in times.items():
        pick = dense_config("NVIDIA H100 80GB HBM3", m, *SHAPES[name])
        picked = [c for c, cfg in CONFIGS.items() if cfg == pick]
        assert picked, f"M={m} {name}: the pick {pick} was not swept"
        assert by_config[picked[0]] <= 1.03 * min(by_config.values()), (m, name, picked, by_config)


@pytest.mark.parametrize("zero_tail", [True, False])
def test_tile_table_host_equals_traced_and_has_no_loop(zero_tail):
    """Static (NumPy) group sizes build the table on the host; traced sizes build the same
    table bitwise, with compare-and-reduce ops only (no while loop: `searchsorted`'s default
    scan was ~6 small GPU kernels a call, no reduce-window cumsum)."""
    rng = np.random.default_rng(1)
    m, bm, g = 384, 64, 5
    max_tiles = -(-m // bm) + 2 * g + (-(-m // bm) if zero_tail else 0)
    traced = jax.jit(mosaic_gpu._tile_table, static_argnums=(1, 2, 3, 4, 5))
    for trial in range(12):
        sizes = (rng.integers(0, 100, g) * (rng.random(g) < 0.8)).astype(np.int32)
        if trial == 0:
            sizes = np.array([m] + [0] * (g - 1), np.int32)
        host = mosaic_gpu._tile_table(sizes, m, bm, max_tiles, zero_tail, (0, 3))
        assert isinstance(host, np.ndarray) and host.dtype == np.int32
        dev = traced(jnp.asarray(sizes), m, bm, max_tiles, zero_tail, (0, 3))
        np.testing.assert_array_equal(host, np.asarray(dev))
    hlo = traced.lower(jnp.asarray(sizes), m, bm, max_tiles, zero_tail, (0,)).as_text()
    assert "while" not in hlo and "reduce_window" not in hlo


def test_static_groups_build_the_tile_table_on_the_host(monkeypatch):
    """A dense GEMM (NumPy group sizes, no pool offset: `quant_model._project_pallas`) reaches
    the kernel with its tile table built on the host (a program constant); a traced offset or
    traced sizes keep the device table. Checked through `api._run` and the CUDA lowering."""
    from step3_jax.kernels.grouped_gemm import api

    assert api._static_groups(np.array([256], np.int32), None, 2) == ((256,), (0, 0))
    assert api._static_groups(np.array([3, 5]), (1, 4), 2) == ((3, 5), (1, 4))
    assert api._static_groups(jnp.array([256]), None, 1) is None
    assert api._static_groups(np.array([256]), jnp.int32(2), 1) is None
    built = []
    real = mosaic_gpu._tile_table
    monkeypatch.setattr(
        mosaic_gpu, "_tile_table", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    m, k, n = 256, 256, 256
    dt = jnp.float8_e4m3fn
    args = (
        jax.ShapeDtypeStruct((m, k), dt),
        (jax.ShapeDtypeStruct((1, n, k), dt),),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
        (jax.ShapeDtypeStruct((1, n // 128, k // 128), jnp.float32),),
        (jax.ShapeDtypeStruct((), jnp.int32),),
    )
    kw = dict(impl="pallas", config=dense_config("NVIDIA H100", m, n, k), zero_tail=True)
    for static, host in ((((m,), (0,)), True), (None, False)):
        text = api._run.trace(*args, **kw, static_groups=static).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in text.as_text()
        assert isinstance(built[-1], np.ndarray) == host
