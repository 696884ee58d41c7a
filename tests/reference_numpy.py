"""An independent float64 NumPy reference of the Step-3 text model (tests only).

Written from the architecture description (shared/STEP3.md sections 2-4), NOT from step3_jax:
it imports nothing from step3_jax (jax only to walk parameter pytrees). Weights are a flat dict keyed by the Hugging Face
checkpoint names with PyTorch ``[out, in]`` shapes, e.g.

    model.embed_tokens.weight                         [V, D]
    model.layers.{i}.input_layernorm.weight           [D]
    model.layers.{i}.self_attn.q_proj.weight          [R, D]
    model.layers.{i}.self_attn.k_proj.weight          [H, D]
    model.layers.{i}.self_attn.v_proj.weight          [H, D]
    model.layers.{i}.self_attn.inter_norm.weight      [R]
    model.layers.{i}.self_attn.wq.weight              [N*H, R]
    model.layers.{i}.self_attn.o_proj.weight          [D, N*H]
    model.layers.{i}.post_attention_layernorm.weight  [D]
    model.layers.{i}.mlp.{gate,up}_proj.weight        [F, D]      (dense layers)
    model.layers.{i}.mlp.down_proj.weight             [D, F]
    model.layers.{i}.moe.gate.weight                  [E, D]      (MoE layers: router)
    model.layers.{i}.moe.{gate,up}_proj.weight        [E, F, D]
    model.layers.{i}.moe.down_proj.weight             [E, D, F]
    model.layers.{i}.share_expert.{gate,up}_proj.weight [Fs, D]
    model.layers.{i}.share_expert.down_proj.weight    [D, Fs]
    model.norm.weight                                 [D]
    lm_head.weight                                    [V, D]

`weights_from_nnx_state` is the only function that knows step3_jax's parameter paths: it maps
an ``nnx.state(model)`` onto those names (reshaping ``wq [N, H, R] -> [N*H, R]`` and
``o_proj [D, N, H] -> [D, N*H]``), so a layout mistake in the JAX model shows up as a mismatch
against this reference rather than being copied into it.

Everything runs in float64, so the reference's own rounding (~1e-16 relative) is negligible
next to the float32 model under test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax  # pytree traversal only (weights_from_nnx_state, random_params)
import numpy as np


@dataclass(frozen=True)
class RefConfig:
    """The hyperparameters the reference needs (plain numbers, read from any config object)."""

    num_layers: int
    num_heads: int
    head_dim: int
    moe_layer_ids: tuple[int, ...]
    top_k: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_any(cls, cfg) -> RefConfig:
        return cls(
            num_layers=int(cfg.num_layers),
            num_heads=int(cfg.num_heads),
            head_dim=int(cfg.head_dim),
            moe_layer_ids=tuple(int(i) for i in cfg.moe_layer_ids),
            top_k=int(cfg.top_k),
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=float(cfg.rope_theta),
        )


# --------------------------------------------------------------------------- building blocks
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis."""
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope_neox(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """NeoX rotate-half RoPE over the whole last axis.

    ``x [B, T, ..., H]``, ``positions [B, T]``. Pair (x[i], x[i + H/2]) is rotated by the angle
    ``pos * theta ** (-2 i / H)``.
    """
    h = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)  # [H/2]
    ang = positions.astype(np.float64)[..., None] * inv_freq  # [B, T, H/2]
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[-1:])
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """``down(silu(gate(x)) * up(x))`` with [out, in] weights."""
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def mfa(
    h: np.ndarray, w: Mapping[str, np.ndarray], prefix: str, cfg: RefConfig, positions: np.ndarray
) -> np.ndarray:
    """Causal MFA self-attention of ``h [B, T, D]`` (already input-normed); returns [B, T, D]."""
    b, t, _ = h.shape
    n, hd = cfg.num_heads, cfg.head_dim
    q_lo = h @ w[prefix + "q_proj.weight"].T  # [B, T, R]
    k = h @ w[prefix + "k_proj.weight"].T  # [B, T, H]  the single K head
    v = h @ w[prefix + "v_proj.weight"].T  # [B, T, H]  the single V head
    q_lo = rmsnorm(q_lo, w[prefix + "inter_norm.weight"], cfg.rms_norm_eps)  # before wq
    q = (q_lo @ w[prefix + "wq.weight"].T).reshape(b, t, n, hd)
    q = rope_neox(q, positions, cfg.rope_theta)
    k = rope_neox(k, positions, cfg.rope_theta)
    scores = np.einsum("btnh,bsh->bnts", q, k) / np.sqrt(hd)
    causal = positions[:, None, :, None] >= positions[:, None, None, :]  # [B, 1, T(q), S(k)]
    scores = np.where(causal, scores, -np.inf)
    o = np.einsum("bnts,bsh->btnh", softmax(scores), v).reshape(b, t, n * hd)
    return o @ w[prefix + "o_proj.weight"].T


