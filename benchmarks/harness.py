"""One measuring stick for every benchmark: copy probe, timer, row schema, results file.

Every script under ``benchmarks/`` times through :func:`measure` and writes through
:func:`write_results`, so their numbers share one denominator and one clock:

* **Copy probe** (:func:`copy_probe`, cached per process): the best of the ways the device can
  copy a large buffer (2 GiB on GPU, 32 MiB elsewhere), counted as read + write bytes:
  a jitted XLA elementwise kernel (``x + 1``) and a jitted ``jnp.copy`` timed with
  :func:`measure`, and on GPU torch's ``Tensor.copy_`` timed with CUDA events when torch is
  importable (a device-to-device ``cudaMemcpy``, which CUPTI's kernel records do not see). The
  fastest candidate is ``copy_GBps``; all of them are recorded. A probe that reads lower than a
  plain copy overstates every "% of copy" (an H200 ``x + 1`` timed from the host read 3.17 TB/s
  against 4.25 TB/s for ``copy_``, so a bf16 decode step reported 116 % of copy).
* **Timer** (:func:`measure`): on GPU the device time of each call from CUPTI through Mosaic GPU's
  hooks (``jax.experimental.mosaic.gpu.profiler``'s extension: the sum of the durations of every
  kernel the call launches, XLA's and Pallas's alike; gaps between kernels are not counted),
  median over the timed calls. Off GPU, or where CUPTI sees no kernel, the device time falls
  back to the host loop time below, and so does a CUPTI sum under half the host loop time
  (:func:`cupti_missed_kernels`; ``timer`` says which). Beside it, always, two host
  wall-clock times: ``host_us``, the median of calls each followed by ``block_until_ready``
  (launch + sync latency included: what one synchronous step costs), and ``host_loop_us``,
  calls enqueued back to back with one sync at the end, per call (what a pipelined loop costs).
  Warm-up calls come first; the calls rotate over input sets whose bytes exceed
  :data:`ROTATE_BYTES` so that no call finds its inputs in L2 (:func:`num_sets`).
* **Schema** (:class:`Row`, :func:`results`): ``{"schema", "bench", device, versions, commit,
  date, "copy_GBps", "copy_probe", "timer_note", "rows": [...], extras}``; each row has
  ``name, shape, time_us, host_us, host_loop_us, timer, bytes, flops, GBps, TFLOPs, copy_GBps,
  pct_of_copy`` plus the benchmark's own fields. ``GBps`` is bytes / ``time_us``; ``pct_of_copy``
  is ``100 * GBps / copy_GBps`` (the benchmark's bytes are what it must move; the copy's are its
  read + write).

    from benchmarks import harness
    row = harness.measure(jax.jit(f), [(x,) for x in sets], bytes=nbytes, name="f", shape={...})
    harness.write_results(path, [row], bench="mine")
    harness.print_json(...)  # the last stdout line of a benchmark is one JSON object
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.provenance import git_commit  # noqa: E402

SCHEMA = "step3_jax.bench/1"
# Hopper's L2 is 50 MiB (H100 SXM and H200): inputs rotate over sets totalling 3x that.
L2_BYTES = 50 << 20
ROTATE_BYTES = 3 * L2_BYTES
MAX_SETS = 8
GPU_COPY_BYTES = 2 << 30
CPU_COPY_BYTES = 32 << 20

TIMER_NOTE = (
    "time_us: GPU device time from CUPTI (Mosaic GPU's hooks), the sum of every kernel of one "
    "call, median over the timed calls (timer='cupti'); elsewhere, or when CUPTI records no "
    "kernel or far fewer than the host loop shows, the host loop time (timer='host_loop' or "
    "'host_loop_cupti_partial'). host_us: median wall time of one call "
    "followed by block_until_ready. host_loop_us: wall time of calls enqueued back to back, one "
    "sync, per call. Inputs rotate over sets larger than 3x L2. pct_of_copy = 100 * GBps / "
    "copy_GBps, copy_GBps the best (read + write) rate of the copy probe in the same process."
)


# ---------------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times of one function, microseconds."""

    time_us: float  # device time (timer == "cupti") or host_loop_us
    host_us: float  # median of blocked calls
    host_loop_us: float  # back-to-back calls, one sync, per call
    timer: str  # "cupti" | "host_loop" | "host_loop_cupti_partial"
    calls: int  # timed calls per kind
    cupti_us: float | None = None  # the CUPTI median, also when it was not used


