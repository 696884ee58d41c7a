"""Issue 15, arguments and configs: every bad value is a named ValueError before any work.

Each case failed at b4ff9dc: "inf" strings passed the `> 0` checks, 10**8 layers ran for a
minute, NaN temperature emitted token 0, nested prompts were flattened, an absurd cache
aborted the interpreter, 100,000 prompts were OOM-killed, `--context 0` divided by zero.
"""

from __future__ import annotations

import json
import math
import time

import jax.numpy as jnp
import numpy as np
import pytest
from rel_fixtures import REFERENCE, build_model, random_tensors, tiny_config, write_checkpoint

import step3_jax as s3
from step3_jax.checkpoints import CheckpointFormatError, load_hf
from step3_jax.config import Step3Config
from step3_jax.engine.paged_cache import PagedKVCache

CFG = tiny_config()


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=1)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "key, value",
    [
        ("rms_norm_eps", "inf"),
        ("rope_theta", "inf"),
        ("rms_norm_eps", math.inf),  # json writes Infinity, which json.loads accepts
        ("rope_theta", math.nan),
        ("hidden_size", 3.7),  # int() used to truncate it silently
        ("vocab_size", True),
        ("moe_top_k", "2"),
    ],
)
def test_config_json_bad_value_names_file_and_key(tmp_path, key, value):
    write_checkpoint(tmp_path, CFG, random_tensors(CFG))
    hf = CFG.to_hf_config()
    hf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointFormatError, match=f"config.json.*{key}"):
        load_hf(tmp_path, policy=REFERENCE)


def test_huge_layer_count_fails_fast_before_allocating():
    hf = {**CFG.to_hf_config(), "num_hidden_layers": 10**8}
    hf.pop("moe_layers_enum")  # the default enum is range(4, L - 1): 10**8 ints
    start = time.perf_counter()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        Step3Config.from_hf_config(hf)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", math.inf),
        ("rope_theta", math.nan),
        ("hidden_size", 2.0),
        ("num_layers", 10**9),
        ("vocab_size", 2**40),
        ("num_experts", True),
        ("moe_layer_ids", (0.5,)),
    ],
)
def test_config_fields_are_typed_finite_and_bounded(field, value):
    kw = {f: getattr(CFG, f) for f in CFG.__dataclass_fields__}
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        Step3Config(**kw)


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": [0.5, math.nan]}, r"temperature\[1\]"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": [1.0, 0.0]}, r"top_p\[1\]"),
        ({"top_k": CFG.vocab_size + 1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": [1, 2, 3]}, "top_k"),  # 3 values for 2 prompts
        ({"stop_tokens": [CFG.vocab_size]}, "stop_tokens"),
        ({"stop_tokens": [1.5]}, "stop_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**63 - 1}, r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 2\]"),
        ({"seed": -(2**63) - 1}, "seed must be an integer in"),
        ({"stop_tokens": 5}, "stop_tokens must be a sequence of token ids"),
    ],
)
def test_generate_rejects_bad_sampling_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        s3.generate(model, [[1, 2], [3]], 4, **kwargs)


@pytest.mark.parametrize("max_new", [2.5, True, "3", -1, 0])
def test_generate_rejects_non_integral_max_new_tokens(model, max_new):
    with pytest.raises(ValueError, match="max_new_tokens"):
        s3.generate(model, [[1, 2]], max_new)


@pytest.mark.parametrize(
    "prompts", [[[[1, 2], [3, 4]]], [[1, [2, 3]]], [1, 2, 3], np.ones((1, 2, 2), np.int32)]
)
def test_generate_never_flattens_nested_prompts(model, prompts):
    with pytest.raises(ValueError, match="prompts"):
        s3.generate(model, prompts, 2)


def test_generate_refuses_an_oversized_batch_before_allocating(model):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="MAX_BATCH"):
        s3.generate(model, [[1, 2, 3]] * 100_000, 4)
    assert time.perf_counter() - start < 5


def test_cli_with_nan_temperature_exits_nonzero_with_a_message(capsys):
    from step3_jax import cli

    assert cli.main(["generate", "--temperature", "nan"]) == 2
    assert "temperature" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cache
