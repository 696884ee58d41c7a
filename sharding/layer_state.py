"""The model's own layers on every device: role templates and NNX states built from placed data.

Every executor runs `step3_jax.model.DecoderLayer` (its ``attention_qkv`` / ``attention_out``
/ ``ffn_half`` methods); what differs is where each device's parameters live. This module
holds the one description of that, keyed by the layer's own NNX parameter paths (the names the
model, HF mapping and orbax already use; no renamed tables):

* a *role template* is an abstract `DecoderLayer` (``nnx.eval_shape``) of the shapes a device
  of that role holds: the attention role a full-width layer (one MoE-kind layer stands for all:
  a dense layer's router is zero there and its routing discarded); an FFN device a layer of the
  *local* config (``E/ep`` experts, ``F/tp`` expert width, ``1/y`` of the shared and dense
  SwiGLU widths, zero-padded), for each layer kind it serves;
* `role_params` lists the parameters a role holds (path, shape, dtype, FP8 or not);
* `layer_values` cuts a real model layer into one device's share (numpy, by path);
* `merge_layer` builds the layer module inside a program from ``{path: array}`` (views of an
  arena, slices of stacked weights, `ExpertPool`s); parameters a role does not hold are None
  (the half that runs never reads them).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from step3_jax.model import DecoderLayer
from step3_jax.quant_model import Fp8Weight, quantize_model

ATTENTION, FFN = "attention", "ffn"
KINDS = ("moe", "dense")
# A MoE layer's routed experts [E, ...] (pooled: read in place); in a dense layer the same
# paths are its SwiGLU, so check the layer kind (or the rank) too.
EXPERT_PATHS = ("ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")
ROUTER = "ffn.router"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: str  # "self_attn.q_proj", "ffn.shared_expert.down_proj", ...
    shape: tuple[int, ...]  # logical shape (values of an Fp8Weight)
    dtype: str  # numpy name of the stored values
    scale_shape: tuple[int, ...] | None  # FP8: the block scales' shape, else None
    num_contract: int = 1
    num_batch: int = 0


def _path(p) -> str:
    return ".".join(str(k) for k in p)


SPLIT_ALIGN = 128  # the FP8 GEMM kernel's N/K granule


def split_width(n: int, ways: int) -> int:
    """Width of each of ``ways`` zero-padded slices of a dimension ``n`` split over the FFN
    devices: ``ceil(n / ways)``, rounded up to a multiple of 128 when ``n`` is one and the
    slice is at least 128 wide (so a slice of a real model's dimension stays a shape the Pallas
    FP8 GEMM takes: Step-3's 5120-wide shared expert over 3 devices is 1792, not 1707, which
    fell back to XLA; a tiny model's narrow slices are not inflated)."""
    width = -(-n // ways)
    if n % SPLIT_ALIGN == 0 and width >= SPLIT_ALIGN:
        width = -(-width // SPLIT_ALIGN) * SPLIT_ALIGN
    return width


def local_config(config, layout):
    """The config of one FFN device's slice (see the module docstring)."""
    y = layout.num_ffn
    return dataclasses.replace(
        config,
        num_experts=config.num_experts // layout.ffn_ep,
        moe_intermediate_size=config.moe_intermediate_size // layout.ffn_tp,
        share_expert_dim=split_width(config.share_expert_dim, y),  # 0 (none) stays 0
        intermediate_size=split_width(config.intermediate_size, y),
    )


def layer_id_of_kind(config, kind: str) -> int | None:
    ids = config.moe_layer_ids if kind == "moe" else config.dense_layer_ids
    return ids[0] if ids else None


def template(config, kind: str, *, dtype, param_dtype, fp8: bool) -> nnx.Module:
    """Abstract `DecoderLayer` of ``kind`` ("moe" | "dense"); FP8 linears (block scales, q/k/v
    fused where exact, as `quantize_model` does) when ``fp8``."""

    def build():
        layer = DecoderLayer(
            config,
            layer_id_of_kind(config, kind),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
        return quantize_model(layer) if fp8 else layer

    return nnx.eval_shape(build)


def _held(role: str, path: str) -> bool:
    in_ffn = path.startswith("ffn.") and path != ROUTER
    return in_ffn if role == FFN else not in_ffn


def role_params(layer: nnx.Module, role: str) -> list[ParamSpec]:
    """The parameters of ``layer`` (a template) that a device of ``role`` holds."""
    out = []
    for p, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        path, value = _path(p), var.get_value()
        if not _held(role, path):
            continue
        if isinstance(value, Fp8Weight):
            out.append(
                ParamSpec(
                    path,
                    tuple(value.values.shape),
                    "float8_e4m3fn",
                    tuple(value.scales.shape),
                    value.num_contract,
                    value.num_batch,
                )
            )
        else:
            out.append(ParamSpec(path, tuple(value.shape), np.dtype(value.dtype).name, None))
    return out


def merge_layer(graphdef, layer_template, values: dict) -> nnx.Module:
    """The layer module from ``values {path: array | Fp8Weight | ExpertPool}``; parameters
    missing from ``values`` are None."""
    flat = []
    for p, var in nnx.to_flat_state(nnx.state(layer_template, nnx.Param)):
        flat.append((p, var.replace(values.get(_path(p)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def fp8_value(spec: ParamSpec, values, scales) -> Fp8Weight:
    return Fp8Weight(values, scales, spec.num_contract)


# ------------------------------------------------------------------- one device's share
def _tp_slice(w: np.ndarray, axis: int, index: int, width: int) -> np.ndarray:
    """Slice ``index`` of width ``width`` along ``axis``, zero-padded past the end (exact: a
    zero gate/up row or down column adds exactly 0 to the SwiGLU output)."""
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, max(0, width * (index + 1) - w.shape[axis]))
    w = np.pad(w, pad)
    return np.take(w, np.arange(index * width, (index + 1) * width), axis=axis)


def _float_params(layer: nnx.Module) -> dict[str, np.ndarray]:
    out = {}
    for p, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        value = var.get_value()
        if isinstance(value, Fp8Weight):
            raise ValueError(
                f"{_path(p)} is FP8: the executors place float weights (quantize the placed "
                "weights with ArenaDtypes(weight='float8_e4m3fn') or load_random)"
            )
        out[_path(p)] = np.asarray(value)
    return out


def attention_values(layer: DecoderLayer, config) -> dict[str, np.ndarray]:
    """The attention role's share of ``layer`` by path (q/k/v separate; a zero router for a
    dense layer)."""
    vals = {k: v for k, v in _float_params(layer).items() if _held(ATTENTION, k)}
    if layer.self_attn.fused_qkv:
        del vals["self_attn.qkv_proj"]
        for name, w in zip(
            ("q_proj", "k_proj", "v_proj"), layer.self_attn.qkv_weights(), strict=True
        ):
            vals[f"self_attn.{name}"] = np.asarray(w)
    if not layer.is_moe:
        dt = vals["input_layernorm.weight"].dtype
        vals[ROUTER] = np.zeros((config.num_experts, config.hidden_size), dt)
    return vals


def ffn_values(layer: DecoderLayer, layout, j: int) -> dict[str, np.ndarray]:
    """FFN device ``j``'s share of ``layer``: experts of its EP group, F slice of its TP index;
    shared expert and dense FFN split over all FFN devices (see `local_config`)."""
    ep, tp = layout.ffn_coords(j)
    y = layout.num_ffn
    out = {}
    for path, w in _float_params(layer).items():
        if not _held(FFN, path):
            continue
        if layer.is_moe and path in EXPERT_PATHS:
            e_local = w.shape[0] // layout.ffn_ep
            w = w[ep * e_local : (ep + 1) * e_local]  # gate/up [E, F, D], down [E, D, F]
            axis = 2 if path == "ffn.down_proj" else 1
            w = _tp_slice(w, axis, tp, w.shape[axis] // layout.ffn_tp)  # divides (check_config)
        elif path.endswith("down_proj"):  # shared / dense down [D, F]
            w = _tp_slice(w, 1, j, split_width(w.shape[1], y))
        else:  # shared / dense gate, up [F, D]
            w = _tp_slice(w, 0, j, split_width(w.shape[0], y))
        out[path] = w
    return out


__all__ = [
    "ATTENTION",
    "EXPERT_PATHS",
    "FFN",
    "KINDS",
    "ParamSpec",
    "attention_values",
    "ffn_values",
    "local_config",
    "merge_layer",
    "role_params",
    "split_width",
    "template",
]