def _cupti_ext():
    """Mosaic GPU's CUPTI extension, or None (no GPU, or a jaxlib without it)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler

        ext = profiler.mosaic_gpu_lib._mosaic_gpu_ext
    except (ImportError, AttributeError):
        return None
    return ext if hasattr(ext, "_cupti_init") else None


def _device_us(ext, call, sync) -> float | None:
    """Device time of one call: CUPTI kernel records, summed. None if no kernel ran."""
    ext._cupti_init()
    try:
        sync(call())
    finally:
        timings = ext._cupti_get_timings(True)
    return sum(ms for _, ms in timings) * 1e3 if timings else None


def _arg_getter(arg_sets) -> tuple[Callable[[int], tuple], int]:
    if callable(arg_sets):
        return arg_sets, 1
    sets = [tuple(a) for a in arg_sets]
    if not sets:
        raise ValueError("arg_sets must hold at least one argument tuple, got none")
    return (lambda i: sets[i % len(sets)]), len(sets)


def time_calls(
    fn: Callable,
    arg_sets: Sequence[tuple] | Callable[[int], tuple] = ((),),
    *,
    reps: int = 10,
    warmup: int = 2,
    device_time: bool = True,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> Timing:
    """Times ``fn(*args)`` over ``args`` rotating through ``arg_sets`` (a list of tuples, or
    ``i -> tuple`` for inputs that cannot be reused, e.g. a donated cache).

    ``reps`` timed calls per kind (rounded up to whole passes over the sets); ``warmup`` calls
    first; ``device_time=False`` skips CUPTI (multi-device programs, where summing kernels of
    several GPUs means nothing). ``sync(out)`` blocks on an output (torch: cuda.synchronize).
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"{reps=} must be >= 1 and {warmup=} >= 0")
    get, n_sets = _arg_getter(arg_sets)
    n = -(-max(reps, n_sets) // n_sets) * n_sets
    call = lambda i: fn(*get(i))
    for i in range(warmup):
        sync(call(i))
    ext = _cupti_ext() if device_time else None
    dev = []
    if ext is not None:
        try:
            for i in range(n):
                us = _device_us(ext, functools.partial(call, i), sync)
                if us is not None:
                    dev.append(us)
        except RuntimeError as e:  # CUPTI taken (another profiler attached): host times only
            print(f"harness: CUPTI unavailable ({e}); host loop time", file=sys.stderr)
            dev = []
    blocked = []
    for i in range(n):
        t0 = time.perf_counter()
        sync(call(i))
        blocked.append((time.perf_counter() - t0) * 1e6)
    # Back to back, one sync on the last output: the calls share one stream, and an earlier
    # output may already be donated to a later call (a threaded cache).
    t0 = time.perf_counter()
    for i in range(n):
        out = call(i)
    sync(out)
    loop_us = (time.perf_counter() - t0) * 1e6 / n
    del out
    cupti = statistics.median(dev) if dev else None
    if cupti is not None and not cupti_missed_kernels(cupti, loop_us):
        return Timing(cupti, statistics.median(blocked), loop_us, "cupti", n, cupti)
    timer = "host_loop_cupti_partial" if dev else "host_loop"
    return Timing(loop_us, statistics.median(blocked), loop_us, timer, n, cupti)


# A single compiled program's calls enqueue back to back, so the host loop exceeds the device
# time only by launch gaps (tens of us). CUPTI through Mosaic GPU's hooks can miss most of a
# large program's kernels (an AFD role step: 7.1 ms of records for a 54.6 ms loop); then the
# host loop time is the honest one.
CUPTI_MISSING_US = 1000.0


def cupti_missed_kernels(device_us: float, host_loop_us: float) -> bool:
    """Whether a CUPTI sum is too small to be the call's device time: under half the host loop
    time with more than :data:`CUPTI_MISSING_US` missing."""
    return device_us < 0.5 * host_loop_us and host_loop_us - device_us > CUPTI_MISSING_US


def kernel_times(fn: Callable, args: tuple = (), *, warmup: int = 1) -> list[tuple[str, float]]:
    """Per-kernel device times (name, us) of one call, in launch order (CUPTI); [] off GPU or
    when CUPTI is unavailable. Where a call's time goes: its kernels and their count."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ext = _cupti_ext()
    if ext is None:
        return []
    ext._cupti_init()
    try:
        jax.block_until_ready(fn(*args))
    finally:
        timings = ext._cupti_get_timings(True) or []
    return [(name[:100], round(ms * 1e3, 3)) for name, ms in timings]


def trace_breakdown(
    fn: Callable, args: tuple = (), *, warmup: int = 1, top: int = 15, hlo_text: str | None = None
) -> dict:
    """Where one call's wall time goes on the device, from a `jax.profiler` trace (XLA's own
    CUPTI tracer, which also sees kernels that Mosaic GPU's hooks miss): ``span_us`` (first
    device event start to last end), ``busy_us`` (union of the events' intervals: the rest of
    the span is the device idle, e.g. waiting on the host), ``events``, the ``top`` kernel
    names by total time ``[(name, total_us, count)]``, and ``scopes``: the same time by HLO op
    (the ``hlo_op`` stat), read back to the model's jax name scope (``qkv_proj``, ``attend``,
    ...) when ``hlo_text`` (the program's optimized HLO, e.g. ``jit(f).lower(..).compile()
    .as_text()``) is given (`hlo_op_scopes`). That tells apart the custom calls that share one
    kernel name (Mosaic GPU's ``anonymous_mosaic_gpu_kernel``); with XLA's command buffers on,
    every kernel inside one is attributed to the buffer. ``{}`` off GPU or if the trace holds
    no device events."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if jax.default_backend() != "gpu":
        return {}
    from jax.profiler import ProfileData

    names = hlo_op_scopes(hlo_text) if hlo_text else {}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(*args))
        paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".pb")]
        planes = ProfileData.from_file(paths[0]).planes if paths else []
        spans, totals, lines, scopes = [], {}, {}, {}
        for plane in planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                events = list(line.events)
                lines[line.name] = len(events)
                if not line.name.startswith("Stream"):
                    continue  # e.g. the per-op/per-module summary lines repeat the kernels
                for ev in events:
                    spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                    us = ev.duration_ns / 1e3
                    for table, key in ((totals, ev.name), (scopes, op_scope(ev, names))):
                        t, c = table.get(key, (0.0, 0))
                        table[key] = (t + us, c + 1)
    if not spans:
        return {}
    spans.sort()
    busy, end = 0.0, spans[0][0]
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    by_scope = sorted(scopes.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "span_us": (max(b for _, b in spans) - spans[0][0]) / 1e3,
        "busy_us": busy / 1e3,
        "events": len(spans),
        "lines": lines,
        "top": [(name, round(t, 2), c) for name, (t, c) in ranked],
        "scopes": [(name, round(t, 2), c) for name, (t, c) in by_scope],
    }


