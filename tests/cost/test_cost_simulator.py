"""AFD pipeline simulator: closed-form regimes, bounds, the JSON loader and the paper runs."""

import json
import time

import numpy as np
import pytest

from step3_jax import cost
from step3_jax.cost import simulator as sim


def _times(L, a, af, f, fa, overhead=0.0):
    return sim.LayerTimes((a,) * L, (af,) * L, (f,) * L, (fa,) * L, overhead)


def test_one_micro_batch_is_fully_serial():
    # No overlap is possible with one micro-batch: TPOT = L * (sum of the four stages) + overhead.
    t = _times(61, 100e-6, 20e-6, 150e-6, 30e-6, overhead=500e-6)
    res = sim.simulate(t, 1)
    assert res.tpot_s == pytest.approx(61 * 300e-6 + 500e-6, rel=1e-12)


def test_bottleneck_regime_is_m_times_the_slowest_stage():
    # 3 micro-batches, A dominant and m * A >= the round trip: A is busy all the time, so each
    # layer costs exactly m * A in steady state and A's utilisation is 1.
    t = _times(10, 200e-6, 20e-6, 150e-6, 30e-6)
    res = sim.simulate(t, 3)
    assert res.tpot_s == pytest.approx(10 * 3 * 200e-6, rel=1e-12)
    assert res.busy["A"] == pytest.approx(1.0)
    # Latency-bound regime: with 2 micro-batches and four 150 us stages, one micro-batch's
    # round trip (600 us) exceeds 2 x 150 us of work per resource, so each layer costs 600 us.
    t2 = _times(10, 150e-6, 150e-6, 150e-6, 150e-6)
    assert sim.simulate(t2, 2).tpot_s == pytest.approx(10 * 600e-6, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_per_layer_times_stay_within_bounds(seed):
    rng = np.random.default_rng(seed)
    L, m = 12, int(rng.integers(1, 5))
    a, af, f, fa = (tuple(rng.uniform(10e-6, 300e-6, L)) for _ in range(4))
    res = sim.simulate(sim.LayerTimes(a, af, f, fa), m)
    per_layer_sum = np.array(a) + af + np.array(f) + fa
    # Lower bound: every resource must do m * its work; the chain must do its round trips.
    lower = max(m * sum(a), m * sum(af), m * sum(f), m * sum(fa), per_layer_sum.sum())
    upper = m * per_layer_sum.sum()  # no overlap at all
    assert lower * (1 - 1e-12) <= res.tpot_s <= upper * (1 + 1e-12)
    assert all(0 < b <= 1 + 1e-9 for b in res.busy.values())


def test_layer_times_validation():
    with pytest.raises(ValueError, match="one entry per layer"):
        sim.LayerTimes((1e-6,), (1e-6, 1e-6), (1e-6,), (1e-6,))
    with pytest.raises(ValueError, match=">= 0"):
        sim.LayerTimes((-1e-6,), (1e-6,), (1e-6,), (1e-6,))
    # NaN passed the `min(v) < 0` check: a NaN stage was then played as 0 s, inf gave NaN TPOT.
    with pytest.raises(
        ValueError, match="LayerTimes.ffn_s must be finite and >= 0 seconds, got nan"
    ):
        sim.LayerTimes((1e-6,), (1e-6,), (float("nan"),), (1e-6,))
    with pytest.raises(ValueError, match="LayerTimes.a2f_s must be finite.*got inf"):
        sim.LayerTimes((1e-6,), (float("inf"),), (1e-6,), (1e-6,))
    with pytest.raises(ValueError, match="step_overhead_s must be finite.*got nan"):
        sim.LayerTimes((1e-6,), (1e-6,), (1e-6,), (1e-6,), float("nan"))
    # All zero: a 0 s TPOT that every rate divided by (ZeroDivisionError in `simulate`).
    with pytest.raises(ValueError, match="all stage times are 0: nothing to simulate"):
        sim.LayerTimes((0.0,) * 3, (0.0,) * 3, (0.0,) * 3, (0.0,) * 3)
    overhead_only = sim.simulate(sim.LayerTimes((0.0,), (0.0,), (0.0,), (0.0,), 1e-3), 2)
    assert overhead_only.tpot_s == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="xAyF"):
        sim.AFDLayout.parse("2A")


def test_layout_parse_and_counts():
    lay = sim.AFDLayout.parse("3a2f")
    assert (lay.attn_gpus, lay.ffn_gpus, lay.total_gpus) == (24, 16, 40)


def _paper_setup(eff=1.0, layout="2A2F", ctx=4096):
    run = sim.PaperRun("x", layout, ctx, 1.0, 0.0)
    return sim.paper_setup(run, cost.H800, sim.Efficiency.uniform(eff))


