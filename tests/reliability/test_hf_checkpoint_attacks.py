"""Issue 15, HF checkpoints: each attack case is a named error (or correct behaviour).

One test per failure the attack run found; every one of them failed at baadcb8/b4ff9dc
(the paths were followed, the bad values loaded, the errors were bare KeyError etc.).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from rel_fixtures import (
    INDEX,
    REFERENCE,
    build_model,
    random_tensors,
    tiny_config,
    write_checkpoint,
)

from step3_jax.checkpoints import (
    CheckpointFormatError,
    CheckpointMismatchError,
    hf_mapping,
    load_hf,
    save_hf,
)

CFG = tiny_config()
SECRET = b"root:x:0:0:root:/root:/bin/bash\nSECRET=hunter2\n"


def _load(path, **kw):
    return load_hf(path, policy=REFERENCE, **kw)


def _retarget(path, name: str, target: str) -> None:
    """Points ``name``'s weight_map entry at ``target`` (the attack)."""
    index = json.loads((path / INDEX).read_text())
    index["weight_map"][name] = target
    (path / INDEX).write_text(json.dumps(index))


# ----------------------------------------------------------------------------- confinement
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_weight_map_cannot_leave_the_checkpoint(tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(SECRET * 10)
    ckpt = write_checkpoint(tmp_path / "ckpt", CFG, random_tensors(CFG))
    target = {"absolute": str(outside), "dotdot": "../outside.safetensors", "symlink": "link"}
    if kind == "symlink":
        os.symlink(outside, ckpt / "link")
    _retarget(ckpt, "model.norm.weight", target[kind])
    with pytest.raises(CheckpointFormatError, match=INDEX) as info:
        _load(ckpt)
    assert "outside" in str(info.value) and "hunter2" not in str(info.value)


def test_unparseable_file_error_never_prints_its_bytes(tmp_path):
    ckpt = write_checkpoint(tmp_path, CFG, random_tensors(CFG))
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(SECRET * 10)
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00002") as info:
        _load(ckpt)
    first_word = str(struct.unpack("<Q", SECRET[:8])[0])  # what the old parser printed
    assert first_word not in str(info.value) and "x:0:0" not in str(info.value)


def test_hf_hub_cache_symlinks_into_blobs_still_load(tmp_path):
    """The HF hub cache layout (snapshots/<rev>/file -> ../../blobs/<sha>) is allowed."""
    src = write_checkpoint(tmp_path / "src", CFG, random_tensors(CFG, seed=3))
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        os.replace(f, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / f.name)
    model = _load(snap)
    assert model.config == CFG


# ----------------------------------------------------------------------------- headers
def _raw_safetensors(path, header: str, data: bytes) -> None:
    blob = header.encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


HEADERS = {
    "overlapping": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
    "negative": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}',
    "into_header_gap": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
    "duplicate_key": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    '"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
    "not_json": "{this is not json",
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_safetensors_headers_are_format_errors(tmp_path, case):
    from step3_jax.checkpoints.safetensors_io import index_checkpoint

    _raw_safetensors(
        tmp_path / "model.safetensors", HEADERS[case], np.arange(4.0, dtype="<f4").tobytes()
    )
    with pytest.raises(CheckpointFormatError, match="model.safetensors"):
        index_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text", ["{not json", '{"weight_map": 3}', '["a"]', '{"weight_map": {"a": 1}}']
)
def test_malformed_index_is_a_format_error_naming_it(tmp_path, text):
    ckpt = write_checkpoint(tmp_path, CFG, random_tensors(CFG))
    (ckpt / INDEX).write_text(text)
    with pytest.raises(CheckpointFormatError, match=INDEX):
        _load(ckpt)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{oops", "config.json"),
        ('{"vocab_size": "64"}', "config.json.*vocab_size"),
        ("[1]", "object"),
    ],
)
def test_malformed_config_is_a_format_error_naming_it(tmp_path, text, match):
    ckpt = write_checkpoint(tmp_path, CFG, random_tensors(CFG))
    (ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match=match):
        _load(ckpt)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [np.int8, np.bool_, np.int64])
