"""Step-3 text-model configuration.

One frozen dataclass describes the architecture. Only `Step3Config.from_hf_config` knows the
Hugging Face key names. Axis letters used across the project (see docs/DESIGN.md):
B batch, T new tokens, S cache length, D hidden, R low-rank query, N heads, H head dim,
E experts, K top-k, F FFN hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

# Upper bounds, far above any real model, checked before anything is sized from the config (a
# corrupt config.json must raise, not spend minutes allocating). Step-3 is 61 layers, D 7168,
# V 128815, 48 experts, 64K context.
HF_MAX = {
    "vocab_size": 2**24,
    "hidden_size": 2**17,
    "num_layers": 2**12,
    "num_heads": 2**12,
    "head_dim": 2**12,
    "share_q_dim": 2**17,
    "intermediate_size": 2**20,
    "num_experts": 2**14,
    "top_k": 2**14,
    "moe_intermediate_size": 2**20,
    "share_expert_dim": 2**20,
    "max_position_embeddings": 2**24,
}
# HF config.json keys read by `Step3Config.from_hf_config`, checked for type before use.
_HF_INT_KEYS = (
    "vocab_size hidden_size num_hidden_layers num_attention_heads head_dim share_q_dim "
    "intermediate_size moe_num_experts moe_top_k moe_intermediate_size share_expert_dim "
    "max_position_embedding max_position_embeddings num_attention_groups"
).split()
_HF_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")


def is_int(x) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def brief(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a hostile config.json value (a megabyte
    string, a huge list) must not become a megabyte error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_sizes(where: str, *, minimum: int = 1, **sizes) -> None:
    """Each size an integer (not a bool) >= ``minimum``; the error names ``where`` and the
    size, before anything is allocated from it."""
    for name, value in sizes.items():
        if not is_int(value) or value < minimum:
            raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {brief(value)}")


def _is_finite_real(x) -> bool:
    return is_real(x) and math.isfinite(x)


def mapping_or_none(value, key: str) -> Mapping:
    """A ``config.json`` sub-config that may be absent: a mapping, or None (as ``{}``)."""
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"config key {key!r} must be a mapping (or null), got {brief(value)}")
    return value or {}


def _check_rope_factor(factor, name: str) -> None:
    if not (_is_finite_real(factor) and factor > 0):  # inf: every position 0
        raise ValueError(f"{name} must be a finite number > 0, got {brief(factor)}")


def _check_hf_values(hf: Mapping[str, Any]) -> None:
    """Types and sizes of the HF keys, before any is used to size anything (names the key)."""
    for key in _HF_INT_KEYS:
        if key in hf and not is_int(hf[key]):
            raise ValueError(f"config key {key!r} must be an integer, got {brief(hf[key])}")
    for key in _HF_FLOAT_KEYS:
        if key in hf and not _is_finite_real(hf[key]):
            raise ValueError(f"config key {key!r} must be a finite number, got {brief(hf[key])}")
    theta = _rope_params(hf).get("rope_theta")
    if theta is not None and not _is_finite_real(theta):
        raise ValueError(
            f"config key 'rope_parameters.rope_theta' must be a finite number, got {brief(theta)}"
        )
    layers = hf.get("num_hidden_layers")
    if is_int(layers) and not 0 < layers <= HF_MAX["num_layers"]:
        raise ValueError(
            f"config key 'num_hidden_layers' must be in [1, {HF_MAX['num_layers']}], got {layers}"
        )


ROPE_SCALING_TYPES = ("linear",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling rule (frozen, hashable: it lives in `Step3Config`).

    ``rope_type``: ``"linear"`` (the only one implemented); ``factor`` > 0: positions are
    divided by it, so a model trained at context C attends over ``factor * C``.
    """

    rope_type: str
    factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling type {brief(self.rope_type)} is not supported: step3_jax "
                f"implements {ROPE_SCALING_TYPES} (the Step-3 release uses no scaling)"
            )
        _check_rope_factor(self.factor, "rope_scaling factor")


# vLLM's / SGLang's Step3TextConfig defaults (the released model): a text sub-config saved with
# only its non-default keys (transformers' ``to_diff_dict``) gets these for the missing ones.
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "num_attention_heads": 64,
    "num_attention_groups": 1,
    "num_hidden_layers": 61,
    "max_seq_len": 65536,
    "vocab_size": 128815,
    "rms_norm_eps": 1e-5,
    "moe_intermediate_size": 5120,
    "moe_num_experts": 48,
    "moe_top_k": 3,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "max_position_embedding": 65536,
    "share_expert_dim": 5120,
    "share_q_dim": 2048,
    "head_dim": 256,
    "norm_expert_weight": False,
    "moe_layers_enum": tuple(range(4, 60)),
}


