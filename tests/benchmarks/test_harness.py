"""The benchmark harness (CPU): row schema, the % of copy arithmetic, the timer on a function
of known cost, the results file, and that every benchmark script starts (--help) and one runs
end to end (--tiny)."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# `benchmarks` is a folder of the repository, not an installed package: import it from the root
# whether pytest runs as `python -m pytest` (root on sys.path) or as `pytest` (it is not).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402

SCRIPTS = [
    "bench_afd.py",
    "bench_attention_layer.py",
    "bench_decode.py",
    "bench_dense_fp8.py",
    "bench_engine_overhead.py",
    "bench_fp8_fidelity.py",
    "bench_mfa_decode.py",
    "bench_moe.py",
    "check_fp8_convert.py",
    "harness.py",
    "make_cost_plots.py",
    "profile_mfa_decode.py",
]
ROW_KEYS = {"name", "shape", "time_us", "host_us", "host_loop_us", "timer", "bytes", "flops",
            "GBps", "TFLOPs", "copy_GBps", "pct_of_copy"}  # fmt: skip


def _timing(us):
    return harness.Timing(time_us=us, host_us=us + 5, host_loop_us=us, timer="cupti", calls=10)


def test_row_math_and_schema():
    # 3 MB in 1.5 us = 2000 GB/s; 6e9 flop in 1.5 us = 4000 TFLOP/s; 2000 / 2500 = 80 %.
    row = harness.Row("r", {"B": 2}, _timing(1.5), bytes=3_000_000, flops=6_000_000_000,
                      copy_GBps=2500.0, extra={"impl": "x"})  # fmt: skip
    d = row.to_dict()
    assert ROW_KEYS <= set(d) and d["impl"] == "x" and d["shape"] == {"B": 2}
    assert d["GBps"] == pytest.approx(2000.0)
    assert d["TFLOPs"] == pytest.approx(4000.0)
    assert d["pct_of_copy"] == pytest.approx(80.0)
    assert harness.pct_of_copy(4250.0, 4250.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="copy rate"):
        harness.pct_of_copy(1.0, 0.0)
    with pytest.raises(ValueError, match="overwrite"):
        harness.Row("r", {}, _timing(1.0), extra={"GBps": 1}).to_dict()
    assert harness.Row("r", {}, _timing(1.0), bytes=10).to_dict()["pct_of_copy"] is None


def test_num_sets_exceeds_l2():
    assert harness.num_sets(harness.ROTATE_BYTES) == 1
    assert harness.num_sets(harness.ROTATE_BYTES // 3 + 1) == 3
    assert harness.num_sets(1) == harness.MAX_SETS
    with pytest.raises(ValueError, match="nbytes_per_set"):
        harness.num_sets(0)


def test_time_calls_measures_a_known_delay_and_rotates_sets():
    seen = []

    def f(i):
        seen.append(i)
        time.sleep(0.002)
        return jnp.zeros(())

    t = harness.time_calls(f, [(0,), (1,), (2,)], reps=4, warmup=1)
    assert t.timer == "host_loop" and t.calls == 6  # rounded up to whole passes over 3 sets
    assert 2000 <= t.host_us < 50_000 and 2000 <= t.time_us < 50_000
    assert seen[1:] == [0, 1, 2, 3 % 3, 4 % 3, 5 % 3] * 2  # blocked pass, then loop pass
    with pytest.raises(ValueError, match="at least one"):
        harness.time_calls(f, [])


def test_copy_probe_and_results_file(tmp_path):
    probe = harness.copy_probe()
    assert probe is harness.copy_probe()  # cached: one probe per process
    ok = {k: v for k, v in probe["candidates"].items() if isinstance(v, float)}
    assert probe["GBps"] == max(ok.values()) > 0 and probe["best"] in ok
    x = jax.random.normal(jax.random.key(0), (1 << 16,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    row = harness.measure(f, [(x,)], bytes=2 * x.nbytes, name="double", shape={"n": x.size},
                          reps=3, tag="t")  # fmt: skip
    assert row.copy_GBps == probe["GBps"] and row.extra == {"tag": "t"}
    path = tmp_path / "sub" / "r.json"
    doc = harness.write_results(str(path), [row, {"name": "bad", "error": "E"}], bench="unit",
                                note="n")  # fmt: skip
    back = json.loads(path.read_text())
    assert back == json.loads(json.dumps(doc))
    for key in ("schema", "bench", "device", "jax", "jaxlib", "flax", "python", "commit", "date",
                "copy_GBps", "copy_probe", "timer_note", "rows", "note"):  # fmt: skip
        assert key in back, key
    assert ROW_KEYS <= set(back["rows"][0]) and back["rows"][1]["error"] == "E"
    r0 = back["rows"][0]
    want = 100 * r0["bytes"] / r0["time_us"] / 1e3 / back["copy_GBps"]
    assert r0["pct_of_copy"] == pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="overwrite"):
        harness.results("unit", [], device="x")


def test_finish_writes_atomically_and_prints_the_summary_last(tmp_path, capsys):
    path = tmp_path / "out" / "r.json"
    doc = harness.finish("unit", [{"name": "a", "time_us": 1.0}], str(path), copy=False, n=3)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "unit" and last["n"] == 3 and "rows" not in last
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left
    # a document that cannot be written leaves the earlier file as it was, and no temporary
    with pytest.raises(TypeError):
        harness.finish("unit", [{"name": "b", "bad": object()}], str(path), copy=False)
    assert json.loads(path.read_text())["rows"][0]["name"] == "a"
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_cublas_calls_reads_result_type_and_epilogue():
    """The optimized-HLO form of XLA's cuBLAS calls (one instruction a line): a tuple result
    with a bias epilogue, a plain result without one, and a non-cuBLAS custom call skipped."""
    cfg = '{"gemm_backend_config":{"alpha_real":1,"epilogue":"%s","beta":0}}'
    hlo = "\n".join([
        '  %custom-call.3 = (bf16[2712,15360]{1,0}, s8[4194304]{0}) custom-call(%a, %b, %c), '
        f'custom_call_target="__cublas$lt$matmul", backend_config={cfg % "BIAS"}',
        '  %custom-call.4 = f32[256,48]{1,0} custom-call(%x, %w), '
        'custom_call_target="__cublas$gemm", backend_config={"operation_queue_id":"0"}',
        '  %custom-call.5 = bf16[8]{0} custom-call(%x), custom_call_target="__cudnn$fmha"',
    ])  # fmt: skip
    assert harness.cublas_calls(hlo) == [
        {"target": "__cublas$lt$matmul", "result": "(bf16[2712,15360]{1,0}, s8[4194304]{0})",
         "epilogue": "BIAS"},
        {"target": "__cublas$gemm", "result": "f32[256,48]{1,0}", "epilogue": None},
    ]  # fmt: skip


def _run(args, timeout):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# One interpreter runs every script's --help in turn, so jax is imported once, not once per
# script (12 processes: ~20 s on 2 cores). Each script still starts as `python3 benchmarks/x.py
# --help` would: run as __main__ from its path, its own argv, sys.path and environment as the
# interpreter started, and no `benchmarks.*` module an earlier script imported (that folder is
# not installed: a script must make it importable itself). Installed packages (jax, step3_jax)
# stay imported: a fresh interpreter finds the same ones.
HELP_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
start_path, start_env = list(sys.path), dict(os.environ)
for script in sys.argv[1:]:
    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + start_path[1:]
    os.environ.clear()
    os.environ.update(start_env)
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    out, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        code = traceback.format_exc()
    print(json.dumps([script, code, out.getvalue()]), flush=True)
"""


