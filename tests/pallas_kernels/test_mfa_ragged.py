"""MFA decode, issue 16 items 2 and 3 on CPU: the ragged work list and the shape-based split-K.

The Mosaic GPU CPU interpreter of jax 0.10.2 stops at ``run_state`` (the wgmma accumulators),
so the kernel itself runs only in the GPU suite (``TestPallasGPURagged``, ``test_forced_splits
_gpu``). Here: the work list as a pure function (every visible block exactly once), the
kernel's own per-row range arithmetic (``mosaic_gpu._item_range`` / ``_block_range``) driving
a float64 NumPy emulation of each CTA's partial, merged by the api's combines and checked
against the float32 oracle on ragged, NaN-padded caches; the split rule's picks; the CUDA
lowering of the new grids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.kernels.mfa_decode import TuningConfig, api, mfa_decode_reference, ragged
from step3_jax.kernels.mfa_decode import config as cfg_lib
from step3_jax.kernels.mfa_decode import mosaic_gpu as mg
from step3_jax.quant import dequantize_kv
from tests.pallas_kernels.test_mfa_decode import V_CONVERT_MEMORY, make_case

N, H, BS = 64, 256, 64
SMS = 132


def _plan(lengths, max_len, target=198, max_splits=4):
    work, start, count = ragged.plan_ragged_work(
        jnp.asarray(lengths, jnp.int32),
        max_len=max_len,
        block_s=BS,
        target=target,
        max_splits=max_splits,
    )
    return np.asarray(work), np.asarray(start), np.asarray(count)


@pytest.mark.parametrize(
    "b,max_len,target,max_splits",
    [(6, 512, 198, 4), (1, 32768, 198, 8), (128, 4096, 198, 4), (200, 2048, 132, 2),
     (37, 8192, 33, 64)],
)  # fmt: skip
def test_work_list_covers_every_visible_block_once(b, max_len, target, max_splits):
    rng = np.random.default_rng(b * 7 + max_splits)
    lengths = rng.integers(0, max_len + 200, b)  # some past the capacity, some empty
    lengths[0] = 0
    work, start, count = _plan(lengths, max_len, target, max_splits)
    assert work.shape == (ragged.num_items(b, target, max_splits), 3)
    live = work[:, 0] >= 0
    assert live.sum() <= target + b and (count <= max_splits).all()
    assert (work[~live] == [-1, 0, 0]).all()
    assert live[: live.sum()].all(), "unused rows come last"
    need = -(-np.clip(lengths, 0, max_len) // BS)
    tot = int(need.sum())
    cap = max(-(-tot // target), -(-int(need.max()) // max_splits), 1)
    for s in range(b):
        rows = work[start[s] : start[s] + count[s]]
        assert (rows[:, 0] == s).all() and (work[live, 0] == s).sum() == count[s]
        covered = np.concatenate([np.arange(f, f + n) for _, f, n in rows] or [np.zeros(0)])
        np.testing.assert_array_equal(covered, np.arange(need[s]))  # once each, in order
        assert (rows[:, 2] >= 1).all() and (rows[:, 2] <= cap).all()
        if count[s]:
            assert rows[:, 2].max() - rows[:, 2].min() <= 1  # near-equal pieces
    # Longest pieces first: each sequence's largest piece never grows along the list.
    largest = [work[start[s] : start[s] + count[s], 2].max() for s in np.argsort(start) if count[s]]
    assert all(a >= b_ for a, b_ in zip(largest, largest[1:], strict=False))


def test_balanced_batches_are_not_split():
    """With ``num_sms``: a full batch of B >= SMs keeps one piece a sequence (nothing to
    balance); lengths uniform in [S/2, S] get split (the longest is ~1.4x the even share)."""
    full = _plan_sms(np.full(128, 4096), 4096)
    assert (full[2] == 1).all() and (full[0][:128, 2] == 64).all()
    rng = np.random.default_rng(3)
    work, start, count = _plan_sms(rng.integers(2048, 4097, 128), 4096)
    assert count.max() == 2 and work[work[:, 0] >= 0, 2].max() <= 32


def _plan_sms(lengths, max_len):
    out = ragged.plan_ragged_work(
        jnp.asarray(lengths, jnp.int32), max_len=max_len, block_s=BS, target=198,
        max_splits=4, num_sms=SMS,
    )  # fmt: skip
    return tuple(np.asarray(x) for x in out)


def test_num_items_bounds():
    assert ragged.num_items(128, 198, 4) == 326
    assert ragged.num_items(1, 198, 8) == 8
    with pytest.raises(ValueError, match="max_splits"):
        ragged.num_items(4, 198, 0)
    with pytest.raises(ValueError, match="ragged_max_splits"):
        TuningConfig(ragged=True, ragged_max_splits=0)


def _partial(q, k, v, sm, lo, hi):
    """float64 attention of q [N, H] over keys lo..hi-1: (out [N, H], lse [N]); empty -> 0, -inf."""
    if hi <= lo:
        return np.zeros((N, H)), np.full(N, -np.inf)
    s = (q @ k[lo:hi].T) * sm
    m = s.max(axis=1, keepdims=True)
    p = np.exp(s - m)
    return (p @ v[lo:hi]) / p.sum(axis=1, keepdims=True), np.log(p.sum(axis=1)) + m[:, 0]


def _dense(case):
    q = np.asarray(case["q"], np.float64)
    if case.get("k_scale") is not None:
        k = np.asarray(dequantize_kv(case["k"], case["k_scale"]), np.float64)
        v = np.asarray(dequantize_kv(case["v"], case["v_scale"]), np.float64)
    else:
        k, v = np.asarray(case["k"], np.float64), np.asarray(case["v"], np.float64)
    return q, k, v


def _check_against_oracle(case, out, lse):
    ref, ref_lse = mfa_decode_reference(**case, return_lse=True)
    ref, ref_lse = np.asarray(ref, np.float32), np.asarray(ref_lse)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    # Partials in f64, one bf16 rounding of the merged output: 2^-9 relative, 2x margin.
    vmax = np.nanmax(np.abs(_dense(case)[2]))
    np.testing.assert_allclose(out, ref, atol=2.0**-8 * vmax, rtol=2.0**-8)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("fp8,t,max_splits", [(False, 1, 4), (True, 3, 2), (True, 8, 8)])
def test_ragged_emulation_matches_oracle(fp8, t, max_splits):
    """Each work row's partial over exactly the keys the kernel's ``_item_range`` gives that
    CTA (per query token: the causal tail of T > 1), merged by ``combine_ragged``."""
    lengths = [0, 1, 77, 512, 300, 64, t, 449]
    s_cap = 512
    case = make_case(20 + t, lengths, s_cap, t=t, fp8=fp8)
    q, k, v = _dense(case)
    work, start, count = _plan(lengths, s_cap, target=12, max_splits=max_splits)
    ks = mg.KernelShape(
        batch=len(lengths), t=t, max_len=s_cap, block_s=BS, num_stages=4, num_splits=1,
        fp8=fp8, paged=False, page_size=0, sm_scale=H**-0.5, out_dtype=jnp.float32,
        ragged_target=12, ragged_max_splits=max_splits,
    )  # fmt: skip
    outs = np.zeros((len(work), t, N, H))
    lses = np.full((len(work), t, N), -np.inf)
    for c, (b, first, n) in enumerate(work):
        if b < 0:
            outs[c] = np.nan  # unused rows: never read
            continue
        for tt in range(t):
            kv_end, f, my_n = (int(x) for x in mg._item_range(ks, lengths[b], tt, first, n))
            lo, hi = f * BS, min((f + my_n) * BS, kv_end)
            outs[c, tt], lses[c, tt] = _partial(q[b, tt], k[b], v[b], ks.sm_scale, lo, hi)
    out, lse = ragged.combine_ragged(
        jnp.asarray(outs, jnp.float32), jnp.asarray(lses, jnp.float32),
        jnp.asarray(start), jnp.asarray(count), max_splits,
    )  # fmt: skip
    _check_against_oracle(case, out, lse)


@pytest.mark.parametrize("splits", [1, 7, 16])
def test_forced_splits_emulation_matches_oracle(splits):
    """The (split, sequence) grid at forced split counts: ``_block_range`` per CTA, the
    partials merged by ``combine_splits`` (the api's split-K merge)."""
    t, s_cap, lengths = 2, 1024, [1000, 17, 2, 640]
    case = make_case(30 + splits, lengths, s_cap, t=t, fp8=True)
    q, k, v = _dense(case)
    ks = mg.KernelShape(
        batch=4, t=t, max_len=s_cap, block_s=BS, num_stages=4, num_splits=splits, fp8=True,
        paged=False, page_size=0, sm_scale=H**-0.5, out_dtype=jnp.float32,
    )  # fmt: skip
    outs = np.zeros((splits, 4, t, N, H))
    lses = np.full((splits, 4, t, N), -np.inf)
    for j in range(splits):
        for b in range(4):
            for tt in range(t):
                kv_end, f, my_n = (int(x) for x in mg._block_range(ks, lengths[b], tt, j))
                lo, hi = f * BS, min((f + my_n) * BS, kv_end)
                outs[j, b, tt], lses[j, b, tt] = _partial(q[b, tt], k[b], v[b], ks.sm_scale, lo, hi)
    out, lse = api.combine_splits(jnp.asarray(outs, jnp.float32), jnp.asarray(lses, jnp.float32))
    _check_against_oracle(case, out, lse)


# --- split-K from the shape (item 3) ---------------------------------------------------------

BATCHES, CONTEXTS = range(1, 9), (1024, 2048, 4096, 8192, 16384, 32768)
GUESS = cfg_lib.splitk.SplitCosts()  # the unfitted constants (the model's rule under test)


def test_auto_splits_small_batch_sense():
    picks = {
        (b, s): cfg_lib.choose_num_splits(b, s, BS, SMS, GUESS) for b in BATCHES for s in CONTEXTS
    }
    for (b, s), j in picks.items():
        assert 1 <= j <= s // BS and b * j <= SMS, (b, s, j)  # <= one block a split, one wave
        # Never a longer serial chain per CTA than under the old >= 512-token rule.
        old = cfg_lib.min_tokens_num_splits(b, s, BS, SMS)
        assert -(-s // BS // j) <= -(-s // BS // old), (b, s, j, old)
    for b in BATCHES:  # longer contexts never get fewer splits
        js = [picks[b, s] for s in CONTEXTS]
        assert js == sorted(js), (b, js)
    for s in CONTEXTS:  # more sequences never get more splits
        js = [picks[b, s] for b in BATCHES]
        assert js == sorted(js, reverse=True), (s, js)
    assert picks[1, 1024] == 16  # unfitted costs: one block per CTA at B=1, 1K


@pytest.mark.parametrize("b", [67, 100, 128, 256])
@pytest.mark.parametrize("s", [1024, 32768])
def test_auto_splits_large_batch_is_one(b, s):
    assert cfg_lib.choose_num_splits(b, s, BS, SMS, GUESS) == 1


def test_split_costs_table_per_device_family(monkeypatch):
    # Unfitted devices keep the measured min-tokens rule.
    assert cfg_lib.split_costs("cpu") is None and cfg_lib.split_costs("NVIDIA H200") is None
    assert cfg_lib.choose_num_splits(1, 4096, BS, SMS) == cfg_lib.min_tokens_num_splits(
        1, 4096, BS, SMS
    )
    cheap_combine = cfg_lib.splitk.SplitCosts(fixed=4.0, combine=0.0, combine_per_split=0.0)
    monkeypatch.setitem(cfg_lib.SPLIT_COSTS, "H200", cheap_combine)
    assert cfg_lib.split_costs("NVIDIA H200") is cheap_combine
    # No combine cost: split down to one block a CTA wherever one wave allows.
    assert cfg_lib.choose_num_splits(1, 4096, BS, SMS, cheap_combine) == 64


def test_api_uses_the_rule_and_keeps_explicit_splits():
    fp8 = jnp.float8_e4m3fn
    for b, s in ((1, 32768), (4, 4096), (128, 4096)):
        _, j, dt = api._resolve_config(None, fp8, b, s, None, SMS)
        assert j == cfg_lib.choose_num_splits(b, s, BS, SMS, cfg_lib.split_costs("cpu"))
        assert dt == (jnp.float32 if j > 1 else jnp.bfloat16)
    cfg = dataclasses.replace(V_CONVERT_MEMORY, num_splits=5)
    assert api._resolve_config(cfg, fp8, 1, 32768, None, SMS)[1] == 5
    rag = dataclasses.replace(V_CONVERT_MEMORY, ragged=True, num_splits=5)
    assert api._resolve_config(rag, fp8, 128, 4096, None, SMS)[1:] == (1, jnp.float32)


def test_work_list_rule_long_caches_many_sequences_fp8_measured_family():
    """Measured on an H100 (config.RAGGED_MIN_LEN): the work list pays from ~16K tokens with
    many sequences; short caches, few sequences, bf16 and unmeasured devices keep the grid."""
    h100, fp8, bf16 = "NVIDIA H100 80GB HBM3", jnp.float8_e4m3fn, jnp.bfloat16
    long, seqs = cfg_lib.RAGGED_MIN_LEN, cfg_lib.RAGGED_MIN_SEQS
    assert cfg_lib.use_ragged_work_list(h100, fp8, seqs, long)
    for kind, kv, b, s in (
        (h100, fp8, seqs, long // 2),
        (h100, fp8, seqs - 1, 2 * long),
        (h100, bf16, seqs, long),
        ("NVIDIA H200", fp8, seqs, long),
        ("cpu", fp8, seqs, long),
    ):
        assert not cfg_lib.use_ragged_work_list(kind, kv, b, s), (kind, kv, b, s)


def test_tuned_config_takes_the_work_list_where_the_rule_says(monkeypatch):
    here = cfg_lib.device_family(jax.devices()[0].device_kind)
    monkeypatch.setattr(cfg_lib, "RAGGED_FAMILIES", (here,))  # this device counts as measured
    fp8, long, seqs = jnp.float8_e4m3fn, cfg_lib.RAGGED_MIN_LEN, cfg_lib.RAGGED_MIN_SEQS
    cfg, j, dt = api._resolve_config(None, fp8, seqs, long, None, SMS)
    assert cfg.ragged and (j, dt) == (1, jnp.float32)
    assert api._resolve_config(None, fp8, seqs, long, 64, SMS)[0].ragged  # paged too
    # T = 2 query rows a sequence: the rule counts sequences, not rows.
    assert not api._resolve_config(None, fp8, seqs, long, None, SMS, num_seqs=seqs // 2)[0].ragged
    assert not api._resolve_config(None, fp8, seqs, long // 2, None, SMS)[0].ragged
    # An explicit config is the caller's: never switched.
    assert not api._resolve_config(V_CONVERT_MEMORY, fp8, seqs, long, None, SMS)[0].ragged


# --- CUDA lowering of the new grids (CPU host) ------------------------------------------------


@pytest.mark.parametrize(
    "fp8,t,paged,cfg,b,s_cap",
    [
        (True, 1, False, dataclasses.replace(V_CONVERT_MEMORY, ragged=True), 4, 1024),
        (True, 2, True, dataclasses.replace(V_CONVERT_MEMORY, ragged=True), 4, 1024),
        (False, 1, True, TuningConfig(num_stages=2, ragged=True, ragged_max_splits=2), 4, 1024),
        (True, 1, False, "guess", 1, 32768),  # cost-model split-K: J = 103 at B=1, 32K
    ],
)
def test_gpu_lowering_on_cpu_ragged_and_auto_splits(fp8, t, paged, cfg, b, s_cap):
    sd = jax.ShapeDtypeStruct
    page = 128
    dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    kv_shape = (b * s_cap // page, page, H) if paged else (b, s_cap, H)
    scale = sd(kv_shape[:2], jnp.float32) if fp8 else None
    table = sd((b, s_cap // page), jnp.int32) if paged else None
    q, kv, lengths = sd((b, t, N, H), jnp.bfloat16), sd(kv_shape, dt), sd((b,), jnp.int32)
    if cfg == "guess":  # the splits the cost model picks with the unfitted constants
        j = cfg_lib.choose_num_splits(b * t, s_cap, BS, SMS, GUESS)
        cfg = dataclasses.replace(V_CONVERT_MEMORY, num_splits=j)
    ks = api._kernel_shape(q, kv, lengths, table, H**-0.5, cfg, SMS)
    if not cfg.ragged:
        assert ks.num_splits == cfg.num_splits > 64
    else:
        assert ks.ragged_target == int(SMS * cfg.ragged_items_per_sm) and ks.num_splits == 1
    traced = api._pallas_jit.trace(ks, q, kv, kv, lengths, scale, scale, table)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text[:20000]


# --- Longest-first CTA order of the unsplit grid (B * T > SMs) ---------------------------------


def test_longest_first_order_is_the_stable_descending_sort():
    rng = np.random.default_rng(7)
    for b, s in ((1, 64), (200, 4096), (300, 512)):
        lengths = rng.integers(0, s + 1, b)
        lengths[: b // 4] = s  # ties (same block count) keep index order
        order = np.asarray(ragged.longest_first(jnp.asarray(lengths), max_len=s, block_s=BS))
        blocks = -(-np.clip(lengths, 0, s) // BS)
        np.testing.assert_array_equal(order, np.argsort(-blocks, kind="stable"))


def test_longest_first_rule_and_explicit_config():
    """On for an unsplit grid of more CTAs than SMs (the tuned config, contiguous or paged);
    off for one wave, split grids and the work list; an explicit True where it cannot apply
    is an error, an explicit False is kept."""
    sd, fp8 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn

    def shape(b, s=4096, cfg=None, t=1):
        q, kv = sd((b, t, N, H), jnp.bfloat16), sd((b, s, H), fp8)
        return api._kernel_shape(q, kv, sd((b,), jnp.int32), None, H**-0.5, cfg, SMS)

    assert shape(256).longest_first and shape(256).num_splits == 1
    assert shape(100, t=2).longest_first  # 200 CTAs
    assert not shape(SMS).longest_first and not shape(64).longest_first
    assert not shape(
        256, cfg=dataclasses.replace(V_CONVERT_MEMORY, longest_first=False)
    ).longest_first
    assert not shape(256, cfg=dataclasses.replace(V_CONVERT_MEMORY, ragged=True)).longest_first
    with pytest.raises(ValueError, match="longest_first=True needs an unsplit grid"):
        shape(8, cfg=dataclasses.replace(V_CONVERT_MEMORY, num_splits=4, longest_first=True))


@pytest.mark.parametrize("paged", [False, True])
def test_gpu_lowering_on_cpu_longest_first(paged):
    sd = jax.ShapeDtypeStruct
    b, s_cap, page = 200, 1024, 128
    kv_shape = (b * s_cap // page, page, H) if paged else (b, s_cap, H)
    table = sd((b, s_cap // page), jnp.int32) if paged else None
    q, kv = sd((b, 1, N, H), jnp.bfloat16), sd(kv_shape, jnp.float8_e4m3fn)
    scale, lengths = sd(kv_shape[:2], jnp.float32), sd((b,), jnp.int32)
    ks = api._kernel_shape(q, kv, lengths, table, H**-0.5, V_CONVERT_MEMORY, SMS)
    assert ks.longest_first and ks.num_splits == 1
    traced = api._pallas_jit.trace(ks, q, kv, kv, lengths, scale, scale, table)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()[:20000]
