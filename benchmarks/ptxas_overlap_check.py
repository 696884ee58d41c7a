"""Compile the grouped-GEMM kernels at Step-3 shapes and report what ptxas says about them.

For each named config (``bench_moe`` sweep names, default: the overlap variants and their
plain twins) the gate/up (SwiGLU, 7168 -> 2 x 5120) and down (5120 -> 7168) kernels are
compiled with ``MOSAIC_GPU_DUMP_PTXAS`` / ``MOSAIC_GPU_DUMP_SASS`` (printed by the C++
compiler to fd 1, redirected to ``<dump>/<config>.log``; ``MOSAIC_GPU_DUMP_TO`` is not used:
it also dumps the IR after every MLIR pass, ~1 GB here), and the logs are searched for the
two ways the overlap can silently fail:
* "wgmma ... serialized": ptxas inserted its own wait (e.g. an in-flight accumulator copied),
* spills ("bytes spill stores/loads" > 0): the extra f32 partials did not fit in registers.
It also counts the SASS ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` (wait for <= 1 group) vs ``0x0``.

Usage (GPU): ``PYTHONPATH=$PWD python3 benchmarks/ptxas_overlap_check.py --dump /tmp/d``
The last stdout line is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

DEFAULT = (
    "wg1_64x128_s4,wg1_64x128_s4_ov,wg1_64x128_s4_ovp,wg2n_64x256_s4,wg2n_64x256_s4_ov,"
    "wg2n_64x256_s4_ovp,wg2m_128x128_s4,wg2m_128x128_s4_ov,wg2m_128x128_s4_ovp"
)


@contextlib.contextmanager
def _fd1_to(path):
    """Sends file descriptor 1 (where the C++ dumps go) to ``path`` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as fh:
        os.dup2(fh.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _compile_one(name, cfg, dump_dir, m=6144, d=7168, f=5120, e=48):
    """Compiles gate/up and down for one config, dumps to ``dump_dir/name.log``; returns it."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_gemm import api

    log = os.path.join(dump_dir, f"{name}.log")
    with _fd1_to(log):
        _compile_both(api, jax, jnp, cfg, m, d, f, e)
    return log


def _compile_both(api, jax, jnp, cfg, m, d, f, e):
    fp8, f32 = jnp.float8_e4m3fn, jnp.float32
    sd = jax.ShapeDtypeStruct
    gs = sd((e,), jnp.int32)
    gu = jax.jit(
        lambda x, a, b, s, sa, sb, g: api.grouped_swiglu(
            x, a, b, g, x_scale=s, w_gate_scale=sa, w_up_scale=sb, implementation="pallas",
            config=cfg,
        )
    )  # fmt: skip
    gu.lower(
        sd((m, d), fp8), sd((e, f, d), fp8), sd((e, f, d), fp8), sd((m, d // 128), f32),
        sd((e, f // 128, d // 128), f32), sd((e, f // 128, d // 128), f32), gs,
    ).compile()  # fmt: skip
    dn = jax.jit(
        lambda x, a, s, sa, g: api.grouped_matmul(
            x, a, g, x_scale=s, w_scale=sa, implementation="pallas", config=cfg
        )
    )
    dn.lower(
        sd((m, f), fp8), sd((e, d, f), fp8), sd((m, f // 128), f32),
        sd((e, d // 128, f // 128), f32), gs,
    ).compile()  # fmt: skip


def _scan(log):
    """Counts of the tell-tale lines in one config's dump."""
    with open(log, errors="replace") as fh:
        text = fh.read()
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {
        "log_bytes": len(text),
        "serialized_warnings": len(re.findall(r"wgmma[^\n]*serialized", text, re.I)),
        "spill_bytes": sum(spills),
        "depbar_le_0": len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0", text)),
        "depbar_le_1": len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1", text)),
        "depbar_le_2": len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x2", text)),
        "registers": sorted({int(v) for v in re.findall(r"Used (\d+) registers", text)}),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", required=True, help="directory for the ptxas/SASS dumps")
    ap.add_argument("--configs", default=DEFAULT)
    args = ap.parse_args()
    os.makedirs(args.dump, exist_ok=True)
    os.environ.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")
    os.environ.setdefault("MOSAIC_GPU_DUMP_SASS", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_moe import ALL_SWEEP

    summary = {}
    for name in args.configs.split(","):
        try:
            summary[name] = _scan(_compile_one(name, ALL_SWEEP[name], args.dump))
        except Exception as e:  # noqa: BLE001 - report, keep checking the others
            summary[name] = {"error": repr(e)[-300:]}
        print(name, json.dumps(summary[name]), flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