@pytest.mark.slow
def test_every_script_help():
    """Each script imports and parses --help when run as `python3 benchmarks/x.py`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    paths = [f"benchmarks/{s}" for s in SCRIPTS]
    res = subprocess.run([sys.executable, "-c", HELP_DRIVER, *paths], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("[")]
    assert [r[0] for r in results] == paths, res.stdout[-3000:] + res.stderr[-3000:]
    for script, code, out in results:
        assert code in (0, None) and "usage" in out, (script, code, out[-2000:])


@pytest.mark.slow
def test_mfa_tiny_run_last_line_is_json(tmp_path):
    res = _run(["benchmarks/bench_mfa_decode.py", "--tiny", "--out", str(tmp_path)], 300)
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["schema"] == harness.SCHEMA and last["bench"] == "mfa_decode"
    (path,) = tmp_path.glob("mfa_decode_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["name"] for r in rows} == {"xla_fp8", "xla_bf16"}
    assert all(r["time_us"] > 0 and r["bytes"] > 0 for r in rows)


class _FakeCupti:
    """Stands in for Mosaic GPU's CUPTI hooks: each call 'launches' two kernels (ms)."""

    def __init__(self):
        self.inits = 0

    def _cupti_init(self):
        self.inits += 1

    def _cupti_get_timings(self, finalize):
        assert finalize
        return [("fusion_1", 0.002), ("mosaic_kernel", 0.0035)]


def test_device_time_sums_kernels_in_us(monkeypatch):
    fake = _FakeCupti()
    monkeypatch.setattr(harness, "_cupti_ext", lambda: fake)
    t = harness.time_calls(lambda: jnp.ones(()), reps=3, warmup=0)
    assert t.timer == "cupti" and t.time_us == pytest.approx(5.5) and fake.inits == 3
    assert t.host_us > 0 and t.host_loop_us > 0  # host times still beside it
    assert harness.kernel_times(lambda: jnp.ones(())) == [("fusion_1", 2.0), ("mosaic_kernel", 3.5)]
    off = harness.time_calls(lambda: jnp.ones(()), reps=2, warmup=0, device_time=False)
    assert off.timer == "host_loop" and fake.inits == 4  # kernel_times: one more; off: none