def route(h2: np.ndarray, router: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``p = softmax(h2 @ router^T)`` over ALL experts, then top-k; NOT renormalized.

    Returns ``(weights [M, K], ids [M, K])``, sorted by decreasing probability.
    """
    probs = softmax(h2 @ router.T)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    return np.take_along_axis(probs, ids, axis=-1), ids


def routing_margin(h2: np.ndarray, router: np.ndarray, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th expert probability over all tokens.

    A float32 model may legitimately pick a different expert when this gap is below its
    rounding error; tests assert it is comfortably larger so the comparison is well posed.
    """
    probs = np.sort(softmax(h2.reshape(-1, h2.shape[-1]) @ router.T), axis=-1)[:, ::-1]
    if top_k >= probs.shape[-1]:
        return float("inf")
    return float(np.min(probs[:, top_k - 1] - probs[:, top_k]))


def moe(h2: np.ndarray, w: Mapping[str, np.ndarray], i: int, top_k: int) -> np.ndarray:
    """Routed experts (loop over tokens and their k experts) plus the shared expert."""
    shape = h2.shape
    x = h2.reshape(-1, shape[-1])
    p = f"model.layers.{i}.moe."
    weights, ids = route(x, w[p + "gate.weight"], top_k)
    out = np.zeros_like(x)
    for m in range(x.shape[0]):
        for j in range(top_k):
            e = ids[m, j]
            gate, up, down = (
                w[p + n][e] for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
            )
            out[m] += weights[m, j] * swiglu(x[m], gate, up, down)
    s = f"model.layers.{i}.share_expert."
    if s + "gate_proj.weight" in w:
        out += swiglu(
            x, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"]
        )
    return out.reshape(shape)


# --------------------------------------------------------------------------- the whole model
def decoder_layer(
    x: np.ndarray, w: Mapping[str, np.ndarray], i: int, cfg: RefConfig, positions: np.ndarray
) -> np.ndarray:
    p = f"model.layers.{i}."
    h = rmsnorm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    x = x + mfa(h, w, p + "self_attn.", cfg, positions)
    h2 = rmsnorm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    if i in cfg.moe_layer_ids:
        return x + moe(h2, w, i, cfg.top_k)
    return x + swiglu(
        h2,
        w[p + "mlp.gate_proj.weight"],
        w[p + "mlp.up_proj.weight"],
        w[p + "mlp.down_proj.weight"],
    )


def hidden_states(
    weights: Mapping[str, np.ndarray], tokens: np.ndarray, cfg, positions: np.ndarray | None = None
) -> list[np.ndarray]:
    """Residual stream after the embedding and after each layer: ``L + 1`` arrays [B, T, D]."""
    cfg = cfg if isinstance(cfg, RefConfig) else RefConfig.from_any(cfg)
    tokens = np.asarray(tokens)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    x = weights["model.embed_tokens.weight"][tokens]
    states = [x]
    for i in range(cfg.num_layers):
        x = decoder_layer(x, weights, i, cfg, np.asarray(positions))
        states.append(x)
    return states


def forward(
    weights: Mapping[str, np.ndarray], tokens: np.ndarray, cfg, positions: np.ndarray | None = None
) -> np.ndarray:
    """float64 logits ``[B, T, V]`` of int ``tokens [B, T]`` (causal, no cache)."""
    cfg = cfg if isinstance(cfg, RefConfig) else RefConfig.from_any(cfg)
    x = hidden_states(weights, tokens, cfg, positions)[-1]
    x = rmsnorm(x, weights["model.norm.weight"], cfg.rms_norm_eps)
    return x @ weights["lm_head.weight"].T


def post_attention_inputs(
    weights: Mapping[str, np.ndarray], tokens: np.ndarray, cfg
) -> dict[int, np.ndarray]:
    """``h2`` (the MoE input) of every MoE layer, for `routing_margin`."""
    cfg = cfg if isinstance(cfg, RefConfig) else RefConfig.from_any(cfg)
    states = hidden_states(weights, tokens, cfg)
    positions = np.broadcast_to(np.arange(np.shape(tokens)[1]), np.shape(tokens))
    out = {}
    for i in cfg.moe_layer_ids:
        p = f"model.layers.{i}."
        h = rmsnorm(states[i], weights[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        x = states[i] + mfa(h, weights, p + "self_attn.", cfg, positions)
        out[i] = rmsnorm(x, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return out


# --------------------------------------------------------------------------- NNX -> HF names
def _key_name(k) -> str | None:
    """DictKey/SequenceKey -> its key as a string; GetAttrKey("value") (the Variable box) -> None."""
    for attr in ("key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return None


def _leaves(state) -> dict[tuple[str, ...], np.ndarray]:
    """Flattens a parameter pytree (an ``nnx.State``) into ``{path: float64 array}``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = tuple(n for n in map(_key_name, path) if n is not None)
        out[names] = np.asarray(leaf, dtype=np.float64)
    return out


def weights_from_nnx_state(state, cfg) -> dict[str, np.ndarray]:
    """Maps a `step3_jax.Step3Model`'s ``nnx.state`` onto HF names with [out, in] shapes."""
    cfg = cfg if isinstance(cfg, RefConfig) else RefConfig.from_any(cfg)
    leaves = _leaves(state)
    w = {
        "model.embed_tokens.weight": leaves[("embed_tokens",)],
        "model.norm.weight": leaves[("norm", "weight")],
        "lm_head.weight": leaves[("lm_head",)],
    }
    n_h = cfg.num_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        lay, p = ("layers", str(i)), f"model.layers.{i}."
        a = lay + ("self_attn",)
        w[p + "input_layernorm.weight"] = leaves[lay + ("input_layernorm", "weight")]
        w[p + "post_attention_layernorm.weight"] = leaves[
            lay + ("post_attention_layernorm", "weight")
        ]
        for name in ("q_proj", "k_proj", "v_proj"):
            w[p + f"self_attn.{name}.weight"] = leaves[a + (name,)]
        w[p + "self_attn.inter_norm.weight"] = leaves[a + ("inter_norm", "weight")]
        w[p + "self_attn.wq.weight"] = leaves[a + ("wq",)].reshape(n_h, -1)
        o_proj = leaves[a + ("o_proj",)]
        w[p + "self_attn.o_proj.weight"] = o_proj.reshape(o_proj.shape[0], n_h)
        f = lay + ("ffn",)
        if i in cfg.moe_layer_ids:
            w[p + "moe.gate.weight"] = leaves[f + ("router",)]
            for name in ("gate_proj", "up_proj", "down_proj"):
                w[p + f"moe.{name}.weight"] = leaves[f + (name,)]
                key = f + ("shared_expert", name)
                if key in leaves:
                    w[p + f"share_expert.{name}.weight"] = leaves[key]
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                w[p + f"mlp.{name}.weight"] = leaves[f + (name,)]
    return w


def random_params(state, seed: int, norm_jitter: float = 0.5):
    """Seeded random float32 values for every leaf of an (abstract) parameter pytree.

    Hostile but well scaled: norm scales ``1 + U(-j, j)`` (never all ones, so a missing norm
    weight is caught), the embedding N(0, 1), every other matrix N(0, 1/fan_in) with fan_in the
    contraction length (the last axis; ``N*H`` for ``o_proj [D, N, H]``).
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [n for n in map(_key_name, path) if n is not None]
        shape = tuple(leaf.shape)
        if len(shape) == 1:
            x = 1.0 + rng.uniform(-norm_jitter, norm_jitter, size=shape)
        elif "embed_tokens" in names:
            x = rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if "o_proj" in names else shape[-1]
            x = rng.standard_normal(shape) / np.sqrt(fan_in)
        return np.asarray(x, dtype=np.float32)

    return jax.tree_util.tree_map_with_path(fill, state)
