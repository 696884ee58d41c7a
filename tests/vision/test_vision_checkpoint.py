"""A tiny random Step3-VL checkpoint in the release layout: load and save bitwise, and clear
errors from the vision table."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from vision_fixtures import random_vision_tensors

from step3_jax.checkpoints import (
    CheckpointFormatError,
    hf_mapping,
    hf_vl,
    load_hf,
    load_hf_vl,
    save_hf_vl,
    vision_mapping,
)
from step3_jax.checkpoints.vision_mapping import VisionCheckpointError
from step3_jax.config import Step3Config
from step3_jax.policy import KernelPolicy
from step3_jax.vision.config import Step3VisionConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
TEXT = Step3Config.tiny()
VIS = Step3VisionConfig.tiny(text_hidden_size=TEXT.hidden_size, image_token_id=7)


def release_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text = {
        e.hf_name: (rng.standard_normal(e.hf_shape) * 0.05 + 0.01).astype(BF16)
        for e in hf_mapping.entries(TEXT)
    }
    vision = {n: a.astype(BF16) for n, a in random_vision_tensors(VIS, seed + 1).items()}
    return {**text, **vision}


def write_release(path, tensors, prefix_vision: str = "") -> None:
    """Two shards (text / vision interleaved), an index and the VL config.json nesting."""
    path.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for s, group in enumerate((names[::2], names[1::2])):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        out = {}
        for n in group:
            key = prefix_vision + n if vision_mapping.canonical_name(n) else n
            out[key] = tensors[n]
            weight_map[key] = fname
        save_file(out, str(path / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = {**VIS.to_hf_config(), "text_config": TEXT.to_hf_config()}
    (path / "config.json").write_text(json.dumps(cfg))


def read_all(path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "numpy") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_release_checkpoint_round_trips_bitwise(tmp_path):
    tensors = release_tensors(0)
    write_release(tmp_path / "in", tensors)
    model = load_hf_vl(tmp_path / "in", policy=KernelPolicy.reference())
    assert model.vision_config == VIS and model.config == TEXT
    save_hf_vl(model, tmp_path / "out", max_shard_bytes=2**20)
    back = read_all(tmp_path / "out")
    assert set(back) == set(tensors)
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        assert back[name].tobytes() == a.tobytes(), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert Step3VisionConfig.from_hf_config(cfg) == VIS
    assert Step3Config.from_hf_config(cfg) == TEXT


def test_transformers_layout_prefix_and_text_only_loader(tmp_path):
    tensors = release_tensors(1)
    write_release(tmp_path / "ck", tensors, prefix_vision="model.")
    vis = vision_mapping.load_vision(tmp_path / "ck")
    leaf = np.asarray(vis.vit_downsampler2.weight[...])
    assert leaf.tobytes() == tensors["vit_downsampler2.weight"].tobytes()
    # The text loader skips every vision tensor (vit_downsampler* included).
    text = load_hf(tmp_path / "ck", policy=KernelPolicy.reference())
    assert text.config == TEXT


def test_params_round_trip_through_the_table():
    t = random_vision_tensors(VIS, 2)
    params = vision_mapping.hf_to_params(t, VIS)
    assert len(params) == len(t) == len(vision_mapping.entries(VIS))
    back = vision_mapping.params_to_hf(params, VIS)
    assert all(back[n].tobytes() == a.tobytes() for n, a in t.items())


def test_table_errors_list_every_problem():
    t = random_vision_tensors(VIS, 3)
    del t["vit_downsampler.bias"]
    t["vision_model.embeddings.class_embedding"] = np.zeros((VIS.hidden_size,), np.float32)
    t["vit_large_projector.weight"] = t["vit_large_projector.weight"].astype(
        ml_dtypes.float8_e4m3fn
    )
    t["vision_model.extra.weight"] = np.ones(3, np.float32)
    t["model.layers.0.mlp.up_proj.weight"] = np.ones(3, np.float32)  # text: ignored
    with pytest.raises(VisionCheckpointError) as err:
        vision_mapping.hf_to_params(t, VIS)
    msg = str(err.value)
    assert "missing: vit_downsampler.bias" in msg
    assert "mis-shaped: vision_model.embeddings.class_embedding is [32], expected [1, 32]" in msg
    assert "dtype: vit_large_projector.weight is float8_e4m3fn" in msg
    assert "unexpected: vision_model.extra.weight" in msg
    assert "up_proj" not in msg


def test_wrong_config_shape_is_reported(tmp_path):
    tensors = release_tensors(4)
    write_release(tmp_path / "ck", tensors)
    wrong = dataclasses.replace(VIS, output_hidden_size=24)
    with pytest.raises(VisionCheckpointError, match="mis-shaped: vit_downsampler.weight"):
        vision_mapping.load_vision(tmp_path / "ck", wrong, dtype=jnp.float32)


def test_real_size_table_counts():
    c = Step3VisionConfig.step3()
    table = vision_mapping.entries(c)
    assert len(table) == 4 + 63 * 12 + 4 + 2  # embeddings, layers, convs, projector
    assert sum(int(np.prod(e.hf_shape)) for e in table) == c.param_count()
    named = {e.hf_name: e.hf_shape for e in table}
    assert named["vision_model.embeddings.position_embedding.weight"] == (2705, 1792)
    assert named["vision_model.transformer.layers.62.self_attn.qkv_proj.weight"] == (5376, 1792)
    assert named["vit_downsampler2.weight"] == (8192, 4096, 3, 3)
    assert named["vit_large_projector.weight"] == (7168, 8192)


def _text_model_must_not_load(*args, **kwargs):
    raise AssertionError("the text model was loaded before the vision config was checked")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c["vision_config"].update(num_hidden_layers=10**9),
            r"'vision_config\.num_hidden_layers' must be an integer in \[1, 4096\], "
            "got 1000000000",
        ),
        (lambda c: c["vision_config"].update(hidden_size="abc"), r"'vision_config\.hidden_size'"),
        (lambda c: c.update(vision_config=None), "'vision_config' must be a mapping, got None"),
        (
            lambda c: c["vision_config"].update(enable_patch="false"),
            r"'vision_config\.enable_patch' must be true or false, got 'false'",
        ),
    ],
    ids=["huge_layers", "str_width", "null", "str_bool"],
)
def test_corrupt_vision_config_is_refused_before_the_text_model_loads(
    tmp_path, monkeypatch, edit, match
):
    write_release(tmp_path / "ck", release_tensors(5))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    edit(cfg)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(hf_vl, "load_hf", _text_model_must_not_load)
    with pytest.raises(CheckpointFormatError, match=rf"ck/config\.json: config key {match}"):
        load_hf_vl(tmp_path / "ck", policy=KernelPolicy.reference())


def test_malformed_config_json_is_a_format_error_for_the_vision_reader(tmp_path):
    write_release(tmp_path / "ck", release_tensors(6))
    (tmp_path / "ck" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointFormatError, match="config.json"):
        vision_mapping.read_vision_config(tmp_path / "ck")


def test_long_problem_lists_are_capped():
    """A config asking for 300 layers against a 2-layer checkpoint: 3600+ problems, listed as
    the first 20 and a count, not one line each."""
    many = dataclasses.replace(VIS, num_layers=300)
    with pytest.raises(VisionCheckpointError) as err:
        vision_mapping.hf_to_params(random_vision_tensors(VIS, 7), many)
    msg = str(err.value)
    n = len(vision_mapping.entries(many)) - len(vision_mapping.entries(VIS))
    assert f"({n} problems)" in msg and f"... and {n - 20} more" in msg
    assert msg.count("\n") == 21 and len(msg) < 4000
