"""AFD layouts, the role-arena memory layout, the pipeline schedule and the exchange rounds."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.config import Step3Config
from step3_jax.sharding.afd import AfdConfig, exchange_rounds, pipeline_schedule
from step3_jax.sharding.layer_state import split_width
from step3_jax.sharding.layout import (
    ALIGN,
    AfdLayout,
    ArenaDtypes,
    ArenaLayout,
    ffn_local_dims,
    kv_batch_that_fits,
)

FP8 = ArenaDtypes(weight="float8_e4m3fn", cache="float8_e4m3fn")
H200_BYTES = 141 * 10**9


@pytest.mark.multi_device  # builds meshes of 4 and 8 devices (8 fake CPU devices in CI)
def test_parse_and_device_count_errors():
    lay = AfdLayout.parse("2A6F", ffn_ep=2)
    assert (lay.num_attention, lay.ffn_ep, lay.ffn_tp, lay.num_devices) == (2, 2, 3, 8)
    assert lay.name == "2A6F"
    with pytest.raises(ValueError, match="xAyF"):
        AfdLayout.parse("2x6")
    with pytest.raises(ValueError, match="ffn_ep=4 must divide the 6 FFN"):
        AfdLayout.parse("2A6F", ffn_ep=4)
    with pytest.raises(ValueError, match="needs exactly 8 devices, got 4"):
        lay.afd_mesh(jax.devices()[:4])
    with pytest.raises(ValueError, match="ffn_ep=3 must divide num_experts=8"):
        AfdLayout.parse("1A3F").check_config(Step3Config.tiny())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: AfdLayout(1.5, 2), r"AfdLayout: num_attention must be an integer >= 1, got 1\.5"),
        (lambda: AfdLayout("1", 2), "AfdLayout: num_attention must be an integer >= 1, got '1'"),
        (
            lambda: ArenaLayout.build(
                Step3Config.tiny(), AfdLayout(1, 1), microbatch=-4, num_microbatches=1, max_len=64
            ),
            "ArenaLayout.build: microbatch must be an integer >= 1, got -4",
        ),
        (lambda: AfdConfig(1.5, 1, 64), "AfdConfig: microbatch must be an integer >= 1"),
        (  # zero micro-batches made every batch fit: the search never returned
            lambda: kv_batch_that_fits(
                Step3Config.tiny(),
                AfdLayout(1, 1),
                device_bytes=2**24,
                num_microbatches=0,
                max_len=64,
            ),  # fmt: skip
            "kv_batch_that_fits: num_microbatches must be an integer >= 1, got 0",
        ),
        (
            lambda: kv_batch_that_fits(
                Step3Config.tiny(),
                AfdLayout(1, 1),
                device_bytes=float("inf"),
                num_microbatches=1,
                max_len=64,
            ),  # fmt: skip
            "kv_batch_that_fits: device_bytes must be an integer >= 1, got inf",
        ),
    ],
)
def test_layout_sizes_are_checked(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_kv_batch_that_fits_is_the_largest_that_fits():
    cfg, lay = Step3Config.tiny(), AfdLayout(1, 1)
    kw = dict(num_microbatches=2, max_len=64)
    budget = ArenaLayout.build(cfg, lay, microbatch=5, **kw).bytes_per_device()
    best = kv_batch_that_fits(cfg, lay, device_bytes=budget, **kw)
    assert best >= 5
    more = ArenaLayout.build(cfg, lay, microbatch=best + 1, **kw).bytes_per_device()
    assert more > budget


@pytest.mark.multi_device
def test_meshes_have_role_named_axes():
    lay = AfdLayout.parse("2A6F", ffn_ep=2)
    devs = jax.devices()[:8]
    assert lay.attention_mesh(devs).axis_names == ("attn_dp",)
    f = lay.ffn_mesh(devs)
    assert f.axis_names == ("ffn_ep", "ffn_tp") and f.devices.shape == (2, 3)
    assert list(f.devices.flat) == devs[2:]
    assert [lay.ffn_coords(j) for j in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("role", ["attention", "ffn"])
def test_regions_aligned_disjoint_and_inside_arena(role):
    cfg = Step3Config.tiny()
    arena = ArenaLayout.build(
        cfg,
        AfdLayout.parse("2A6F", ffn_ep=2),
        microbatch=3,
        num_microbatches=2,
        max_len=64,
        dtypes=FP8,
    )
    regs = sorted(arena.role(role).values(), key=lambda r: (r.dtype, r.offset))
    for a, b in itertools.pairwise(regs):
        if a.dtype == b.dtype:
            assert a.end <= b.offset, (a.name, b.name)
    for r in regs:
        assert r.offset % ALIGN == 0 and r.end <= arena.sizes[r.dtype]


def test_tiny_region_shapes():
    cfg = Step3Config.tiny()
    lay = AfdLayout.parse("2A6F", ffn_ep=2)
    arena = ArenaLayout.build(cfg, lay, microbatch=3, num_microbatches=2, max_len=64)
    a, f = arena.attention, arena.ffn
    # Regions are named by the model's own parameter paths (no renamed tables).
    assert a["self_attn.wq"].shape == (4, 32, 64) and a["self_attn.wq"].count == 4
    assert a["ffn.router"].shape == (8, 128) and "ffn.gate_proj" not in a
    assert a["cache_k"].shape == (3, 64, 32) and a["cache_k"].count == 4 * 2
    # 8 experts over ep=2, F=96 over tp=3; shared F=96 and dense F=256 over all 6 (padded).
    assert f["moe/ffn.gate_proj"].shape == (4, 32, 128) and f["moe/ffn.gate_proj"].count == 2
    assert f["moe/ffn.gate_proj"].pooled and not f["dense/ffn.gate_proj"].pooled
    assert f["moe/ffn.shared_expert.down_proj"].shape == (128, 16)
    assert f["dense/ffn.gate_proj"].shape == (43, 128) and f["dense/ffn.gate_proj"].count == 2
    assert "moe/ffn.router" not in f
    assert ffn_local_dims(cfg, lay)["dense_f"] * 6 >= 256


def test_fp8_regions_carry_scales_and_fused_qkv():
    """FP8 weights: every linear gets a float32 ``:scale`` region; q/k/v fuse where the block
    rows concatenate exactly (Step-3), as `quantize_model` stores them."""
    cfg, lay = Step3Config.step3(), AfdLayout.parse("1A3F")
    arena = ArenaLayout.build(cfg, lay, microbatch=1, num_microbatches=1, max_len=128, dtypes=FP8)
    a, f = arena.attention, arena.ffn
    assert a["self_attn.qkv_proj"].shape == (2048 + 2 * 256, 7168)
    assert a["self_attn.qkv_proj:scale"].shape == (20, 56)
    assert a["self_attn.o_proj:scale"].shape == (56, 128)  # [D, N*H] blocks
    assert a["ffn.router"].dtype == "bfloat16" and "ffn.router:scale" not in a
    assert f["moe/ffn.gate_proj"].shape == (16, 5120, 7168)
    assert f["moe/ffn.gate_proj:scale"].shape == (16, 40, 56)


def test_full_step3_1a3f_fp8_memory_fits_with_small_waste():
    """Full Step-3 as 1A3F on 141 GB H200s, FP8 weights + FP8 KV cache, 4K context.

    The attention role gets a KV cache just below the FFN role's footprint, so both roles use
    nearly the whole arena; the naive two-role layout would need the sum (~2x) per device.
    """
    cfg, lay = Step3Config.step3(), AfdLayout.parse("1A3F")
    ffn_only = ArenaLayout.build(
        cfg, lay, microbatch=1, num_microbatches=3, max_len=4096, dtypes=FP8
    )
    ffn_bytes = ffn_only.used_bytes("ffn")
    # FFN device: 16 of 48 experts x 56 layers + 1/3 shared/dense ~ 101 GB of FP8 weights.
    assert 95e9 < ffn_bytes < 105e9

    def build(mb):
        return ArenaLayout.build(
            cfg, lay, microbatch=mb, num_microbatches=3, max_len=4096, dtypes=FP8
        )

    # The largest microbatch whose attention role fits the FFN role's footprint. Attention bytes
    # grow with mb, so bisect (~17 builds of the full model's layout instead of 225: 33 s -> 2.5 s).
    lo, hi = 1, 2
    while build(hi).used_bytes("attention") <= ffn_bytes:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if build(mid).used_bytes("attention") <= ffn_bytes else (lo, mid)
    mb = lo
    arena = build(mb)
    assert arena.used_bytes("attention") <= ffn_bytes < build(mb + 1).used_bytes("attention")
    assert arena.bytes_per_device() < H200_BYTES
    for role in ("attention", "ffn"):
        assert arena.waste_bytes(role) <= 0.10 * H200_BYTES, (role, arena.report())
    assert arena.naive_bytes_per_device() > 1.5 * arena.bytes_per_device()
    # KV for 3 x mb sequences of 4K tokens, 61 layers, 512 B + 8 B of scales per token-layer.
    kv = arena.attention["cache_k"].nbytes * 2 + arena.attention["cache_k_scale"].nbytes * 2
    assert kv == 3 * mb * 4096 * 61 * (512 + 8)
    assert 3 * mb >= 465  # 2,324 tok/s/GPU x 4 GPUs x 50 ms needs 465 sequences in flight


@pytest.mark.parametrize("layers,mbs", [(4, 1), (4, 2), (5, 3), (61, 3)])
def test_pipeline_schedule_respects_dependencies(layers, mbs):
    sched = pipeline_schedule(layers, mbs)
    attn, ffn = {}, {}
    for t, (a_ok, al, am, f_ok, fl, fm) in enumerate(sched):
        if a_ok:
            assert (al, am) not in attn
            attn[(al, am)] = t
            assert al == 0 or ffn[(al - 1, am)] < t  # previous layer's FFN result arrived
        else:
            assert am == mbs  # idle stages point at the trash slot
        if f_ok:
            assert attn[(fl, fm)] < t and (fl, fm) not in ffn
            ffn[(fl, fm)] = t
        else:
            assert fm == mbs
    assert len(attn) == len(ffn) == layers * mbs
    # M >= 2 keeps both roles busy: L*M + 1 ticks; M = 1 alternates: 2L ticks.
    assert len(sched) == (2 * layers if mbs == 1 else layers * mbs + 1)


@pytest.mark.parametrize("na,nf", [(1, 1), (1, 3), (2, 2), (2, 6), (3, 2)])
def test_exchange_rounds_are_matchings_covering_all_pairs(na, nf):
    rounds = exchange_rounds(na, nf)
    seen = [p for r in rounds for p in r]
    assert sorted(seen) == sorted(itertools.product(range(na), range(nf)))
    for r in rounds:
        assert len({a for a, _ in r}) == len(r) == len({f for _, f in r})
    assert len(rounds) == max(na, nf)
    assert np.all(np.array(seen) >= 0)


def test_transposed_v_arena_cache_matches_token_major():
    """`ArenaDtypes(v_transposed=True)`: cache_v items are V^T tiles [Bm, S/64, H, 64]; the
    masked in-place write stores exactly the token-major cache's bytes, tiled (an idle tick
    writes nothing), and both attention paths (in-place 64-token pages, XLA views) read the
    same result."""
    from step3_jax.cache import v_from_tiles
    from step3_jax.sharding import arena_io

    cfg = Step3Config.tiny()
    bm, s = 2, 128
    caches, outs = {}, {}
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((bm, 5, cfg.head_dim)), jnp.float32) for _ in "kv")
    pos = jnp.asarray([[0, 1, 2, 3, 4], [62, 63, 64, 65, 66]], jnp.int32)  # across a tile edge
    q = jnp.asarray(rng.standard_normal((bm, 1, cfg.num_heads, cfg.head_dim)), jnp.bfloat16)
    for vt in (False, True):
        dt = ArenaDtypes(weight="float8_e4m3fn", cache="float8_e4m3fn", v_transposed=vt)
        arena = ArenaLayout.build(
            cfg, AfdLayout.parse("1A1F"), microbatch=bm, num_microbatches=2, max_len=s, dtypes=dt
        )
        regs = arena.attention
        want = (bm, s // 64, cfg.head_dim, 64) if vt else (bm, s, cfg.head_dim)
        assert regs["cache_v"].shape == want
        zeros = {t: jnp.zeros((n // ALIGN, ALIGN), t) for t, n in arena.sizes.items()}
        idle = arena_io.ArenaKVCache(zeros, regs, 3, bm, False, vt).write(0, k, v, pos)
        for t in zeros:
            np.testing.assert_array_equal(
                np.asarray(idle.arenas[t], np.float32), np.asarray(zeros[t], np.float32)
            )
        cache = arena_io.ArenaKVCache(zeros, regs, 3, bm, True, vt).write(0, k, v, pos)
        # One scatter per arena dtype: the FP8 K and V values together, their scales together.
        write = lambda a, vt=vt, regs=regs: (
            arena_io.ArenaKVCache(a, regs, 3, bm, True, vt).write(0, k, v, pos).arenas
        )
        hlo = jax.jit(write).lower(zeros).compile().as_text()
        assert sum(" scatter(" in ln for ln in hlo.splitlines()) == 2
        caches[vt] = np.asarray(arena_io.view(cache.arenas, regs["cache_v"], 3), np.float32)
        qpos = jnp.asarray([[4], [66]], jnp.int32)
        outs[vt] = [
            np.asarray(cache.attend(0, q, qpos, impl), np.float32) for impl in ("xla", None)
        ]
    np.testing.assert_array_equal(np.asarray(v_from_tiles(caches[True])), caches[False])
    assert np.abs(caches[False]).sum() > 0
    for got, want in zip(outs[True], outs[False], strict=True):
        np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=2.0**-8 * np.abs(want).max())
    with pytest.raises(
        ValueError, match=r"ArenaDtypes\(cache='bfloat16'\): v_transposed=True needs an FP8"
    ):
        ArenaDtypes(v_transposed=True)


def test_ffn_splits_stay_fp8_gemm_shapes():
    """Step-3's shared expert (5120) over 3 FFN devices is 1792 wide, a multiple of 128 the
    Pallas FP8 GEMM takes (1707 fell back to XLA: ~90 us per layer on an H100); the slices
    cover the dimension, and a tiny model's narrow slices are not inflated."""
    cfg = Step3Config.step3()
    for name, y, shared in (("1A3F", 3, 1792), ("2A6F", 6, 896), ("1A1F", 1, 5120)):
        dims = ffn_local_dims(cfg, AfdLayout.parse(name))
        assert dims["shared_f"] == shared and dims["shared_f"] * y >= cfg.share_expert_dim
        assert dims["shared_f"] % 128 == 0 and dims["dense_f"] % 128 == 0
    assert split_width(256, 6) == 43 and split_width(96, 3) == 32