def test_integer_or_bool_tensor_for_a_float_parameter_is_refused(tmp_path, dtype):
    src = random_tensors(CFG)
    name = "model.layers.0.mlp.up_proj.weight"
    src[name] = (src[name] * 100).astype(dtype)
    write_checkpoint(tmp_path, CFG, src)
    with pytest.raises(CheckpointMismatchError, match=f"{name}: dtype {np.dtype(dtype)}"):
        _load(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, bad):
    src = random_tensors(CFG)
    src["model.layers.1.moe.down_proj.weight"][2, 5, 7] = bad
    write_checkpoint(tmp_path, CFG, src)
    with pytest.raises(CheckpointFormatError, match="model.layers.1.moe.down_proj.weight"):
        _load(tmp_path)
    _load(tmp_path, check_finite=False)  # the opt-out loads it


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1e-3])
def test_bad_fp8_scale_is_refused_naming_the_tensor(tmp_path, bad):
    src = random_tensors(CFG, fp8=True)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    src[name][0, 0] = bad
    write_checkpoint(tmp_path, CFG, src)
    for fp8 in ("dequantize", "keep"):
        with pytest.raises(CheckpointFormatError, match=name):
            _load(tmp_path, fp8=fp8)


def test_nan_fp8_value_is_refused(tmp_path):
    src = random_tensors(CFG, fp8=True)
    name = "model.layers.0.mlp.gate_proj.weight"
    src[name].view(np.uint8)[1, 2] = 0x7F  # e4m3fn NaN
    assert np.isnan(src[name].astype(np.float32)[1, 2])
    write_checkpoint(tmp_path, CFG, src)
    with pytest.raises(CheckpointFormatError, match=name):
        _load(tmp_path)


def test_save_refuses_an_integer_dtype(tmp_path):
    model = _load(write_checkpoint(tmp_path / "in", CFG, random_tensors(CFG)))
    for dtype in (np.int8, np.int32, np.bool_, "float8_e5m2"):
        with pytest.raises(ValueError, match="dtype"):
            save_hf(model, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ----------------------------------------------------------------------------- save destinations
def test_save_refuses_a_symlinked_destination(tmp_path):
    model = build_model(CFG)
    save_hf(model, tmp_path / "run5")
    os.symlink("run5", tmp_path / "latest")  # the common `latest -> run-N` layout
    before = _files(tmp_path / "run5")
    for _ in range(2):  # was: OSError after the swap, then on every later save
        with pytest.raises(ValueError, match=r"latest is a symlink \(-> run5\).*real folder"):
            save_hf(model, tmp_path / "latest", overwrite=True)
    assert os.readlink(tmp_path / "latest") == "run5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run5"]  # no leftovers
    assert _files(tmp_path / "run5") == before


@pytest.mark.parametrize("dest", [".", ".."])
def test_save_refuses_the_working_directory(tmp_path, monkeypatch, dest):
    model = build_model(CFG)
    save_hf(model, tmp_path / "ck")
    before = _files(tmp_path / "ck")
    monkeypatch.chdir(tmp_path / "ck")
    with pytest.raises(ValueError, match="path .* contains the current working directory"):
        save_hf(model, dest, overwrite=True)  # was: the process's cwd deleted as ".old"
    assert os.getcwd() == str((tmp_path / "ck").resolve())
    assert _files(tmp_path / "ck") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_extra_tensor_named_like_a_model_tensor_is_refused(tmp_path):
    model = build_model(CFG)
    save_hf(model, tmp_path)
    before = _files(tmp_path)
    e = hf_mapping.entries(CFG)[0]
    extra = {e.hf_name: np.ones(e.hf_shape, np.float32)}
    with pytest.raises(ValueError, match=f"extra_tensors name '{e.hf_name}' collides"):
        save_hf(model, tmp_path, overwrite=True, extra_tensors=extra)  # was: a corrupt save
    assert _files(tmp_path) == before
    _load(tmp_path)


