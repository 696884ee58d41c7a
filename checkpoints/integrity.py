"""Checkpoint integrity: path confinement, SHA-256 manifests and atomic directory replacement.

* `confined`: every file a checkpoint names (``weight_map`` shards, the manifest's entries)
  must resolve inside the checkpoint directory: no absolute paths, no ``..``, no symlink that
  leaves the directory. The one exception is the Hugging Face hub cache, whose snapshot
  folders hold symlinks into the repository's ``blobs/`` folder (``snapshots/<rev>/f ->
  ../../blobs/<sha>``); links into exactly that folder are accepted.
* `write_manifest` / `verify_manifest`: ``step3_jax.manifest.json`` lists each file's size
  and SHA-256; a load recomputes them and names the first file that differs.
* `replace_directory`: the new checkpoint is written complete in a hidden sibling folder,
  then swapped in by two renames (old -> ``.<name>.old``, new -> ``<name>``), then the old
  one is deleted. A crash between the two renames leaves only ``.<name>.old``: `recover`
  (called by every load and save) finds it, so the old or the new checkpoint always loads.

``FAULT_HOOK`` is called with a step name at every numbered point of a save; tests set it to
kill the process there (tests/reliability/test_atomic_save.py). It is None in normal use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath


class CheckpointFormatError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or malformed (the message names it)."""


MANIFEST_FILE = "step3_jax.manifest.json"
MANIFEST_FORMAT = "step3_jax.manifest/1"
_CHUNK = 8 * 2**20  # hashing reads 8 MiB at a time: host memory stays flat
FAULT_HOOK: Callable[[str], None] | None = None


def fault_point(step: str) -> None:
    """A numbered point of a save where a test may kill the writer (no-op otherwise)."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


# ----------------------------------------------------------------------------- confinement
def _in_hf_blobs(directory: Path, real: Path) -> bool:
    """``directory`` is ``.../snapshots/<rev>`` of the HF hub cache and ``real`` is a blob."""
    root = directory.resolve()
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def confined(directory: Path, name: object, source: str) -> Path:
    """``directory / name`` after checking it cannot leave ``directory``.

    ``source`` (the file that named it, e.g. the index) starts the error message; the
    message never quotes the contents of the target file.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise CheckpointFormatError(f"{source}: file name {name!r} is not a relative path")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise CheckpointFormatError(
            f"{source}: file name {name!r} points outside the checkpoint directory "
            "(absolute paths and '..' are refused)"
        )
    full = directory / name
    real, root = full.resolve(), directory.resolve()
    if root not in real.parents and not _in_hf_blobs(directory, real):
        raise CheckpointFormatError(
            f"{source}: file {name!r} is a symlink that resolves outside the checkpoint "
            f"directory {directory}"
        )
    return full


# ----------------------------------------------------------------------------- manifests
def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Writes ``obj`` as JSON under a temporary name, fsyncs, then renames into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path, digests: dict[str, dict]) -> None:
    """``digests``: ``{relative file name: {"sha256": hex, "bytes": size}}``."""
    write_json_atomic(
        directory / MANIFEST_FILE,
        {"format": MANIFEST_FORMAT, "files": dict(sorted(digests.items()))},
    )


def digest_files(directory: Path, names: Iterable[str]) -> dict[str, dict]:
    """Manifest entries for files already on disk."""
    return {
        n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
        for n in names
    }


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's ``files`` table, validated; None when the checkpoint has none."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    data = load_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CheckpointFormatError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    files = data.get("files")
    if not isinstance(files, dict):
        raise CheckpointFormatError(f"{path}: 'files' must map file names to digests")
    for name, entry in files.items():
        confined(directory, name, str(path))
        ok = isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not ok or not isinstance(digest, str) or len(digest) != 64:
            raise CheckpointFormatError(f"{path}: entry for {name!r} needs 'sha256' and 'bytes'")
    return files


def verify_manifest(directory: Path, files: dict[str, dict]) -> None:
    """Recomputes every listed file's size and SHA-256; raises naming the first mismatch."""
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointFormatError(f"{path}: listed in {MANIFEST_FILE} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointFormatError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']}: truncated or replaced"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointFormatError(
                f"{path}: SHA-256 differs from {MANIFEST_FILE}: the file is corrupt or was "
                "modified after saving (pass verify=False to load it anyway)"
            )


def parse_json(text: str | bytes, source: Path):
    """JSON with decode errors and duplicate keys reported as `CheckpointFormatError`."""

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise CheckpointFormatError(f"{source}: duplicate JSON key {dup!r}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{source}: not valid JSON ({type(e).__name__})") from e


def load_json(path: Path):
    """A JSON file of a checkpoint, parsed with `parse_json`."""
    try:
        return parse_json(path.read_bytes(), path)
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror})") from e


# ----------------------------------------------------------------------------- atomic swap
def staging_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def old_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def remove_tree(path: Path) -> None:
    """Deletes ``path``: a symlink (even to a folder) or a file is unlinked, never followed;
    a real folder is deleted with its contents; nothing happens if it is absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def recover(path: Path) -> Path:
    """Finishes the effect of a save interrupted between its two renames.

    If ``path`` is gone but ``.<name>.old`` exists, the old checkpoint is moved back (the
    new one, never swapped in, is discarded by the next save). Returns ``path``.
    """
    old = old_dir(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
        fsync_dir(path.parent)
    return path


def replace_directory(staged: Path, path: Path, keep: Callable[[str], bool]) -> None:
    """Swaps the complete directory ``staged`` in as ``path``; deletes the previous one.

    Files of the previous ``path`` for which ``keep(name)`` is true (a tokenizer, a README)
    are copied into ``staged`` first, so only checkpoint files are replaced.
    """
    fsync_dir(staged)
    if not path.exists():
        fault_point("rename_new")
        os.replace(staged, path)
        fsync_dir(path.parent)
        fault_point("renamed_new")
        return
    for item in path.iterdir():
        if keep(item.name) and not (staged / item.name).exists():
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, staged / item.name)
    fsync_dir(staged)
    fault_point("carried_files")
    old = old_dir(path)
    remove_tree(old)  # left by an earlier save that died after its swap
    os.replace(path, old)
    fsync_dir(path.parent)
    fault_point("moved_old_aside")
    os.replace(staged, path)
    fsync_dir(path.parent)
    fault_point("renamed_new")
    remove_tree(old)
    fault_point("deleted_old")
