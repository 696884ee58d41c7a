"""Safetensors reading (the ``safetensors`` package's validating reader) and streaming writing.

A safetensors file is ``u64 little-endian header length | JSON header | raw data``; the header
maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"``.

Reading goes through ``safetensors.safe_open``, which validates the whole header before any
data is touched: duplicate names, negative, overlapping or out-of-order offsets, gaps, bytes
past the last tensor, a length word larger than the file, shape overflow. Its errors are
re-raised as `CheckpointFormatError` naming the file. Each tensor is then read on its own
(`read_tensor`: peak host memory about one tensor, never the checkpoint).

FP8 exception (measured with safetensors 0.8.0): ``safe_open(..., "numpy").get_tensor`` of an
``F8_E4M3`` tensor raises ``AttributeError: module 'numpy' has no attribute 'float8_e4m3fn'``
(the "flax"/"jax" frameworks go through the same numpy step). For FP8 tensors only, the bytes
are read at the offsets of the header that ``safe_open`` has just validated.

A sharded checkpoint is a directory with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``) and its shards; an
unsharded one has a single ``model.safetensors``. Every shard named by the index must lie
inside the directory (`step3_jax.checkpoints.integrity.confined`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from step3_jax.checkpoints.integrity import (
    CheckpointFormatError,
    confined,
    fault_point,
    load_json,
    parse_json,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_RAW_READ = {"F8_E4M3", "F8_E5M2"}  # safe_open's numpy path cannot build these (see above)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `file`
    nbytes: int


def _open(path: Path):
    """``safe_open`` with its errors turned into `CheckpointFormatError` naming ``path``."""
    try:
        return safe_open(str(path), "numpy")
    except SafetensorError as e:
        hint = " (truncated, or not a safetensors file)" if "covered" in str(e) else ""
        raise CheckpointFormatError(f"{path}: invalid safetensors file: {e}{hint}") from e
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read as a safetensors file ({e})") from e


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, after ``safe_open`` has validated the header."""
    path = Path(path)
    with _open(path) as f:
        names = set(f.keys())
    with open(path, "rb") as f:  # validated above: length and JSON are sound
        (n,) = struct.unpack("<Q", f.read(8))
        header = parse_json(f.read(n), path)
    out = {}
    for name in names:
        meta = header[name]
        if meta["dtype"] not in DTYPES:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has dtype {meta['dtype']}, which step3_jax does not "
                f"load (supported: {sorted(DTYPES)})"
            )
        begin, end = meta["data_offsets"]
        info = TensorInfo(
            name, path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin
        )
        out[name] = info
    return out


def _weight_map(index: Path) -> dict[str, str]:
    data = load_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointFormatError(
            f"{index}: not a safetensors index (needs a 'weight_map' object of name -> file)"
        )
    return weight_map


def shard_files(path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """``(weight_map or None, shard file names)`` of a checkpoint directory; every name is
    confined to the directory."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
        for file in files:
            confined(path, file, str(index))
        return weight_map, files
    if (path / SINGLE_FILE).is_file():
        return None, [SINGLE_FILE]
    raise FileNotFoundError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def index_checkpoint(path: str | Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (sharded with an index, or one file), by name."""
    path = Path(path)
    if path.is_file():
        return read_header(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    weight_map, files = shard_files(path)
    index = path / INDEX_FILE
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        shard = path / file
        if not shard.is_file():
            raise CheckpointFormatError(f"{index}: shard {file} is missing from {path}")
        for name, info in read_header(shard).items():
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointFormatError(
                    f"{shard}: tensor {name!r} is not mapped to this shard by {INDEX_FILE}"
                )
            tensors[name] = info
    if weight_map is not None and set(weight_map) - set(tensors):
        missing = sorted(set(weight_map) - set(tensors))[:5]
        raise CheckpointFormatError(f"{index}: names listed but absent from their shard: {missing}")
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads exactly one tensor into host memory (``safe_open``; FP8 at validated offsets)."""
    if DTYPE_NAMES[info.dtype] not in _RAW_READ:
        with _open(info.file) as f:
            out = f.get_tensor(info.name)
    else:
        out = np.empty(info.shape, info.dtype)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != info.nbytes:
            raise CheckpointFormatError(
                f"{info.file}: tensor {info.name!r} is truncated (read {got} of {info.nbytes} "
                "bytes): the file changed after its header was read"
            )
    if out.dtype != info.dtype or out.shape != info.shape:
        raise CheckpointFormatError(
            f"{info.file}: tensor {info.name!r} read as {out.dtype}{list(out.shape)}, header "
            f"says {info.dtype}{list(info.shape)}"
        )
    return out


class ShardWriter:
    """Writes tensors one at a time into shards of at most ``max_shard_bytes`` of data.

    Each shard is first written under a temporary name and renamed when complete, and the
    index is written last, so an interrupted save never leaves a loadable-looking checkpoint.
    Peak host memory: the one tensor being written (headers are computed up front).
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.directory, self.max_shard_bytes = Path(directory), int(max_shard_bytes)

    def plan(self, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]]) -> list[list]:
        """Groups ``(name, dtype, shape)`` into shards in order (a tensor never splits)."""
        shards: list[list] = [[]]
        used = 0
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if shards[-1] and used + nbytes > self.max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, np.dtype(dtype), tuple(shape), nbytes))
            used += nbytes
        return shards

    def write(self, specs, get_tensor, metadata: dict[str, str] | None = None) -> dict:
        """Writes all tensors; ``get_tensor(name) -> np.ndarray`` is called once per name.

        Returns the index dict (also written to ``model.safetensors.index.json``). After the
        call ``self.digests`` holds ``{file: {"sha256", "bytes"}}`` for every shard and the
        index, hashed while writing (no second read).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        shards = self.plan(specs)
        weight_map, total, self.digests = {}, 0, {}
        for s, shard in enumerate(shards):
            fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            self.digests[fname] = self._write_shard(
                self.directory / fname, shard, get_tensor, metadata
            )
            fault_point(f"wrote_shard_{s + 1}")
            for name, _, _, nbytes in shard:
                weight_map[name] = fname
                total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        text = (json.dumps(index, indent=2) + "\n").encode()
        tmp = self.directory / (INDEX_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / INDEX_FILE)
        self.digests[INDEX_FILE] = {"sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
        fault_point("wrote_index")
        return index

    @staticmethod
    def _write_shard(path: Path, shard, get_tensor, metadata) -> dict:
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape, nbytes in shard:
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as safetensors writes
        blob = struct.pack("<Q", len(blob)) + blob
        digest, size = hashlib.sha256(blob), len(blob)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            for name, dtype, shape, _ in shard:
                arr = np.ascontiguousarray(get_tensor(name))
                if arr.dtype != dtype or arr.shape != shape:
                    raise ValueError(
                        f"tensor {name!r}: planned {dtype}{list(shape)}, got "
                        f"{arr.dtype}{list(arr.shape)}"
                    )
                data = memoryview(arr.reshape(-1).view(np.uint8))
                f.write(data)
                digest.update(data)
                size += arr.nbytes
                fault_point("wrote_tensor")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"sha256": digest.hexdigest(), "bytes": size}


__all__ = [
    "CheckpointFormatError",
    "DTYPES",
    "INDEX_FILE",
    "ShardWriter",
    "TensorInfo",
    "index_checkpoint",
    "read_header",
    "read_tensor",
    "shard_files",
]