def test_extra_tensor_that_is_not_an_array_is_a_type_error(tmp_path):
    model = build_model(CFG)
    with pytest.raises(TypeError, match=r"extra_tensors\['vision.w'\] must be an array.*list"):
        save_hf(model, tmp_path / "out", extra_tensors={"vision.w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="extra_tensors names must be non-empty str"):
        save_hf(model, tmp_path / "out", extra_tensors={3: np.ones(2, np.float32)})
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- integrity
def test_flipped_byte_in_a_saved_shard_is_detected(tmp_path):
    model = _load(write_checkpoint(tmp_path / "in", CFG, random_tensors(CFG)))
    save_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    assert shard.name.startswith("model-00002-of-")
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight: still finite, still the right shape
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=f"{shard.name}.*SHA-256"):
        _load(tmp_path / "out")
    _load(tmp_path / "out", verify=False)  # the opt-out loads it


def test_manifest_must_cover_every_shard(tmp_path):
    model = _load(write_checkpoint(tmp_path / "in", CFG, random_tensors(CFG)))
    save_hf(model, tmp_path / "out")
    manifest = tmp_path / "out" / "step3_jax.manifest.json"
    data = json.loads(manifest.read_text())
    data["files"].pop("config.json")
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointFormatError, match="does not cover.*config.json"):
        _load(tmp_path / "out")


# ----------------------------------------------------------------------------- hostile config keys
# Keys the config type check used to miss (probe F08): each is a CheckpointFormatError naming
# config.json and the key, raised before any weight is read.
def _with_config(path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c.update(rope_scaling={"type": "linear", "factor": float("inf")}),
            r"'rope_scaling\.factor' must be a finite number > 0, got inf",
        ),
        (
            lambda c: c.update(rope_scaling={"type": "linear", "factor": "2"}),
            r"'rope_scaling\.factor' must be a finite number > 0, got '2'",
        ),
        (
            lambda c: c.update(rope_scaling={"type": "linear", "factor": None}),
            r"'rope_scaling\.factor' must be a finite number > 0, got None",
        ),
        (
            lambda c: c.update(rope_parameters={"rope_theta": True}),
            r"'rope_parameters\.rope_theta' must be a finite number, got True",
        ),
        (
            lambda c: c.update(rope_parameters={"rope_theta": "abc"}),
            r"'rope_parameters\.rope_theta' must be a finite number, got 'abc'",
        ),
        (
            lambda c: c.update(text_config="oops"),
            r"'text_config' must be a mapping \(or null\), got 'oops'",
        ),
        (
            lambda c: c.update(quantization_config="fp8"),
            r"'quantization_config' must be a mapping \(or null\), got 'fp8'",
        ),
        (
            lambda c: c.update(text_config={"quantization_config": "fp8"}),
            r"'text_config\.quantization_config' must be a mapping",
        ),
        (
            lambda c: c.update(quantization_config={"weight_block_size": [128.9, 128]}),
            r"weight_block_size=\[128\.9, 128\] is not supported",  # was truncated to 128
        ),
        (
            lambda c: c.update(quantization_config={"weight_block_size": "ab"}),
            r"weight_block_size='ab' is not supported",
        ),
    ],
    ids=[
        "inf_factor",
        "str_factor",
        "null_factor",
        "bool_theta",
        "str_theta",
        "str_text_config",
        "str_quant",
        "str_text_quant",
        "float_block",
        "str_block",
    ],
)
def test_hostile_config_keys_are_format_errors_naming_file_and_key(tmp_path, edit, match):
    ckpt = write_checkpoint(tmp_path, CFG, random_tensors(CFG))
    _with_config(ckpt, edit)
    with pytest.raises(CheckpointFormatError, match=rf"config\.json: .*{match}"):
        _load(ckpt)


def test_mismatch_error_lists_are_capped(tmp_path):
    """config.json asks for 40 layers of a 2-layer checkpoint: hundreds of missing tensors are
    listed as the first 20 and a count (the exception keeps the full lists)."""
    ckpt = write_checkpoint(tmp_path, CFG, random_tensors(CFG))
    _with_config(ckpt, lambda c: c.update(num_hidden_layers=40))
    with pytest.raises(CheckpointMismatchError) as err:
        _load(ckpt)
    n = len(err.value.missing)
    assert n > 300
    msg = str(err.value)
    assert f"{n} missing:" in msg and f"... and {n - 20} more" in msg
    assert len(msg) < 4000