def test_analytic_stage_times_match_hand_roofline():
    # 2A2F, 6144 sequences, 3 micro-batches: 128 sequences per attention GPU per micro-batch.
    setup = _paper_setup()
    t = sim.analytic_layer_times(setup, 6144)
    s = cost.get_model("Step-3")
    lin = s.attention[0].linear_params  # FP8 weights, memory-bound at 128 tokens
    kv = 128 * 4096 * 512
    assert t.attn_s[0] == pytest.approx((lin + kv) / 3.35e12, rel=1e-9)
    # A->F: 128 tokens x 2 FFN instances x (7168 FP8 + 56 fp32 scales + 3 x (id, weight)).
    assert t.a2f_s[0] == pytest.approx(10e-6 + 256 * (7168 + 224 + 24) / 400e9, rel=1e-9)
    assert t.f2a_s[0] == pytest.approx(10e-6 + 256 * 7168 * 2 / 400e9, rel=1e-9)
    # dense layer: 396M FP8 params over 16 GPUs, 2048 tokens -> compute 2*2048*396M/16/1.98e15
    dense = 3 * 7168 * 18432
    assert t.ffn_s[0] == pytest.approx(
        max(2 * 2048 * dense / 16 / 1.98e15, dense / 16 / 3.35e12), rel=1e-9
    )


def test_attention_efficiency_only_scales_the_attention_stage():
    import dataclasses

    base = _paper_setup()
    slow = dataclasses.replace(base, attn_efficiency=sim.Efficiency.uniform(0.5))
    t0, t1 = sim.analytic_layer_times(base, 6144), sim.analytic_layer_times(slow, 6144)
    assert t1.attn_s[0] == pytest.approx(2 * t0.attn_s[0], rel=1e-12)  # memory-bound: 1/eff
    assert t1.ffn_s == t0.ffn_s and t1.a2f_s == t0.a2f_s


def test_predict_respects_sla_and_memory():
    setup = _paper_setup(eff=0.5)
    p = sim.predict(setup, 0.050)
    assert p.tpot_s <= 0.050 and p.bound == "sla"
    unit = 3 * 16
    longer = sim.simulate(sim.analytic_layer_times(setup, p.batch + unit), 3)
    assert longer.tpot_s > 0.050  # the next feasible batch size would break the SLA
    loose = sim.predict(_paper_setup(eff=1.0), 1.0)  # 1 s SLA: only HBM limits the batch
    assert loose.bound == "memory" and loose.batch <= sim.max_batch_by_memory(_paper_setup())
    with pytest.raises(ValueError, match="no batch"):
        sim.predict(setup, 1e-3)
    # Step-3's ~304 GB of FFN weights (FP8) cannot sit on two 80 GB A800 FFN GPUs.
    assert sim.ffn_weight_bytes_per_gpu(setup) * 16 == pytest.approx(304e9, rel=0.01)
    one_ffn = sim.AFDSetup(setup.spec, sim.AFDLayout(1, 1, 2), 4096, 3, cost.A800)
    with pytest.raises(ValueError, match="FFN weights need"):
        sim.predict(one_ffn)


def test_paper_runs_single_calibration():
    # One uniform efficiency, fitted on the 2A2F FP8 run only, then reused unchanged.
    eta = sim.calibrate_uniform_efficiency(sim.PAPER_AFD_RUNS[0], cost.H800)
    assert 0.4 < eta < 0.6
    rows = {r["run"]: r for r in sim.paper_comparison(cost.H800, sim.Efficiency.uniform(eta))}
    assert abs(rows["2A2F 4K FP8 attention"]["rel_error"]) < 0.005
    # 8K FP8 (4A2F) is predicted within 5% (measured here: +1.9%).
    assert abs(rows["4A2F 8K FP8 attention"]["rel_error"]) < 0.05
    # BF16 attention is UNDER-predicted by ~27%: a pure-bandwidth model doubles attention time
    # with 2-byte KV; the paper's FP8 attention gains far less than 2x (docs/cost_model.md).
    assert -0.35 < rows["3A2F 4K BF16 attention"]["rel_error"] < -0.15


# ---------------------------------------------------------------- measured JSON
FIXTURE = {
    "device": "fixture",
    "jax_version": "0.0",
    "commit": "none",
    "date": "2026-11-22",
    "runs": [
        {
            "name": "scalar",
            "layout": "1A1F",
            "num_layers": 4,
            "micro_batches": 1,
            "batch": 128,
            "attn_us_per_layer": 100.0,
            "ffn_us_per_layer": 150.0,
            "transfer_us_per_layer": 25.0,
            "measured_step_ms": 1.25,
        },
        {
            "name": "lists",
            "micro_batches": 2,
            "attn_us_per_layer": [100.0, 120.0],
            "ffn_us_per_layer": [80.0, 90.0],
            "a2f_us_per_layer": [10.0, 10.0],
            "f2a_us_per_layer": [20.0, 20.0],
            "step_overhead_us": 50.0,
        },
    ],
}


