"""What `load_hf`'s SHA-256 manifest check costs on a large checkpoint, on this host.

Writes a synthetic checkpoint of ``--gib`` GiB (bf16 tensors of 64 MiB, 4 GiB-style shards of
``--shard-mib``) with `ShardWriter` (which hashes while writing), then times, median of
``--repeats`` runs with the files in the page cache:

* ``verify``: `verify_checkpoint` (re-reads and hashes every shard),
* ``read``: `read_tensor` of every tensor (what a load reads from disk anyway),
* ``hash_only``: hashlib over the same bytes already in memory (the CPU ceiling).

The last stdout line is JSON (also written to ``--out`` if given).

    python benchmarks/bench_checkpoint_verify.py --gib 1.5 --out benchmarks/results/checkpoint_verify_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from benchmarks.provenance import git_commit
from step3_jax.checkpoints import integrity
from step3_jax.checkpoints.hf_validate import verify_checkpoint
from step3_jax.checkpoints.safetensors_io import ShardWriter, index_checkpoint, read_tensor

TENSOR_MIB = 64


def _write(directory: Path, gib: float, shard_mib: int) -> int:
    n = max(1, int(gib * 1024 / TENSOR_MIB))
    shape = (TENSOR_MIB * 2**20 // 2 // 4096, 4096)  # bf16
    block = np.random.default_rng(0).standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)
    specs = [(f"t{i}", block.dtype, shape) for i in range(n)]
    writer = ShardWriter(directory, shard_mib * 2**20)
    writer.write(specs, lambda name: block)
    (directory / "config.json").write_text("{}\n")
    digests = {**writer.digests, **integrity.digest_files(directory, ["config.json"])}
    integrity.write_manifest(directory, digests)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm: files in the page cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.5)
    p.add_argument("--shard-mib", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        nbytes = _write(directory, args.gib, args.shard_mib)
        tensors = index_checkpoint(directory)
        verify = _median_seconds(lambda: verify_checkpoint(directory), args.repeats)
        read = _median_seconds(lambda: [read_tensor(i) for i in tensors.values()], args.repeats)
        buf = np.ones(256 * 2**20, np.uint8)
        hash_s = _median_seconds(lambda: hashlib.sha256(buf).digest(), args.repeats)
    gb = nbytes / 1e9
    result = {
        "bench": "checkpoint_verify",
        "bytes": nbytes,
        "verify_s": round(verify, 3),
        "verify_gb_per_s": round(gb / verify, 2),
        "read_s": round(read, 3),
        "read_gb_per_s": round(gb / read, 2),
        "verify_over_read": round(verify / read, 2),
        "sha256_in_memory_gb_per_s": round(buf.nbytes / 1e9 / hash_s, 2),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1),  # a shared host reads slower
        "commit": git_commit(short=True),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