def op_scope(event, names: dict[str, str] | None = None) -> str:
    """A profiler device event's HLO op (its ``hlo_op`` stat, e.g. ``fusion.137``; one name
    per call site) as ``names`` maps it (`hlo_op_scopes`), else the op itself; ``"?"`` for an
    event without one (e.g. a memcpy)."""
    try:
        stats = {str(k): v for k, v in event.stats}
    except (AttributeError, TypeError, ValueError):
        return "?"
    hlo = stats.get("hlo_op")
    if not hlo:
        return "?"
    return (names or {}).get(str(hlo), str(hlo))


_HLO_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', re.M)
# Frames of the name stack that are program structure, not the model's scopes.
_STRUCTURE = {"while", "body", "cond", "eval_jaxpr", "closed_call", "anonymous", "checkpoint"}
_STRUCTURE |= {"remat", "pjit", "shard_map", "scan", "vmap"}


def _is_structure(frame: str) -> bool:
    return frame.startswith(("jit(", "branch_")) or frame in _STRUCTURE


def hlo_op_scopes(hlo_text: str, depth: int = 2) -> dict[str, str]:
    """``{instruction name: scope}`` of an optimized HLO module's text: each instruction's
    ``op_name`` (the jax name stack, e.g. ``jit(_body)/while/body/eval_jaxpr/qkv_proj/
    jit(_run)/anonymous/mpmd_map``) without its ``jit(..)`` frames, the program-structure
    frames (``while``, ``body``, ``cond``, branches ...), einsum equations and the primitive,
    last ``depth`` scopes kept (``qkv_proj``); the primitive when nothing else is left."""
    out = {}
    for name, op_name in _HLO_INSTR.findall(hlo_text):
        frames = [f for f in op_name.split("/") if f]
        prim = frames[-1] if frames else "?"
        scopes = [f for f in frames[:-1] if not _is_structure(f) and "->" not in f]
        out[name] = "/".join(scopes[-depth:]) or prim
    return out


