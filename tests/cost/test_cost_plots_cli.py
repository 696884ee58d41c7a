"""Plots are written and carry the expected lines; the CLI prints the paper's tables."""

import json

import pytest

from step3_jax import cost
from step3_jax.cost import cli, plots
from step3_jax.cost import simulator as sim


def test_roofline_plot(tmp_path):
    path = tmp_path / "roofline.png"
    models = ["Step-3", "DeepSeek-V3", "Qwen3-235B-A22B"]
    fig = plots.roofline(cost.PAPER_HARDWARE, models, path=path)
    # one roofline per accelerator + one dashed intensity line per model
    assert len(fig.axes[0].get_lines()) == len(cost.PAPER_HARDWARE) + len(models)
    assert path.stat().st_size > 20_000
    plots.close(fig)


def test_cost_vs_context_plot(tmp_path):
    path = tmp_path / "cost.png"
    fig = plots.cost_vs_context(cost.PAPER_HARDWARE, path=path, contexts=(4096, 8192, 32768))
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(cost.model_names())
    step3 = next(ln for ln in lines if ln.get_label() == "Step-3")
    # the plotted values are the AFD totals: 0.055 at 8K and 0.129 at 32K per 1M tokens
    assert [round(y, 3) for y in step3.get_ydata()[1:]] == [0.055, 0.129]
    assert path.stat().st_size > 20_000
    plots.close(fig)


def test_afd_timeline_plot(tmp_path):
    path = tmp_path / "timeline.png"
    t = sim.LayerTimes((100e-6,) * 4, (20e-6,) * 4, (80e-6,) * 4, (30e-6,) * 4)
    fig = plots.afd_timeline(sim.simulate(t, 3), layers=2, path=path)
    # 4 resources x 3 micro-batches x 2 layers bars
    assert len(fig.axes[0].collections) == 4 * 3 * 2
    assert path.stat().st_size > 10_000
    plots.close(fig)
    with pytest.raises(ValueError, match="no events"):
        plots.afd_timeline(sim.simulate(t, 3), layers=0)


def test_cli_tables_default(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    step3_line = next(ln for ln in out.splitlines() if ln.startswith("Step-3") and "|" in ln)
    assert "0.048" in step3_line and "0.055 (H20+H800)" in step3_line
    assert "S >= 0.058" in out


def test_cli_tables_json_other_context_and_hardware(capsys):
    assert cli.main(["tables", "--context", "32768", "--hardware", "H800", "B200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    step3 = next(r for r in data["costs_per_1m"] if r["model"] == "Step-3")
    assert round(step3["attention"]["H800"], 3) == 0.176
    assert set(step3["attention"]) == {"H800", "B200"}


def test_cli_simulate_and_measured(capsys, tmp_path):
    assert cli.main(["simulate", "--layout", "2A2F", "--efficiency", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tpot_ms"] <= 50.0 and out["tokens_per_s_per_gpu"] > 0
    path = tmp_path / "afd.json"
    path.write_text(
        json.dumps(
            {
                "runs": [
                    {
                        "num_layers": 2,
                        "attn_us_per_layer": 10.0,
                        "ffn_us_per_layer": 10.0,
                        "measured_step_ms": 0.05,
                    }
                ]
            }
        )
    )
    assert cli.main(["simulate", "--measured", str(path)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["simulated_step_ms"] == pytest.approx(0.04)


def test_cli_plots_and_errors(capsys, tmp_path):
    assert cli.main(["plots", "--out", str(tmp_path)]) == 0
    for name in ("roofline.png", "cost_vs_context.png", "afd_timeline.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert cli.main(["tables", "--hardware", "TPUv9"]) == 2
    assert "unknown hardware" in capsys.readouterr().err
