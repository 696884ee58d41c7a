"""The shape-based split-K cost model (pallas_kernels/mfa_decode/splitk.py), on CPU; the old
>= 512-token rule (``config.min_tokens_num_splits``) only to read the sweep taken under it."""

import json
import os

import numpy as np
import pytest

from step3_jax.kernels.mfa_decode import config as cfg_lib
from step3_jax.kernels.mfa_decode import splitk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COSTS = splitk.SplitCosts(fixed=5.0, combine=2.0, combine_per_split=0.1, block=1.5)


def test_predict_by_hand():
    # B=1, S=1024, J=4: 16 blocks -> 4 per CTA, 4 CTAs in one wave.
    assert splitk.predict_us(4, 1, 1024, 64, 132, COSTS) == pytest.approx(5 + 2 + 0.4 + 4 * 1.5)
    # No split: no combine. B=200 > 132 SMs: two waves of 16 blocks.
    assert splitk.predict_us(1, 200, 1024, 64, 132, COSTS) == pytest.approx(5 + 2 * 16 * 1.5)
    # Candidates: only those given, none above one block per split (16 blocks at 1K).
    assert splitk.choose_num_splits(1, 1024, 64, 132, COSTS, candidates=(1, 2)) == 2
    assert splitk.choose_num_splits(1, 1024, 64, 132, COSTS, candidates=(64, 128)) == 1
    with pytest.raises(ValueError, match="splits=0"):
        splitk.predict_us(0, 1, 1024, 64, 132, COSTS)
    with pytest.raises(ValueError, match="block"):
        splitk.SplitCosts(block=-1.0)


@pytest.mark.parametrize("b,s", [(1, 1024), (1, 32768), (4, 4096), (8, 32768), (64, 4096),
                                 (128, 4096), (256, 1024)])  # fmt: skip
def test_choice_is_the_brute_force_argmin(b, s):
    j = splitk.choose_num_splits(b, s, 64, 132, COSTS)
    times = [splitk.predict_us(k, b, s, 64, 132, COSTS) for k in range(1, s // 64 + 1)]
    assert times[j - 1] == pytest.approx(min(times))
    assert all(t > times[j - 1] + 1e-9 for t in times[: j - 1])  # ties go to fewer splits
    if b >= 132:
        assert j == 1  # a full wave already: splitting only adds a wave and the combine


def test_small_batches_use_shorter_splits_than_the_current_rule():
    # The current rule keeps >= 512 tokens a split (8 blocks a CTA at B=1); the model, with
    # any per-block cost well above the combine cost per split, spreads B=1 wider.
    for s in (1024, 4096, 32768):
        old = cfg_lib.min_tokens_num_splits(1, s, 64, 132)
        new = splitk.choose_num_splits(1, s, 64, 132)
        assert new > old
        assert splitk.predict_us(new, 1, s, 64, 132, splitk.SplitCosts()) < splitk.predict_us(
            old, 1, s, 64, 132, splitk.SplitCosts()
        )


def test_fit_recovers_known_costs():
    rng = np.random.default_rng(0)
    rows = []
    for b in (1, 2, 4, 8):
        for s in (1024, 4096, 32768):
            for j in (1, 2, 4, 8, 16, 32, 64):
                t = splitk.predict_us(j, b, s, 64, 132, COSTS) + 0.05 * rng.standard_normal()
                rows.append({"shape": {"B": b, "ctx": s}, "splits": j, "time_us": t})
    rows.append({"shape": {"B": 1, "ctx": 1024}, "error": "boom"})  # skipped
    fit = splitk.fit_costs(rows, num_sms=132)
    for name in ("fixed", "combine", "combine_per_split", "block"):
        assert getattr(fit, name) == pytest.approx(getattr(COSTS, name), rel=0.15, abs=0.05)
    with pytest.raises(ValueError, match="needs >= 4"):
        splitk.fit_costs(rows[:2], num_sms=132)


def test_defaults_match_the_recorded_h100_sweep():
    """The default constants against the 98b0a31 H100 sweep, B <= 8 (within 15%)."""
    path = os.path.join(ROOT, "benchmarks/results/mfa_decode_H100_sweep_98b0a31.json")
    rows = [r for r in json.load(open(path))["rows"] if r["impl"] == "pallas_fp8" and r["B"] <= 8]
    assert len(rows) == 8
    for r in rows:
        j = cfg_lib.min_tokens_num_splits(r["B"], r["ctx"], 64, 132)
        pred = splitk.predict_us(j, r["B"], r["ctx"], 64, 132, splitk.SplitCosts())
        assert pred == pytest.approx(r["us"], rel=0.15), (r, j, pred)


def test_sweep_report_on_synthetic_rows():
    rows = []
    for b in (1, 8):
        for s in (1024, 4096, 32768):
            shape = {"B": b, "ctx": s, "kv": "fp8"}
            auto = cfg_lib.min_tokens_num_splits(b, s, 64, 132)
            t = lambda j, b=b, s=s: splitk.predict_us(j, b, s, 64, 132, COSTS)  # noqa: E731
            rows.append({"name": "pallas_fp8", "shape": shape, "splits": auto, "time_us": t(auto)})
            rows.append({"name": "xla_fp8", "shape": shape, "time_us": 13.0})
            for j in (1, 2, 4, 8, 16, 32, 64):
                if j * 64 <= s:
                    rows.append({"name": f"pallas_fp8[splits={j}]", "shape": shape, "splits": j,
                                 "time_us": t(j)})  # fmt: skip
    rows.append({"name": "pallas_fp8[splits=2]", "shape": {"B": 1, "ctx": 1024}, "error": "x"})
    costs, table = splitk.sweep_report(rows, 132)
    assert costs.block == pytest.approx(COSTS.block, rel=1e-6)
    assert len(table) == 6 and all(r["xla_us"] == 13.0 for r in table)
    for r in table:  # noiseless rows: the model's pick is the fastest swept factor
        assert r["model_us"] == pytest.approx(r["best_us"])
        assert r["auto_us"] >= r["best_us"]


def test_h100_rule_never_slower_than_xla_on_the_measured_sweep():
    """Issue 16's small-batch target, held to the H100 forced-split sweeps (B = 1..8 at 1K, 4K,
    8K, 32K): at every shape where the XLA path was timed, the split factor the fitted H100
    rule picks (timed either as a forced split or as the rule's own row) is not slower."""
    names = ("splitk_partial_1841117", "splitk_partial_52e1d2f", "splitk_e26b5f2")
    rows = []
    for name in names:
        with open(os.path.join(ROOT, f"benchmarks/results/mfa_decode_H100_{name}.json")) as f:
            rows += [r for r in json.load(f)["rows"] if "time_us" in r and "error" not in r]
    costs = cfg_lib.SPLIT_COSTS["H100"]
    checked = 0
    for b, s in sorted({(r["shape"]["B"], r["shape"]["ctx"]) for r in rows}):
        at = [r for r in rows if (r["shape"]["B"], r["shape"]["ctx"]) == (b, s)]
        xla = [r["time_us"] for r in at if r["name"] == "xla_fp8"]
        pick = cfg_lib.choose_num_splits(b, s, 64, 132, costs)
        timed = [r["time_us"] for r in at
                 if r["name"].startswith("pallas_fp8") and r.get("splits") == pick]  # fmt: skip
        if not xla or not timed:
            continue
        assert min(timed) <= min(xla), (b, s, pick, timed, xla)
        checked += 1
    assert checked >= 12  # 13 shapes have both when this was written
