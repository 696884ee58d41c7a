"""scripts/train_demo.py refuses bad flags at parse time, before ~10 s of tokenizer training
(``--steps 10`` used to fail inside optax: "decay_steps=-90"; ``--seq-len 0`` divided by 0)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"


@pytest.fixture(scope="module")
def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "10"], "--warmup (100) must be below --steps (10)"),
        (["--seq-len", "0"], "argument --seq-len: expected a positive integer, got 0"),
        (["--eval-windows", "0"], "argument --eval-windows: expected a positive integer"),
        (["--holdout", "1.5"], "argument --holdout: expected a fraction in (0, 1), got '1.5'"),
        (["--holdout", "0"], "argument --holdout: expected a finite number > 0, got '0'"),
        (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    ],
)
def test_bad_flags_exit_2_with_one_message(train_demo, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        train_demo.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_and_a_short_run_parse(train_demo):
    assert train_demo.parse_args([]).steps == 1400
    short = train_demo.parse_args(["--steps", "10", "--warmup", "2"])
    assert (short.steps, short.warmup) == (10, 2)