def test_cupti_sum_far_below_the_host_loop_falls_back(monkeypatch):
    """A CUPTI sum (5.5 us) that cannot be the device time of a call whose back-to-back loop
    takes ~3 ms (CUPTI missed kernels) gives way to the host loop time, labelled as such."""
    monkeypatch.setattr(harness, "_cupti_ext", lambda: _FakeCupti())
    slow = lambda: (time.sleep(0.003), jnp.ones(()))[1]
    t = harness.time_calls(slow, reps=3, warmup=0)
    assert t.timer == "host_loop_cupti_partial" and t.time_us == t.host_loop_us >= 3000
    assert harness.cupti_missed_kernels(7_100, 54_600)
    assert not harness.cupti_missed_kernels(105, 118)  # launch gaps of a short kernel: kept
    assert not harness.cupti_missed_kernels(2_000, 2_900)  # under half, but < 1 ms missing


def test_op_scope_reads_the_hlo_op_back_to_the_model_scope():
    """A profile's kernels map back to the model's name scopes through the program's HLO."""
    import step3_jax as s3
    from step3_jax.cache import KVCache
    from step3_jax.model import DecoderLayer

    class Event:
        def __init__(self, stats):
            self.stats = stats

    cfg = s3.Step3Config.tiny()
    layer = DecoderLayer(cfg, 0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    cache = KVCache.create(cfg.num_layers, 2, 16, cfg.head_dim, dtype=jnp.float32)
    x = jnp.ones((2, 1, cfg.hidden_size), jnp.float32)
    pos = jnp.zeros((2, 1), jnp.int32)
    run = nnx.jit(lambda layer, x, cache: layer.attention_half(x, pos, cache)[0])
    names = harness.hlo_op_scopes(run.lower(layer, x, cache).compile().as_text())
    assert {"input_norm", "qkv_proj", "rope", "kv_write", "o_proj"} <= set(names.values())
    fusion = next(op for op, scope in names.items() if scope == "o_proj")
    assert harness.op_scope(Event([("hlo_op", fusion)]), names) == "o_proj"
    assert harness.op_scope(Event([("hlo_op", "fusion.999")]), names) == "fusion.999"
    assert harness.op_scope(Event([("hlo_op", fusion)])) == fusion  # no HLO given
    assert harness.op_scope(Event([])) == "?"  # e.g. a memcpy
    assert harness.op_scope(object()) == "?"


def test_attention_role_bytes_do_not_depend_on_the_v_layout():
    """The attention role's byte count reads each cache region per token: a transposed V cache
    ([Bm, S/64, H, 64] items) moves the same bytes as the token-major one, K and V e4m3 rows
    of head_dim bytes plus one f32 scale each per token per layer (the H200 run of commit
    a149518 counted 64x the V bytes from the trailing dims)."""
    from benchmarks import bench_afd
    from step3_jax.sharding.afd import AfdConfig, AfdExecutor
    from step3_jax.sharding.layout import AfdLayout, ArenaDtypes

    cfg = bench_afd.bench_config(2, tiny=True)
    layout = AfdLayout.parse("1A1F")
    pos = np.array([[5], [63]], np.int32)
    got = []
    for v_t in (False, True):
        dtypes = ArenaDtypes(weight="float8_e4m3fn", cache="float8_e4m3fn", v_transposed=v_t)
        ex = AfdExecutor(cfg, layout, jax.devices()[:1], AfdConfig(2, 1, 128), dtypes=dtypes,
                         role="attention")  # fmt: skip
        got.append(bench_afd.attention_role_bytes(ex, pos))
        kv = got[-1] - bench_afd.attention_role_bytes(ex, 0 * pos)
        assert kv == (5 + 63) * cfg.num_layers * 2 * (cfg.head_dim + 4), v_t
    assert got[0] == got[1]


def test_memory_gib_is_none_without_allocator_statistics():
    """The CPU backend keeps no allocator statistics: the rows say so (None), not zeros."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only check")
    assert harness.memory_gib() is None


def test_commit_provenance(monkeypatch):
    """`GIT_COMMIT` wins; without it the repository's HEAD, marked ``+dirty`` exactly when
    tracked files differ from it (a tree laid over an older HEAD must not pass as that HEAD)."""
    import subprocess

    from benchmarks import provenance

    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"
    monkeypatch.delenv("GIT_COMMIT")
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    git = lambda *a: subprocess.run(["git", *a], cwd=provenance.ROOT, capture_output=True,
                                    text=True).stdout.strip()  # fmt: skip
    head = git("rev-parse", "HEAD")
    if not head:
        pytest.skip("not a git checkout")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    assert provenance.git_commit() == head + ("+dirty" if dirty else "")
