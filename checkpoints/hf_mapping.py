"""The declarative Hugging Face <-> step3_jax name table, with named transforms.

One `Entry` per parameter: the HF tensor name, the NNX state path, both shapes and the named
transform between them. Every step3_jax weight is stored ``[out, in]`` like PyTorch, so each
transform is the identity or a reshape that splits/merges the head axes:

=================  ===========================  ==========================  ==================
transform          HF shape                     step3_jax shape             used by
=================  ===========================  ==========================  ==================
identity           same                         same                        everything else
split_heads_out    wq ``[N*H, R]``              ``[N, H, R]``               self_attn.wq
split_heads_in     o_proj ``[D, N*H]``          ``[D, N, H]``               self_attn.o_proj
=================  ===========================  ==========================  ==================

Fused parameters (`FUSED_PARAMS`): a model may store several of the table's tensors as ONE
leaf, e.g. ``self_attn.qkv_proj [R + 2H, D]`` after `step3_jax.layers.MFAttention.fuse_qkv`
(the rows of q_proj, k_proj, v_proj). The table always names the separate HF tensors:
`step3_jax.checkpoints.hf_save.save_hf` cuts a fused leaf back into them (bitwise, FP8 scales
included)
and ``load_hf(..., fuse_qkv=True)`` fills the separate leaves, then fuses.

Block-FP8 checkpoints add ``<name>_scale_inv`` (float32 ``[*batch, ceil(N/128), ceil(K/128)]``)
beside each quantizable ``*.weight``: ``Entry.quantizable`` marks them, ``Entry.num_batch`` /
``num_contract`` describe the 2-D ``[N, K]`` view the scales cover.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np

from step3_jax.config import Step3Config

# Where the text model's tensors sit in each published layout (STEP3.md section 3), rewritten
# to the plain text-model names of the table. Checked in order; the first match wins.
#   text-only / VL on disk (Step3VLForConditionalGeneration, vLLM, SGLang): model.*, lm_head.*
#   HF-transformers in memory (the model card's key_mapping): model.language_model.*, lm_head.*
#   vLLM's internal names after its WeightsMapper: language_model.model.*, language_model.lm_head.*
PREFIX_ALIASES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
# The vision half of the VL release (ViT, its two convolutional downsamplers, the projector
# into the 7168-wide embeddings), in BOTH layouts: on disk at the top level, in memory under
# ``model.``. `vision_name` strips the ``model.`` so a vision sub-loader sees one naming.
# The load skips these unless given a ``vision=`` callback (`hf_load.load_hf`).
VISION_MODULES = ("vision_model", "vit_downsampler", "vit_downsampler2", "vit_large_projector")
VISION_PREFIXES = tuple(f"{m}." for m in VISION_MODULES) + tuple(
    f"model.{m}." for m in VISION_MODULES
)
SCALE_SUFFIX = "_scale_inv"  # block-FP8: "<...>.weight_scale_inv" beside "<...>.weight"
BLOCK = 128  # block-FP8 checkpoints: one scale per 128x128 block of the 2-D weight
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# Dtypes a float parameter may be stored in; anything else (int8, bool, int64, float8_e5m2)
# would be cast to float silently and is refused.
FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64))
# Fused model leaf -> the table leaves (same module) whose rows it holds, in row order.
FUSED_PARAMS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named, invertible HF <-> model tensor transform (host numpy arrays)."""

    name: str
    to_model: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # A reshape of a C-contiguous array is a view: no copy, so no extra host memory.
    return np.ascontiguousarray(x).reshape(shape)


