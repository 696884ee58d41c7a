"""The `step3-jax` command line: bad input gives one stderr line and exit code 2, never a
traceback; --debug / STEP3_JAX_DEBUG=1 bring the traceback back; `generate` reports compile
and decode time separately; `cost plots` writes where it is told (default ./step3_jax_figures).

Most tests call `main(argv)` in-process (fast); one runs the installed module in a subprocess,
as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from step3_jax import cli
from step3_jax.cli_common import UsageError
from step3_jax.cost import cli as cost_cli


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["generate", "--checkpoint", "/nonexistent/ckpt"], ["--checkpoint", "no such directory"]),
        (["generate", "--prompt", ""], ["--prompt", "empty"]),
        (["generate", "--prompt", "ok", "--prompt", "   "], ["--prompt number 2", "empty"]),
        (["generate", "--max-new-tokens", "0"], ["--max-new-tokens", "positive integer"]),
        (["generate", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["generate", "--temperature", "-0.1"], ["--temperature", ">= 0"]),
        (["generate", "--tokenizer", "x.json"], ["--tokenizer needs --checkpoint"]),
        (["generate", "--seed", str(2**70)], ["seed must be an integer in"]),
        (["serve", "--port", "70000"], ["--port", "a port in [1, 65535], got 70000"]),
        (["serve", "--shutdown-timeout", "inf"], ["--shutdown-timeout", "finite number"]),
        (["serve", "--shutdown-timeout", "1e10"], ["--shutdown-timeout", "expected at most"]),
        (["generate", "--temperature", "inf"], ["--temperature", "finite number"]),
        (
            ["chat", "--max-context", "8", "--no-compile-cache"],
            ["--max-context", "8-token context leaves no room for a reply"],
        ),
        (["info", "--config", "huge"], ["--config", "invalid choice"]),
        (["frobnicate"], ["invalid choice", "frobnicate"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragments):
    assert cli.main(argv) == 2
    _one_error_line(capsys, "step3-jax", *fragments)


def test_checkpoint_folder_without_config(capsys, tmp_path):
    assert cli.main(["generate", "--checkpoint", str(tmp_path)]) == 2
    _one_error_line(capsys, "no config.json")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["simulate", "--hardware", "TPUv9"], ["--hardware", "unknown hardware", "H800"]),
        (["simulate", "--ffn-hardware", "nope"], ["--ffn-hardware", "unknown hardware"]),
        (["tables", "--hardware", "H800", "TPUv9"], ["unknown hardware 'TPUv9'"]),
        (["simulate", "--layout", "2A"], ["--layout", "2A2F"]),
        (["simulate", "--context", "-4096"], ["--context", "positive integer", "-4096"]),
        (["tables", "--context", "0"], ["--context", "positive integer"]),
        (["simulate", "--batch", "1.5"], ["--batch", "positive integer", "1.5"]),
        (["simulate", "--batch", "many"], ["--batch", "positive integer"]),
        (["simulate", "--micro-batches", "0"], ["--micro-batches"]),
        (["simulate", "--efficiency", "1.2"], ["--efficiency", "(0, 1]"]),
        (["simulate", "--kv-bytes", "3"], ["--kv-bytes", "invalid choice"]),
        (["simulate", "--measured", "/nonexistent.json"], ["--measured", "no such file"]),
        (["simulat"], ["invalid choice", "simulat"]),
    ],
)
def test_cost_bad_input_is_one_line_and_exit_2(capsys, argv, fragments):
    assert cli.main(["cost", *argv]) == 2
    _one_error_line(capsys, "step3-jax cost: error:", *fragments)


def test_cost_bad_json_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "afd.json"
    path.write_text(json.dumps({"no_runs": 1}))
    assert cost_cli.main(["simulate", "--measured", str(path)]) == 2
    _one_error_line(capsys, str(path))


def test_debug_flag_and_env_show_the_exception(monkeypatch):
    with pytest.raises(UsageError, match="no such directory"):
        cli.main(["generate", "--checkpoint", "/nonexistent", "--debug"])
    with pytest.raises(UsageError, match="unknown hardware"):
        cli.main(["--debug", "cost", "simulate", "--hardware", "TPUv9"])
    monkeypatch.setenv("STEP3_JAX_DEBUG", "1")
    with pytest.raises(UsageError, match="positive integer"):
        cost_cli.main(["simulate", "--context", "-1"])
    monkeypatch.setenv("STEP3_JAX_DEBUG", "0")
    assert cost_cli.main(["simulate", "--context", "-1"]) == 2


def test_unexpected_error_is_one_line_exit_1(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setitem(
        cli.SUBCOMMANDS,
        "info",
        cli.SUBCOMMANDS["info"].__class__("info", "h", lambda p: None, boom),
    )
    assert cli.main(["info"]) == 1
    line = _one_error_line(capsys, "RuntimeError", "kernel exploded second line", "--debug")
    assert line.startswith("step3-jax: error:")


def test_subcommand_registration_is_one_function_and_one_decorator(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    def _hello_args(p):
        p.add_argument("--name", default="world", help="who to greet")

    @cli.subcommand("hello", "say hello", _hello_args)
    def cmd_hello(args):
        print(f"hello {args.name}")
        return 0

    assert cli.main(["hello", "--name", "Emma"]) == 0
    assert capsys.readouterr().out == "hello Emma\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "hello" in capsys.readouterr().out


class _FakeTokenizer:
    eos_id = None

    def encode(self, text):
        return [1, 2, 3][: len(text)]

    def decode(self, ids):
        return " tok" * len(ids)


def _fake_result(compile_seconds):
    res = types.SimpleNamespace(
        tokens=[[5, 6, 7, 8]],
        prefill_seconds=0.002,
        decode_seconds=0.003,
        decode_steps=3,
        decode_tokens_per_second=1000.0,
    )
    if compile_seconds is not None:
        res.compile_seconds = compile_seconds
    return res


@pytest.mark.parametrize("reported", [None, 4.5])
def test_generate_prints_compile_and_decode_separately(capsys, monkeypatch, reported):
    """Decode figures always come from a warm second call; compile time is the result's
    `compile_seconds` where reported, else first call - warm call."""
    import step3_jax.decode

    calls = []

    def fake_generate(model, ids, max_new_tokens, **kw):
        calls.append(ids)
        if reported is None and len(calls) == 1:  # first call: 2.5 s of compilation
            r = _fake_result(None)
            r.decode_seconds += 2.5
            return r
        return _fake_result(reported)

    monkeypatch.setattr(cli, "load_model", lambda args: (object(), _FakeTokenizer()))
    monkeypatch.setattr(step3_jax.decode, "generate", fake_generate)
    assert cli.main(["generate", "--prompt", "abc", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert ">>> abc tok tok tok tok" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["compile_s"] == (4.5 if reported else 2.5)
    assert len(calls) == 2
    assert summary["decode_tokens_per_s"] == 1000.0 and summary["decode_ms_per_step"] == 1.0
    assert f"compile: {summary['compile_s']} s" in out and "decode:  1000.0 tokens/s" in out


def test_cost_plots_default_out_is_under_the_current_dir(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["cost", "plots", "--hardware", "H800"]) == 0
    folder = tmp_path / cost_cli.DEFAULT_FIGURES_DIR
    assert sorted(p.name for p in folder.iterdir()) == [
        "afd_timeline.png",
        "cost_vs_context.png",
        "roofline.png",
    ]
    assert str(folder) in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    assert cli.main(["cost", "plots", "--out", str(tmp_path / "a_file")]) == 2
    _one_error_line(capsys, "--out", "not a folder")


def test_subprocess_empty_prompt_no_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("STEP3_JAX_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "step3_jax.cli", "generate", "--prompt", ""],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "--prompt" in proc.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ["Step-3", "generate", "info", "cost", "--debug"]),
        (["generate"], ["--max-new-tokens N", "0 means greedy", "(0, 1]", "--checkpoint DIR"]),
        (["cost", "simulate"], ["--layout xAyF", "H800, H20, A800, 910B", "--kv-bytes {1,2}"]),
        (["cost", "plots"], ["--out DIR", "./step3_jax_figures"]),
    ],
)
def test_help_names_every_flag_with_its_values(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in expected:
        assert text in out, (text, out)
