"""CPU-side checks of the Mosaic GPU kernel: the real GPU lowering, and the tile table."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_gemm import mosaic_gpu
from pallas_kernels.grouped_gemm.config import TuningConfig, tuned_config

pytestmark = pytest.mark.skipif(not mosaic_gpu.available(), reason="no Mosaic GPU Pallas API")


@pytest.mark.parametrize("wgs,wg_dim", [(1, "n"), (2, "n"), (2, "m")])
@pytest.mark.parametrize("mode", ["fp8", "fp8_swiglu", "bf16"])
def test_lowers_for_cuda(mode, wgs, wg_dim):
    """``lower(lowering_platforms=("cuda",))`` runs Mosaic GPU's layout inference and
    lowering on a CPU-only machine: catches layout, TMA box and shape errors in CI."""
    m, k, n, g = 200, 256, 256, 4
    fp8 = mode.startswith("fp8")
    dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    x = jax.ShapeDtypeStruct((m, k), dt)
    w = jax.ShapeDtypeStruct((g, n, k), dt)
    gs = jax.ShapeDtypeStruct((g,), jnp.int32)
    xs = jax.ShapeDtypeStruct((m, k // 128), jnp.float32)
    ws = jax.ShapeDtypeStruct((g, n // 128, k // 128), jnp.float32)
    n_w = 2 if "swiglu" in mode else 1
    cfg = TuningConfig(num_sms=132, num_compute_wgs=wgs, wg_dim=wg_dim)

    def f(x, w, gs, xs, ws):
        return mosaic_gpu.grouped_gemm_mgpu(
            x,
            (w,) * n_w,
            gs,
            x_scale=xs if fp8 else None,
            w_scales=(ws,) * n_w if fp8 else None,
            config=cfg,
        )

    text = jax.jit(f).trace(x, w, gs, xs, ws).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_lowers_for_cuda_with_a_traced_pool_offset():
    """The in-place pool path (weights [P, N, K], groups at a traced offset) lowers too."""
    m, k, n, g, p = 192, 256, 256, 3, 9
    dt = jnp.float8_e4m3fn
    args = (
        jax.ShapeDtypeStruct((m, k), dt),
        jax.ShapeDtypeStruct((p, n, k), dt),
        jax.ShapeDtypeStruct((g,), jnp.int32),
        jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((g, n // 128, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def f(x, w, gs, xs, ws, off):
        return mosaic_gpu.grouped_gemm_mgpu(
            x,
            (w, w),
            gs,
            x_scale=xs,
            w_scales=(ws, ws),
            config=TuningConfig(num_sms=132),
            group_offset=off,
        )

    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


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
    assert tuned_config("NVIDIA H200", 768) == small
    assert tuned_config("cpu", 768) == TuningConfig()


def test_pipeline_depth_fits_smem():
    """The depth that was refused on the H100 (6 steps of the 2-warpgroup SwiGLU tile:
    264,288 > 232,448 bytes) is lowered; small tiles keep the requested depth."""
    assert mosaic_gpu._fit_steps(6, 64, 128, 2, True, out_bytes=16384) == 5
    assert mosaic_gpu._fit_steps(4, 64, 128, 1, True, out_bytes=16384) == 4
    assert mosaic_gpu._fit_steps(8, 64, 128, 1, True, out_bytes=16384) == 8


# FP8 wgmma/promotion overlap (TuningConfig.overlap): lowering, and the wgmma wait it emits.
def _capture_mosaic_modules(monkeypatch):
    """Record the text of each Mosaic GPU module as it is serialized into the custom call
    (a private hook: returns None when this jax has moved it, and the text checks skip)."""
    try:
        from jax.experimental.mosaic.gpu import core as mgpu_core
    except ImportError:
        return None
    orig = getattr(mgpu_core, "_run_serde_pass", None)
    if orig is None:
        return None
    texts = []

    def spy(module, *, serialize, **kw):
        if serialize:
            texts.append(module.operation.get_asm(enable_debug_info=False))
        return orig(module, serialize=serialize, **kw)

    monkeypatch.setattr(mgpu_core, "_run_serde_pass", spy)
    return texts


def _lower_fp8(cfg: TuningConfig, n_w: int, k: int) -> str:
    m, n, g = 200, 256, 4
    dt = jnp.float8_e4m3fn
    args = (
        jax.ShapeDtypeStruct((m, k), dt),
        jax.ShapeDtypeStruct((g, n, k), dt),
        jax.ShapeDtypeStruct((g,), jnp.int32),
        jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((g, n // 128, k // 128), jnp.float32),
    )

    def f(x, w, gs, xs, ws):
        return mosaic_gpu.grouped_gemm_mgpu(
            x, (w,) * n_w, gs, x_scale=xs, w_scales=(ws,) * n_w, config=cfg
        )

    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _waits(text: str) -> set[int]:
    return {int(v) for v in re.findall(r"wgmma\.wait\.group\.sync\.aligned (\d+)", text)}


# K = 256: one "pairs" step / two "parity" steps; 1024: 4 / 8 steps (the SMEM ring wraps).
@pytest.mark.parametrize("k", [256, 1024])
@pytest.mark.parametrize("wgs,wg_dim", [(1, "n"), (2, "n"), (2, "m")])
@pytest.mark.parametrize("n_w", [1, 2], ids=["fp8", "fp8_swiglu"])
@pytest.mark.parametrize("mode", ["pairs", "parity"])
def test_overlap_lowers_and_keeps_one_k_block_in_flight(monkeypatch, mode, n_w, wgs, wg_dim, k):
    """Each overlap mode lowers for every kernel, and its promotion waits with
    ``wgmma.wait_group n_w`` (the n_w wgmma groups of the block just issued may still run),
    not 0; the plain variant of the same config only ever waits for 0."""
    texts = _capture_mosaic_modules(monkeypatch)
    cfg = TuningConfig(num_sms=132, num_compute_wgs=wgs, wg_dim=wg_dim, overlap=mode)
    assert "mosaic_gpu" in _lower_fp8(cfg, n_w, k)
    if texts is None:
        pytest.skip("no Mosaic GPU serialization hook to read the module text from")
    assert _waits(texts[-1]) == {0, n_w}
    if mode == "pairs" and wgs == 1 and k == 1024:  # one plain twin is enough
        _lower_fp8(dataclasses.replace(cfg, overlap="off"), n_w, k)
        assert _waits(texts[-1]) == {0}


def test_overlap_modes_with_odd_k_blocks_and_bf16(monkeypatch):
    """K = 384 (3 scale blocks) cannot be split into pairs: "pairs" runs the plain loop,
    "parity" still overlaps; bf16 (no promotion) never does."""
    texts = _capture_mosaic_modules(monkeypatch)
    x = jax.ShapeDtypeStruct((200, 384), jnp.float8_e4m3fn)
    w = jax.ShapeDtypeStruct((4, 256, 384), jnp.float8_e4m3fn)
    static = lambda mode, fp8=True: mosaic_gpu._make_static(
        x, (w,), 4, fp8, TuningConfig(overlap=mode), True
    )
    assert static("pairs").overlap == "off" and static("parity").overlap == "parity"
    assert static("parity", fp8=False).overlap == "off"
    for mode, want in (("pairs", {0}), ("parity", {0, 1})):
        _lower_fp8(TuningConfig(num_sms=132, overlap=mode), 1, 384)
        if texts is not None:
            assert _waits(texts[-1]) == want


def test_overlap_pipeline_depth_counts_pairs_of_k_blocks():
    """A "pairs" step holds two K blocks, so the SMEM fit halves the depth; the config
    rejects an unknown mode."""
    # 1 WG 64x128: 24,832 B per K block; 4 pairs = 198,656 B + 16,384 B staging fits.
    assert mosaic_gpu._fit_steps(4, 64, 128, 1, True, out_bytes=16384, k_blocks=2) == 4
    # 2 WG split N (64 x 256 CTA): 41,216 B per K block; only 2 pairs fit next to 32 KiB.
    assert mosaic_gpu._fit_steps(4, 64, 256, 1, True, out_bytes=32768, k_blocks=2) == 2
    with pytest.raises(ValueError, match="overlap"):
        TuningConfig(overlap=True)