_CUBLAS_CALL = re.compile(
    r"= (\S+?|\([^)]*\)) custom-call\([^\n]*custom_call_target=\"(__cublas[^\"]*)\"([^\n]*)"
)
_EPILOGUE = re.compile(r'"epilogue":"(\w+)"')


def cublas_calls(hlo_text: str) -> list[dict]:
    """The cuBLAS custom calls of an optimized HLO module's text, in order: each one's
    ``target``, ``result`` type (e.g. ``(bf16[2712,15360]{1,0}, s8[..]{0})``: does the GEMM
    write bf16 or float32?) and ``epilogue`` (``DEFAULT``, ``BIAS``, ...; None if absent)."""
    calls = []
    for result, target, rest in _CUBLAS_CALL.findall(hlo_text):
        epilogue = _EPILOGUE.search(rest)
        calls.append(
            {"target": target, "result": result, "epilogue": epilogue and epilogue.group(1)}
        )
    return calls


def num_sets(nbytes_per_set: int, rotate_bytes: int = ROTATE_BYTES) -> int:
    """Input sets to rotate so that their bytes exceed ``rotate_bytes`` (1 ..
    :data:`MAX_SETS`)."""
    if nbytes_per_set <= 0:
        raise ValueError(f"{nbytes_per_set=} must be positive")
    return int(min(MAX_SETS, max(1, -(-rotate_bytes // nbytes_per_set))))


# ---------------------------------------------------------------------------------- copy probe
def _xla_copy_gbps(kind: str, nbytes: int) -> float:
    x = jax.random.uniform(jax.random.key(0), (nbytes // 4,), jnp.float32)
    f = jax.jit((lambda a: a + 1.0) if kind == "add" else jnp.copy)
    t = time_calls(f, [(x,)], reps=10, warmup=2)
    del x
    return 2 * nbytes / t.time_us / 1e3


def _torch_copy_gbps(nbytes: int) -> float:
    """torch ``copy_`` of ``nbytes`` bytes, CUDA events around each call, median of 10."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = []
    for i in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # two warm-up calls
            ms.append(start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9


@functools.cache
def copy_probe(nbytes: int | None = None) -> dict:
    """The device's copy rate (GB/s of read + write bytes): the best of the candidates.

    Returns ``{"GBps", "best", "nbytes", "candidates": {name: GB/s or error}}``. Cached: the
    probe runs once per process (per ``nbytes``).
    """
    gpu = jax.default_backend() == "gpu"
    nbytes = nbytes or (GPU_COPY_BYTES if gpu else CPU_COPY_BYTES)
    cands: dict[str, float | str] = {}
    tries = {
        "xla_add_f32": lambda: _xla_copy_gbps("add", nbytes),
        "xla_copy": lambda: _xla_copy_gbps("copy", nbytes),
    }
    if gpu:
        tries["torch_copy_"] = lambda: _torch_copy_gbps(nbytes)
    for name, run in tries.items():
        try:
            cands[name] = round(run(), 1)
        except Exception as e:  # noqa: BLE001 - a missing candidate (no torch, OOM) is recorded
            cands[name] = f"{type(e).__name__}: {str(e)[:160]}"
    ok = {k: v for k, v in cands.items() if isinstance(v, float)}
    if not ok:
        raise RuntimeError(f"every copy probe failed: {cands}")
    best = max(ok, key=ok.get)
    return {"GBps": ok[best], "best": best, "nbytes": nbytes, "candidates": cands}


def copy_gbps() -> float:
    """``copy_probe()["GBps"]``: the denominator of every ``pct_of_copy``."""
    return copy_probe()["GBps"]


# ---------------------------------------------------------------------------------- rows
def pct_of_copy(gbps: float, copy: float) -> float:
    """``gbps`` as a percentage of the copy rate ``copy`` (both GB/s)."""
    if copy <= 0:
        raise ValueError(f"copy rate {copy=} GB/s must be positive")
    return 100.0 * gbps / copy


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed configuration. ``bytes``: bytes the call must move (its roofline);
    ``flops``: its arithmetic; ``extra``: the benchmark's own fields (flattened into JSON)."""

    name: str
    shape: dict
    timing: Timing
    bytes: int = 0
    flops: int = 0
    copy_GBps: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def time_us(self) -> float:
        return self.timing.time_us

    @property
    def GBps(self) -> float:  # noqa: N802 - the unit spelled as in every results file
        return self.bytes / self.time_us / 1e3

    @property
    def TFLOPs(self) -> float:  # noqa: N802
        return self.flops / self.time_us / 1e6

    @property
    def pct_of_copy(self) -> float | None:
        return pct_of_copy(self.GBps, self.copy_GBps) if self.copy_GBps else None

    def to_dict(self) -> dict:
        t = self.timing
        out = {
            "name": self.name,
            "shape": dict(self.shape),
            "time_us": round(t.time_us, 3),
            "host_us": round(t.host_us, 3),
            "host_loop_us": round(t.host_loop_us, 3),
            "timer": t.timer,
            "cupti_us": None if t.cupti_us is None else round(t.cupti_us, 3),
            "bytes": int(self.bytes),
            "flops": int(self.flops),
            "GBps": round(self.GBps, 2),
            "TFLOPs": round(self.TFLOPs, 3),
            "copy_GBps": self.copy_GBps,
            "pct_of_copy": None if self.pct_of_copy is None else round(self.pct_of_copy, 2),
        }
        clash = set(out) & set(self.extra)
        if clash:
            raise ValueError(f"extra fields {sorted(clash)} would overwrite schema fields")
        return {**out, **self.extra}


def measure(
    fn: Callable,
    arg_sets: Sequence[tuple] | Callable[[int], tuple] = ((),),
    *,
    bytes: int = 0,  # noqa: A002 - the schema's field name
    flops: int = 0,
    name: str = "",
    shape: dict | None = None,
    copy: bool = True,
    **timing_and_extra,
) -> Row:
    """Times ``fn`` (see :func:`time_calls`; its keywords ``reps, warmup, device_time, sync``
    pass through) and returns its :class:`Row`; other keywords land in ``Row.extra``.
    ``copy=False`` leaves ``copy_GBps`` out (no probe run)."""
    kw = {k: timing_and_extra.pop(k) for k in ("reps", "warmup", "device_time", "sync")
          if k in timing_and_extra}  # fmt: skip
    timing = time_calls(fn, arg_sets, **kw)
    return Row(
        name=name,
        shape=dict(shape or {}),
        timing=timing,
        bytes=int(bytes),
        flops=int(flops),
        copy_GBps=copy_gbps() if copy else None,
        extra=timing_and_extra,
    )


def error_row(name: str, shape: dict, err: BaseException, **extra) -> dict:
    """The JSON row of a configuration that failed (recorded, not fatal)."""
    return {"name": name, "shape": dict(shape), "error": f"{type(err).__name__}: {err}"[:400],
            **extra}  # fmt: skip


# ---------------------------------------------------------------------------------- results
def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except (ImportError, AttributeError):
        return None


def environment() -> dict:
    """Device, versions, commit and date: the provenance block of every results file."""
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


MEMORY_STATS = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "pool_bytes",
                "largest_free_block_bytes")  # fmt: skip


def memory_gib(device=None) -> dict | None:
    """The device allocator's statistics in GiB (None where the backend keeps none, e.g. the
    CPU): bytes in use and their peak, the limit, and, where reported, the pool the allocator
    holds and its largest free block (a later, larger run in the same process fails when the
    pool keeps an earlier run's regions: docs/LOG.md, "Both roles on an H200")."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats:
        return None
    return {k: round(stats[k] / 2**30, 3) for k in MEMORY_STATS if k in stats}


def results(bench: str, rows: Sequence[Row | dict], *, copy: bool = True, **extra) -> dict:
    """The results document: provenance, the copy probe (``copy=False``: none), rows, extras."""
    doc: dict[str, Any] = {"schema": SCHEMA, "bench": bench, **environment()}
    if copy:
        probe = copy_probe()
        doc.update(copy_GBps=probe["GBps"], copy_probe=probe)
    doc["timer_note"] = TIMER_NOTE
    doc["rows"] = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    clash = set(doc) & set(extra)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would overwrite schema keys")
    doc.update(extra)
    return doc


def _write_json(path: str, doc: dict) -> None:
    """``doc`` as JSON at ``path`` (folders created), atomically: a temporary file in the same
    folder replaces ``path`` only once written, so a failed run leaves no half file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_results(path: str, rows: Sequence[Row | dict], *, bench: str, **kw) -> dict:
    """Writes :func:`results` as JSON to ``path`` (folders created); returns the document."""
    doc = results(bench, rows, **kw)
    _write_json(path, doc)
    return doc


def finish(bench: str, rows: Sequence[Row | dict], out: str | None = None, **kw) -> dict:
    """A benchmark's last step: the :func:`results` document, written to ``out`` when given,
    and its summary (everything but the rows) printed as the last stdout line. Returns it."""
    doc = write_results(out, rows, bench=bench, **kw) if out else results(bench, rows, **kw)
    print_json({k: v for k, v in doc.items() if k != "rows"})
    return doc


def print_json(obj: Any) -> None:
    """One JSON line on stdout (a benchmark's last line is its summary)."""
    print(json.dumps(obj, default=str), flush=True)


def device_tag() -> str:
    """The device kind as a file-name fragment (``NVIDIA_H200``, ``cpu``)."""
    return environment()["device"].replace(" ", "_")


if __name__ == "__main__":  # `python3 benchmarks/harness.py`: the copy probe alone
    import argparse

    ap = argparse.ArgumentParser(description="Device, versions and the copy probe, as one JSON")
    ap.add_argument("--nbytes", type=int, default=None, help="probe buffer (default 2 GiB GPU)")
    print_json({**environment(), "copy_probe": copy_probe(ap.parse_args().nbytes)})