def test_load_measured_fixture(tmp_path):
    path = tmp_path / "afd_fixture.json"
    path.write_text(json.dumps(FIXTURE))
    runs = sim.load_measured(path)
    assert [r.name for r in runs] == ["scalar", "lists"]
    assert runs[0].times.num_layers == 4 and runs[0].times.a2f_s[0] == pytest.approx(25e-6)
    cmp0 = sim.compare_measured(runs[0])
    # 4 layers x (100 + 25 + 150 + 25) us = 1.2 ms simulated vs 1.25 ms measured.
    assert cmp0["simulated_step_ms"] == pytest.approx(1.2)
    assert cmp0["rel_error"] == pytest.approx(1.2 / 1.25 - 1)
    assert cmp0["simulated_tokens_per_s_per_gpu"] == pytest.approx(128 / 1.2e-3 / 2)
    assert runs[1].times.step_overhead_s == pytest.approx(50e-6)
    assert sim.compare_measured(runs[1])["rel_error"] is None
    # a single run at top level is accepted too
    path.write_text(json.dumps(FIXTURE["runs"][0]))
    assert len(sim.load_measured(path)) == 1


@pytest.mark.parametrize(
    "run, match",
    [
        (
            '"attn_us_per_layer": NaN, "ffn_us_per_layer": 10, "num_layers": 2',
            "run 0: attn_us_per_layer must be finite and >= 0 microseconds, got nan",
        ),
        (
            '"attn_us_per_layer": 5, "ffn_us_per_layer": Infinity, "num_layers": 2',
            "run 0: ffn_us_per_layer must be finite.*got inf",
        ),
        (
            '"attn_us_per_layer": [5, NaN], "ffn_us_per_layer": [1, 2]',
            "run 0: attn_us_per_layer must be finite.*got nan",
        ),
        (
            '"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 2, "measured_step_ms": NaN',
            "run 0: measured_step_ms must be finite",
        ),
        (
            '"attn_us_per_layer": 0, "ffn_us_per_layer": 0, "num_layers": 2',
            "run 0: .*all stage times are 0: nothing to simulate",
        ),
        (
            '"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 100000000',
            r"run 0: num_layers must be an integer in \[1, 1000\], got 100000000",
        ),
        (
            '"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 2.5',
            r"run 0: num_layers must be an integer in \[1, 1000\], got 2.5",
        ),
        (
            '"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 2, "micro_batches": 100000',
            r"run 0: micro_batches must be an integer in \[1, 64\], got 100000",
        ),
        (
            '"attn_us_per_layer": [' + ", ".join(["5"] * 1001) + '], "ffn_us_per_layer": 5',
            "run 0: attn_us_per_layer must be a number or a list of 1 to 1000 ",
        ),
    ],
    ids=[
        "nan",
        "inf",
        "nan-in-list",
        "nan-measured",
        "zeros",
        "1e8-layers",
        "float-layers",
        "1e5-micro-batches",
        "list-too-long",
    ],
)
def test_load_measured_rejects_non_finite_zero_and_huge_runs(tmp_path, run, match):
    """json.loads accepts NaN and Infinity: they used to come out as NaN results (exit 0), all
    zeros as a ZeroDivisionError, and 10**8 layers or 10**5 micro-batches as a hang."""
    path = tmp_path / "run.json"
    path.write_text("{" + run + "}")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        sim.load_measured(path)
    assert time.perf_counter() - start < 5.0  # a hang guard, not a timing target


def test_a_run_without_stage_times_is_reported_not_simulated(tmp_path):
    """`bench_afd.py` writes null for stages it did not time: that run is reported as not
    simulated, and the file's other runs still are (NaN there is refused, as above)."""
    timed = {"name": "a", "num_layers": 2, "attn_us_per_layer": 10.0, "ffn_us_per_layer": 20.0}
    untimed = {"name": "b", "attn_us_per_layer": None, "ffn_us_per_layer": None,
               "transfer_us_per_layer": None, "measured_step_ms": 3.0}  # fmt: skip
    path = tmp_path / "afd.json"
    path.write_text(json.dumps({"runs": [timed, untimed]}))
    rows = [sim.compare_measured(r) for r in sim.load_measured(path)]
    assert rows[0]["simulated_step_ms"] > 0
    assert rows[1]["simulated_step_ms"] is None and rows[1]["measured_step_ms"] == 3.0
    assert "no stage times" in rows[1]["note"]


def test_load_measured_rejects_bad_runs(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"runs": [{"ffn_us_per_layer": 1.0}]}))
    with pytest.raises(ValueError, match="attn_us_per_layer"):
        sim.load_measured(path)
    path.write_text(json.dumps({"attn_us_per_layer": 1.0, "ffn_us_per_layer": 1.0}))
    with pytest.raises(ValueError, match="num_layers"):
        sim.load_measured(path)