@pytest.mark.parametrize(
    "args, match",
    [
        ((10**6, 10**6, 10**6, 256), "GiB"),
        ((2, 2, 2.5, 16), "max_len"),
        ((2, 0, 4, 16), "batch"),
        ((2, 1, 4, 16, jnp.int8), "dtype"),
        ((2, 1, 4, 16, jnp.float8_e5m2), "dtype"),
    ],
)
def test_kv_cache_validates_before_allocating(args, match):
    with pytest.raises(ValueError, match=match):
        s3.KVCache.create(*args)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10**4, 4, 10**6, 10**4, 8, 256), r"a \[L, P, page, H\] = .* GiB"),
        ((2, 2, 8, 4, 2.5, 16), "max_pages"),
        ((2, 0, 8, 4, 2, 16), "batch"),
        ((2, 2, 1, 4, 2, 16), "num_pages must be >= 2"),
        ((2, 2, 8, 4, 2, 16, jnp.int8), "dtype int8"),
        ((2, 2, 8, 4, 2, 16, "not a dtype"), "dtype="),
    ],
)
def test_paged_kv_cache_validates_before_allocating(args, match):
    """The engine's paged cache goes through the same checks as `KVCache` (sizes, dtype,
    free memory), with its own names in the message."""
    with pytest.raises(ValueError, match=f"PagedKVCache.create: {match}"):
        PagedKVCache.create(*args)


def test_decode_step_rejects_a_cache_of_another_model(model):
    step = s3.make_decode_step(model)
    other = s3.KVCache.create(CFG.num_layers + 1, 2, 8, CFG.head_dim, jnp.float32)
    with pytest.raises(ValueError, match="cache"):
        step(jnp.asarray([1, 2], jnp.int32), other)


# ----------------------------------------------------------------------------- cost CLI
@pytest.mark.parametrize(
    "argv",
    [
        ["tables", "--context", "0"],
        ["tables", "--context", "-4"],
        ["simulate", "--efficiency", "nan"],
        ["simulate", "--efficiency", "0"],
        ["simulate", "--tpot-ms", "-1"],
        ["simulate", "--kv-bytes", "inf"],
        ["simulate", "--micro-batches", "0"],
    ],
)
def test_cost_cli_rejects_zero_negative_and_nan(argv, capsys):
    from step3_jax.cost import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    assert code == 2
    assert "error: argument" in capsys.readouterr().err  # names the argument, no traceback


# ------------------------------------------------------------------ cost simulate --measured
@pytest.mark.parametrize(
    "doc, fragment",
    [
        ('{"attn_us_per_layer": NaN, "ffn_us_per_layer": 10, "num_layers": 2}', "got nan"),
        ('{"attn_us_per_layer": Infinity, "ffn_us_per_layer": 5, "num_layers": 2}', "got inf"),
        (
            '{"attn_us_per_layer": 0, "ffn_us_per_layer": 0, "num_layers": 2}',
            "all stage times are 0",
        ),
        ('{"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 100000000}', "num_layers"),
        (
            '{"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 2000, "micro_batches": 100000}',
            "num_layers",
        ),
        (
            '{"attn_us_per_layer": 5, "ffn_us_per_layer": 5, "num_layers": 20, "micro_batches": 100000}',
            "micro_batches",
        ),
    ],
    ids=["nan", "inf", "zeros", "1e8-layers", "huge-both", "1e5-micro-batches"],
)
def test_cost_simulate_measured_rejects_non_finite_zero_and_huge(capsys, tmp_path, doc, fragment):
    """Was: NaN/Infinity exit 0 with NaN results, all zeros exit 1 (ZeroDivisionError), huge
    counts ran for minutes. Now: exit 2, one line naming the file, the run and the field."""
    from step3_jax.cost import cli

    path = tmp_path / "afd.json"
    path.write_text(doc)
    start = time.perf_counter()
    assert cli.main(["simulate", "--measured", str(path)]) == 2
    assert time.perf_counter() - start < 5.0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert captured.out == "" and len(lines) == 1 and "Traceback" not in captured.err
    assert f"--measured {path}: run 0: " in lines[0] and fragment in lines[0]