@dataclasses.dataclass(frozen=True)
class Step3Config:
    vocab_size: int = 128815  # V: untied embedding and lm_head rows
    hidden_size: int = 7168  # D: residual stream width
    num_layers: int = 61  # L: decoder layers
    num_heads: int = 64  # N: query heads (all share ONE K head and ONE V head)
    head_dim: int = 256  # H: width of each query head and of the single K/V head
    share_q_dim: int = 2048  # R: low-rank shared query width (q_proj -> inter_norm -> wq)
    intermediate_size: int = 18432  # F of the dense SwiGLU layers
    moe_layer_ids: tuple[int, ...] = tuple(range(4, 60))  # layers whose FFN is the MoE
    num_experts: int = 48  # E: routed experts per MoE layer
    top_k: int = 3  # K: experts per token (weights NOT renormalized)
    moe_intermediate_size: int = 5120  # F of each routed expert
    share_expert_dim: int = 5120  # F of the always-on shared expert (0: none)
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon, all norms
    rope_theta: float = 500000.0  # NeoX rotate-half RoPE over all H dims
    max_position_embeddings: int = 65536  # longest supported context
    moe_renormalize: bool = False  # divide the top-k routing weights by their sum (not Step-3)
    rope_scaling: RopeScaling | None = None  # None: plain RoPE (the release)

    def __post_init__(self):
        for name, hi in HF_MAX.items():
            value = getattr(self, name)
            low = 0 if name == "share_expert_dim" else 1
            if not is_int(value) or not low <= value <= hi:
                raise ValueError(
                    f"Step3Config.{name} must be an integer in [{low}, {hi}], got {value!r}"
                )
        for name, hi in (("rms_norm_eps", 1.0), ("rope_theta", 1e12)):
            value = getattr(self, name)
            if not is_real(value) or not 0 < value <= hi:  # NaN fails too
                raise ValueError(
                    f"Step3Config.{name} must be a finite number in (0, {hi:g}], got {value!r}"
                )
        if self.share_expert_dim < 0:
            raise ValueError(
                f"Step3Config.share_expert_dim must be >= 0 (0: none), got {self.share_expert_dim}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Step3Config.head_dim must be even for RoPE, got {self.head_dim}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if isinstance(self.moe_layer_ids, (str, bytes)):
            raise ValueError(f"moe_layer_ids must be a tuple of ints, got {self.moe_layer_ids!r}")
        ids = tuple(self.moe_layer_ids)
        object.__setattr__(self, "moe_layer_ids", ids)
        bad = [i for i in ids if not is_int(i) or not 0 <= i < self.num_layers]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(
                f"moe_layer_ids must be distinct layer indices in [0, {self.num_layers}), got {ids}"
            )

    # ----------------------------------------------------------------- presets
    @classmethod
    def step3(cls) -> Step3Config:
        """The released 316B Step-3 text model."""
        return cls()

    @classmethod
    def tiny(cls) -> Step3Config:
        """Same structure at toy size: dense first/last layers, MoE in between, shared expert."""
        return cls(
            vocab_size=512,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            head_dim=32,
            share_q_dim=64,
            intermediate_size=256,
            moe_layer_ids=(1, 2),
            num_experts=8,
            top_k=2,
            moe_intermediate_size=96,
            share_expert_dim=96,
            max_position_embeddings=1024,
        )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> Step3Config:
        """Builds a config from a Step-3 HF ``config.json`` dict (text part).

        Accepts the VL checkpoint's nesting (``text_config``, absent or partial: missing keys
        take `HF_TEXT_DEFAULTS`, the reference implementations' Step3TextConfig defaults),
        ``moe_layers_enum`` as the comma-separated string HF uses (or a list), and
        ``max_position_embedding`` with or without the trailing "s". Keys that change the math
        are implemented (``norm_expert_weight``, ``rope_scaling`` "linear") or refused by name.
        """
        if "text_config" in hf or hf.get("model_type") == "step3_vl":
            hf = mapping_or_none(hf.get("text_config"), "text_config")
        hf = {**HF_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        _check_hf_values(hf)
        num_layers = int(hf["num_hidden_layers"])
        max_pos = hf.get("max_position_embeddings", hf["max_position_embedding"])
        if int(hf["num_attention_groups"]) != 1:
            raise ValueError(
                "num_attention_groups must be 1 (Step-3 MFA has one K/V head), got "
                f"{hf['num_attention_groups']}"
            )
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=num_layers,
            num_heads=int(hf["num_attention_heads"]),
            head_dim=int(hf["head_dim"]),
            share_q_dim=int(hf["share_q_dim"]),
            intermediate_size=int(hf["intermediate_size"]),
            moe_layer_ids=_moe_layer_ids(hf["moe_layers_enum"], num_layers),
            num_experts=int(hf["moe_num_experts"]),
            top_k=int(hf["moe_top_k"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            share_expert_dim=int(hf["share_expert_dim"]),
            rms_norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=float(_rope_theta(hf)),
            max_position_embeddings=int(max_pos),
            moe_renormalize=_strict_bool(hf["norm_expert_weight"], "norm_expert_weight"),
            rope_scaling=_rope_scaling(hf),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The inverse of `from_hf_config` (text-model keys of a Step-3 ``config.json``)."""
        return {
            "architectures": ["Step3TextForCausalLM"],
            "model_type": "step3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_attention_groups": 1,
            "head_dim": self.head_dim,
            "share_q_dim": self.share_q_dim,
            "intermediate_size": self.intermediate_size,
            "moe_layers_enum": ",".join(str(i) for i in self.moe_layer_ids),
            "moe_num_experts": self.num_experts,
            "moe_top_k": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "share_expert_dim": self.share_expert_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embedding": self.max_position_embeddings,
            "norm_expert_weight": self.moe_renormalize,
            "rope_scaling": None
            if self.rope_scaling is None
            else {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor},
            "tie_word_embeddings": False,
        }

    # ----------------------------------------------------------- derived values
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layer_ids

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layer_ids)

    @property
    def attention_params_per_layer(self) -> int:
        """q_proj, k_proj, v_proj, wq, o_proj and the three norms of one layer."""
        d, r, n, h = self.hidden_size, self.share_q_dim, self.num_heads, self.head_dim
        linears = d * r + 2 * d * h + r * n * h + n * h * d
        return linears + r + 2 * d  # inter_norm + input/post-attention norms

    def _swiglu_params(self, f: int) -> int:
        return 3 * self.hidden_size * f

    @property
    def expert_params(self) -> int:
        return self._swiglu_params(self.moe_intermediate_size)

    @property
    def moe_layer_ffn_params(self) -> int:
        router = self.num_experts * self.hidden_size
        shared = self._swiglu_params(self.share_expert_dim) if self.share_expert_dim else 0
        return self.num_experts * self.expert_params + shared + router

    @property
    def dense_layer_ffn_params(self) -> int:
        return self._swiglu_params(self.intermediate_size)

    def param_count(self) -> int:
        """All parameters: embedding, layers, final norm, untied lm_head."""
        n_moe = len(self.moe_layer_ids)
        n_dense = self.num_layers - n_moe
        emb = self.vocab_size * self.hidden_size
        return (
            2 * emb
            + self.hidden_size
            + self.num_layers * self.attention_params_per_layer
            + n_dense * self.dense_layer_ffn_params
            + n_moe * self.moe_layer_ffn_params
        )

    def activated_param_count(self, include_embeddings: bool = True) -> int:
        """Parameters touched per token: top_k routed experts + shared expert + router."""
        n_moe = len(self.moe_layer_ids)
        n_dense = self.num_layers - n_moe
        shared = self._swiglu_params(self.share_expert_dim) if self.share_expert_dim else 0
        moe_active = self.top_k * self.expert_params + shared + self.num_experts * self.hidden_size
        body = (
            self.num_layers * self.attention_params_per_layer
            + n_dense * self.dense_layer_ffn_params
            + n_moe * moe_active
            + self.hidden_size
        )
        emb = 2 * self.vocab_size * self.hidden_size if include_embeddings else 0
        return body + emb

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0, per_layer: bool = False) -> float:
        """KV-cache bytes per token: one K and one V head of `head_dim` values per layer.

        ``bytes_per_value=1`` gives the FP8 figure (512 B per layer for Step-3), scales excluded.
        """
        per = 2 * self.head_dim * bytes_per_value
        return per if per_layer else per * self.num_layers


# --------------------------------------------------------------------------- HF key helpers
def _moe_layer_ids(enum, num_layers: int) -> tuple[int, ...]:
    try:
        if isinstance(enum, str):
            ids = tuple(int(p) for p in enum.replace(" ", "").split(",") if p != "")
        elif isinstance(enum, (list, tuple)) and all(is_int(p) for p in enum):
            ids = tuple(int(p) for p in enum)
        else:
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(
            f"moe_layers_enum must list integer layer ids (e.g. '4,5,6'), got {brief(enum)}"
        ) from None
    if enum is HF_TEXT_DEFAULTS["moe_layers_enum"] and max(ids) >= num_layers:
        raise ValueError(
            f"moe_layers_enum is absent and its default (layers 4..59) does not fit "
            f"num_hidden_layers={num_layers}: give moe_layers_enum explicitly"
        )
    return ids


def _strict_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {brief(value)}")
    return value


def _rope_params(hf: Mapping[str, Any]) -> dict:
    """transformers >= 5 nests rope_theta and the scaling type in ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters must be a mapping, got {brief(params)}")
    return dict(params)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """``rope_parameters.rope_theta`` if given (transformers >= 5), else ``rope_theta``."""
    theta = _rope_params(hf).get("rope_theta")
    return hf["rope_theta"] if theta is None else theta


def _rope_scaling(hf: Mapping[str, Any]) -> RopeScaling | None:
    """``rope_scaling`` (or ``rope_parameters``) -> `RopeScaling`; None/"default" -> None."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = hf.get("rope_scaling") or _rope_params(hf)
    if not scaling:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope_scaling must be null or a mapping, got {brief(scaling)}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if "factor" not in scaling:
        raise ValueError(f"rope_scaling {brief(rope_type)} needs a 'factor', got {brief(scaling)}")
    factor = scaling["factor"]
    _check_rope_factor(factor, f"config key '{key}.factor'")
    return RopeScaling(str(rope_type), float(factor))
