"""Streaming safetensors reading and writing, one tensor at a time.

A safetensors file is ``u64 little-endian header length | JSON header | raw data``; the header
maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"``. We parse the header ourselves so a load can
(a) validate every name and shape before reading any data, (b) read exactly one tensor into
host memory at a time (peak host memory about the largest tensor, never the checkpoint), and
(c) name the file and tensor when a file is truncated or malformed. Files written here load
with the ``safetensors`` package and vice versa (tests check both directions).

A sharded checkpoint is a directory with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``) and its shards; an
unsharded one has a single ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # a corrupt length word must not make us allocate gigabytes

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


class CheckpointFormatError(ValueError):
    """A checkpoint file is missing, truncated or malformed (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `file`
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses one safetensors file's header; checks every tensor's bytes lie in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointFormatError(
                f"{path}: header length {n} exceeds the file ({size} bytes): truncated or "
                "not a safetensors file"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: unreadable safetensors header ({e})") from e
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}"
            )
        dtype, shape = DTYPES[meta["dtype"]], tuple(int(s) for s in meta["shape"])
        begin, end = (int(o) for o in meta["data_offsets"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or end < begin:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} {meta['dtype']}{list(shape)} has data_offsets "
                f"[{begin}, {end}] of the wrong length"
            )
        if 8 + n + end > size:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} ends at byte {8 + n + end} but the file has {size} "
                "bytes: the file is truncated"
            )
        out[name] = TensorInfo(name, path, dtype, shape, 8 + n + begin, end - begin)
    return out


def index_checkpoint(path: str | Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (sharded with an index, or one file), by name."""
    path = Path(path)
    if path.is_file():
        return read_header(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({e!r})") from e
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not (path / file).is_file():
            raise CheckpointFormatError(f"{index}: shard {file} is missing from {path}")
        for name, info in read_header(path / file).items():
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointFormatError(
                    f"{path / file}: tensor {name!r} is not mapped to this shard by {INDEX_FILE}"
                )
            tensors[name] = info
    if weight_map is not None and set(weight_map) - set(tensors):
        missing = sorted(set(weight_map) - set(tensors))[:5]
        raise CheckpointFormatError(f"{index}: names listed but absent from their shard: {missing}")
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads exactly one tensor into a fresh host array (the only host copy made)."""
    out = np.empty(info.shape, info.dtype)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
        raise CheckpointFormatError(
            f"{info.file}: tensor {info.name!r} is truncated (read {got} of {info.nbytes} bytes)"
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

        Returns the index dict (also written to ``model.safetensors.index.json``).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        shards = self.plan(specs)
        weight_map, total = {}, 0
        for s, shard in enumerate(shards):
            fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            self._write_shard(self.directory / fname, shard, get_tensor, metadata)
            for name, _, _, nbytes in shard:
                weight_map[name] = fname
                total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = self.directory / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.directory / INDEX_FILE)
        return index

    @staticmethod
    def _write_shard(path: Path, shard, get_tensor, metadata) -> None:
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
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, dtype, shape, _ in shard:
                arr = np.ascontiguousarray(get_tensor(name))
                if arr.dtype != dtype or arr.shape != shape:
                    raise ValueError(
                        f"tensor {name!r}: planned {dtype}{list(shape)}, got "
                        f"{arr.dtype}{list(arr.shape)}"
                    )
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)


__all__ = [
    "CheckpointFormatError",
    "DTYPES",
    "INDEX_FILE",
    "ShardWriter",
    "TensorInfo",
    "index_checkpoint",
    "read_header",
    "read_tensor",
]