IDENTITY = Transform("identity", lambda x, _: x, lambda x, _: x)
SPLIT_HEADS_OUT = Transform("split_heads_out", _reshape, _reshape)  # [N*H, R] <-> [N, H, R]
SPLIT_HEADS_IN = Transform("split_heads_in", _reshape, _reshape)  # [D, N*H] <-> [D, N, H]
TRANSFORMS = {t.name: t for t in (IDENTITY, SPLIT_HEADS_OUT, SPLIT_HEADS_IN)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: where it lives on each side, its shapes and how to convert it."""

    hf_name: str
    path: tuple[str | int, ...]  # NNX state path, e.g. ("layers", 3, "self_attn", "wq")
    hf_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    transform: Transform = IDENTITY
    quantizable: bool = False  # block-FP8 checkpoints store it as fp8 + weight_scale_inv
    num_batch: int = 0  # leading batch axes of the FP8 2-D view (1 for stacked experts)
    num_contract: int = 1  # trailing contracted axes in the model layout (2 for o_proj)

    @property
    def path_str(self) -> str:
        return ".".join(str(p) for p in self.path)

    @property
    def scale_name(self) -> str:
        return self.hf_name + SCALE_SUFFIX

    def scale_shape(self, block: int = BLOCK) -> tuple[int, ...]:
        """HF ``weight_scale_inv`` shape: ``[*batch, ceil(N/block), ceil(K/block)]``."""
        *batch, n, k = self.hf_shape
        return (*batch, -(-n // block), -(-k // block))


def _attention(c: Step3Config, i: int) -> list[Entry]:
    d, r, n, h = c.hidden_size, c.share_q_dim, c.num_heads, c.head_dim
    hf, p = f"model.layers.{i}.", ("layers", i)
    a = f"{hf}self_attn."

    def lin(name, shape, model_shape=None, tf=IDENTITY, nc=1):
        model_shape = model_shape or shape
        return Entry(
            f"{a}{name}.weight", (*p, "self_attn", name), shape, model_shape, tf, True, 0, nc
        )

    return [
        Entry(f"{hf}input_layernorm.weight", (*p, "input_layernorm", "weight"), (d,), (d,)),
        lin("q_proj", (r, d)),
        lin("k_proj", (h, d)),
        lin("v_proj", (h, d)),
        Entry(f"{a}inter_norm.weight", (*p, "self_attn", "inter_norm", "weight"), (r,), (r,)),
        lin("wq", (n * h, r), (n, h, r), SPLIT_HEADS_OUT),
        lin("o_proj", (d, n * h), (d, n, h), SPLIT_HEADS_IN, nc=2),
        Entry(
            f"{hf}post_attention_layernorm.weight",
            (*p, "post_attention_layernorm", "weight"),
            (d,),
            (d,),
        ),
    ]


def _swiglu(hf_prefix: str, path: tuple, d: int, f: int) -> list[Entry]:
    shapes = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    return [
        Entry(f"{hf_prefix}{name}.weight", (*path, name), s, s, IDENTITY, True)
        for name, s in shapes.items()
    ]


def _ffn(c: Step3Config, i: int) -> list[Entry]:
    d, hf, p = c.hidden_size, f"model.layers.{i}.", ("layers", i, "ffn")
    if not c.is_moe_layer(i):
        return _swiglu(f"{hf}mlp.", p, d, c.intermediate_size)
    e, f = c.num_experts, c.moe_intermediate_size
    experts = {"gate_proj": (e, f, d), "up_proj": (e, f, d), "down_proj": (e, d, f)}
    out = [Entry(f"{hf}moe.gate.weight", (*p, "router"), (e, d), (e, d))]  # never quantized
    out += [
        Entry(f"{hf}moe.{name}.weight", (*p, name), s, s, IDENTITY, True, 1)
        for name, s in experts.items()
    ]
    if c.share_expert_dim:
        out += _swiglu(f"{hf}share_expert.", (*p, "shared_expert"), d, c.share_expert_dim)
    return out


def entries(config: Step3Config) -> list[Entry]:
    """Every parameter of a `Step3Model` built from ``config``, in checkpoint order."""
    v, d = config.vocab_size, config.hidden_size
    out = [Entry("model.embed_tokens.weight", ("embed_tokens",), (v, d), (v, d))]
    for i in range(config.num_layers):
        out += _attention(config, i) + _ffn(config, i)
    out.append(Entry("model.norm.weight", ("norm", "weight"), (d,), (d,)))
    out.append(Entry("lm_head.weight", ("lm_head",), (v, d), (v, d)))
    return out


def vision_name(name: str) -> str | None:
    """The on-disk name of a vision-half tensor (``vision_model.*``, ``vit_downsampler.*``,
    ``vit_downsampler2.*``, ``vit_large_projector.*``, with or without ``model.``), else None."""
    if not name.startswith(VISION_PREFIXES):
        return None
    return name[len("model.") :] if name.startswith("model.") else name


def canonical_name(name: str) -> str | None:
    """The text-model name of a checkpoint tensor, or None for a vision tensor."""
    if vision_name(name) is not None:
        return None
    for prefix, repl in PREFIX_ALIASES:
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    return name


def detect_layout(names) -> str:
    """Which published layout a checkpoint's tensor names follow (for messages and tests):
    ``"hf_transformers"`` (``model.language_model.*``), ``"vl"`` (text names plus a vision
    half on disk) or ``"text"`` (the text model alone)."""
    names = list(names)
    if any(n.startswith(("model.language_model.", "language_model.")) for n in names):
        return "hf_transformers"
    if any(vision_name(n) is not None for n in names):
        return "vl"
    return "text"


__all__ = [
    "BLOCK",
    "FLOAT_DTYPES",
    "FP8",
    "FUSED_PARAMS",
    "Entry",
    "PREFIX_ALIASES",
    "SCALE_SUFFIX",
    "TRANSFORMS",
    "Transform",
    "VISION_MODULES",
    "VISION_PREFIXES",
    "canonical_name",
    "detect_layout",
    "entries",
    "vision_name",
]
