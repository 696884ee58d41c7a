"""What crosses between the roles every layer, and the per-role layer math.

Per layer and micro-batch (the paper's protocol, STEP3.md section 6):

* attention side: input norm, MFA (with the cache write), residual, post-attention norm,
  router top-k; then `pack`: the normalized hidden state ``h2 [T, D]`` as FP8 e4m3 values
  with per-token per-128 scales ``[T, D/128]`` f32 (`step3_jax.quant.quantize_activations`),
  the expert ids ``[T, K]`` int32 and weights ``[T, K]`` f32 -> every FFN device.
  With ``fp8=False`` the values travel in the activation dtype and ``scales`` is None.
* FFN side: `unpack` (dequantize), its local experts' share of the routed FFN plus its
  tensor-parallel slice of the shared expert (MoE layers) or of the dense SwiGLU (dense
  layers) -> a partial ``[T, D]`` in the activation dtype back to the attention device.
* attention side: ``x = x_mid + sum over FFN devices of the partials``.

Dense layers send the same packet shape (ids/weights zero) so one compiled program serves both
layer kinds. The functions mirror `step3_jax.model.DecoderLayer` op for op (same norms,
projections, RoPE, cache write and attention code), so an executor built on them reproduces
single-device decode; `reference_forward` is that single-device oracle with the same FP8
transfer applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from step3_jax import quant
from step3_jax.cache import KVCache
from step3_jax.layers.linear import project
from step3_jax.layers.mlp import swiglu
from step3_jax.layers.moe import experts_dense, route
from step3_jax.layers.norms import rms_norm
from step3_jax.layers.rope import apply_rope
from step3_jax.model import cached_attention

FFN_IMPLEMENTATIONS = ("dense", "grouped")


@struct.dataclass
class Packet:
    """One micro-batch's A->F message; leading axes are free (``[..., T, D]``)."""

    values: Array  # [..., T, D] float8_e4m3fn (fp8) or the activation dtype
    scales: Array | None  # [..., T, ceil(D/128)] float32, or None without FP8
    ids: Array  # [..., T, K] int32 global expert ids (zeros in dense layers)
    weights: Array  # [..., T, K] float32 router weights (zeros in dense layers)

    def nbytes(self) -> int:
        leaves = jax.tree_util.tree_leaves(self)
        return int(sum(x.size * x.dtype.itemsize for x in leaves))


@struct.dataclass
class ExpertPool:
    """``count`` experts stored in place inside a larger stack: matrices ``[offset, offset +
    count)`` of ``values [P, N, K]`` (the AFD arena viewed as matrices), with their own FP8
    128x128 block scales ``[count, N/128, K/128]`` (None for float weights). The grouped GEMM
    reads them where they are; `materialize` is the sliced copy for the other paths."""

    values: Array
    offset: Array  # int32 scalar (may be traced)
    scale: Array | None
    count: int = struct.field(pytree_node=False)

    def materialize(self):
        from step3_jax.quant_model import Fp8Weight

        v = jax.lax.dynamic_slice_in_dim(self.values, self.offset, self.count)
        return v if self.scale is None else Fp8Weight(v, self.scale)


def pack(h2: Float[Array, "T D"], routing, top_k: int, fp8: bool) -> Packet:
    """Attention side: the A->F message for ``h2`` (see module docstring)."""
    t = h2.shape[0]
    if routing is None:
        weights, ids = jnp.zeros((t, top_k), jnp.float32), jnp.zeros((t, top_k), jnp.int32)
    else:
        weights, ids = routing
    if fp8:
        values, scales = quant.quantize_activations(h2)
        return Packet(values, scales, ids, weights.astype(jnp.float32))
    return Packet(h2, None, ids, weights.astype(jnp.float32))


def unpack(p: Packet, dtype) -> Array:
    """FFN side: the hidden state the experts read (dequantized when FP8)."""
    if p.scales is None:
        return p.values.astype(dtype)
    return quant.dequantize_activations(p.values, p.scales, dtype=dtype)


def fake_transfer(h2: Array, fp8: bool) -> Array:
    """What the FFN side sees of ``h2`` after the transfer (for single-device oracles)."""
    if not fp8:
        return h2
    q, s = quant.quantize_activations(h2)
    return quant.dequantize_activations(q, s, dtype=h2.dtype)


# ----------------------------------------------------------------------- attention role
def attention_qkv(
    p: dict, x: Float[Array, "B T D"], positions: Int[Array, "B T"], *, eps, rope_theta, dtype
):
    """Input norm, low-rank query with inter_norm, K/V projections, RoPE (MFAttention.qkv)."""
    h = rms_norm(x, p["input_norm"], eps).astype(dtype)
    q_lo = rms_norm(project(h, p["q_proj"], "BTD,RD->BTR"), p["inter_norm"], eps)
    q = project(q_lo, p["wq"], "BTR,NHR->BTNH")
    k = project(h, p["k_proj"], "BTD,HD->BTH")
    v = project(h, p["v_proj"], "BTD,HD->BTH")
    return apply_rope(q, positions, rope_theta), apply_rope(k, positions, rope_theta), v


def attention_out(
    p: dict,
    x,
    q,
    cache: KVCache,
    positions,
    *,
    eps,
    dtype,
    top_k: int,
    is_moe,
    implementation="xla",
):
    """Attention over layer 0 of ``cache`` (already holding the new K/V), o_proj, residual,
    post-attention norm and routing. Returns ``(x_mid, h2, (weights, ids))``; ``is_moe`` may
    be traced: for dense layers the routing is zeroed (the FFN side ignores it)."""
    o = cached_attention(q, cache, 0, positions, implementation)
    return attention_post(p, x, o, eps=eps, dtype=dtype, top_k=top_k, is_moe=is_moe)


def attention_post(p: dict, x, o, *, eps, dtype, top_k: int, is_moe):
    """o_proj of the attention output ``o [B, T, N, H]``, residual, post-attention norm and
    routing (the part of `attention_out` after the attention itself)."""
    x_mid = x + project(o, p["o_proj"], "BTNH,DNH->BTD").astype(x.dtype)
    h2 = rms_norm(x_mid, p["post_norm"], eps)
    weights, ids = route(h2.astype(dtype), p["router"], top_k)
    keep = jnp.asarray(is_moe)
    return x_mid, h2, (jnp.where(keep, weights, 0.0), jnp.where(keep, ids, 0))


def final_logits(g: dict, x: Float[Array, "B D"], eps) -> Float[Array, "B V"]:
    return project(rms_norm(x, g["final_norm"], eps), g["lm_head"], "BD,VD->BV", jnp.float32)


# ----------------------------------------------------------------------------- FFN role
def _grouped_routed(x, ids, weights, p: dict, first_expert):
    """The routed experts through the grouped GEMM (`step3_jax.kernels.grouped_gemm.moe_ffn`);
    `ExpertPool` weights are read in place at their offsets."""
    from step3_jax.kernels.grouped_gemm import moe_ffn
    from step3_jax.quant_model import split_fp8

    names = ("gate", "up", "down")
    kw = {}
    if isinstance(p["gate"], ExpertPool):
        pools = [p[k] for k in names]
        (wg, sg), (wu, su), (wd, sd) = ((q.values, q.scale) for q in pools)
        kw = dict(num_local_experts=pools[0].count, weight_offset=tuple(q.offset for q in pools))
    else:
        (wg, sg), (wu, su), (wd, sd) = (split_fp8(p[k]) for k in names)
    out = moe_ffn(
        x,
        ids,
        weights,
        wg,
        wu,
        wd,
        first_expert=first_expert,
        w_gate_scale=sg,
        w_up_scale=su,
        w_down_scale=sd,
        **kw,
    )
    return out.astype(x.dtype)


def routed_partial(x, ids, weights, p: dict, first_expert, implementation: str):
    """This device's experts ``[first_expert, first_expert + E_local)`` (any F slice) applied
    to ``x [T, D]``; pairs routed elsewhere contribute exactly 0. Expert weights are arrays,
    `Fp8Weight` or `ExpertPool` (in place; the "dense" path materializes them)."""
    if implementation == "grouped":
        return _grouped_routed(x, ids, weights, p, first_expert)
    p = {k: v.materialize() if isinstance(v, ExpertPool) else v for k, v in p.items()}
    e_local = p["gate"].shape[0]
    local = (ids >= first_expert) & (ids < first_expert + e_local)
    lw = jnp.where(local, weights, 0.0)
    lid = jnp.where(local, ids - first_expert, 0)
    return experts_dense(x, lw, lid, p["gate"], p["up"], p["down"])


def ffn_partial(
    packet: Packet, p: dict, *, is_moe: bool, first_expert, dtype, implementation: str = "dense"
) -> Array:
    """FFN device: partial output ``[T, D]`` of one layer for the packet's tokens."""
    if implementation not in FFN_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {FFN_IMPLEMENTATIONS}, got {implementation!r}"
        )
    x = unpack(packet, dtype)
    if not is_moe:
        return swiglu(x, p["dense_gate"], p["dense_up"], p["dense_down"])
    out = routed_partial(x, packet.ids, packet.weights, p, first_expert, implementation)
    if "shared_gate" in p:
        out = out + swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"])
    return out


# ------------------------------------------------------------------ single-device oracle
def reference_forward(
    model,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: KVCache,
    fp8_transfer: bool,
):
    """`Step3Model.__call__` with the FFN input passed through the A->F transfer's
    quantization (identity when ``fp8_transfer`` is False). Returns ``(logits, cache)``."""
    x = model.embed(tokens)
    for layer in model.layers:
        x_mid, h2, routing, cache = layer.attention_half(
            x, positions, cache, attention_implementation=model.attention_implementation
        )
        h2 = fake_transfer(h2, fp8_transfer)
        x = x_mid + layer.ffn_half(h2, routing).astype(x.dtype)
    return model.logits(x), cache.replace(lengths=positions[:, -1] + 1)


StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to a bucketed length (as `step3_jax.decode.generate`): tokens, lengths."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    width = max(8, 1 << int(lengths.max() - 1).bit_length())
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out, lengths


def greedy_generate(step: StepFn, prompts: Sequence[Sequence[int]], max_new: int) -> np.ndarray:
    """Greedy tokens ``[B, max_new]`` from ``step(tokens [B,T], positions [B,T], select [B])
    -> logits [B, V]`` (select: the token whose logits are returned). One prefill call over
    the padded prompts, then one call per new token."""
    tokens, lengths = pad_prompts(prompts)
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    logits = step(tokens, positions, lengths - 1)
    out = [np.asarray(jnp.argmax(logits, -1), np.int32)]
    for i in range(max_new - 1):
        pos = (lengths + i)[:, None].astype(np.int32)
        logits = step(out[-1][:, None], pos, np.zeros((b,), np.int32))
        out.append(np.asarray(jnp.argmax(logits, -1), np.int32))
    return np.stack(out, axis=1)


# ------------------------------------------------------------- parameters of each role
def _val(param) -> np.ndarray:
    return np.asarray(param[...])


# The attention role's per-layer tensors, in arena order.
ATTENTION_TENSORS = (
    "input_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "inter_norm",
    "wq",
    "o_proj",
    "post_norm",
    "router",
)


def attention_params(model) -> dict[str, np.ndarray]:
    """Attention-role tensors of ``model``: per-layer ones stacked ``[L, ...]``, globals
    ``[1, ...]``; dense layers get an all-zero router (their routing is discarded). A model
    with fused q/k/v (``qkv_proj``) gives the same separate ``q_proj``/``k_proj``/``v_proj``."""
    c = model.config
    per: dict[str, list] = {k: [] for k in ATTENTION_TENSORS}
    for layer in model.layers:
        a = layer.self_attn
        per["input_norm"].append(_val(layer.input_layernorm.weight))
        per["post_norm"].append(_val(layer.post_attention_layernorm.weight))
        per["inter_norm"].append(_val(a.inter_norm.weight))
        # qkv_weights: a fused qkv_proj (MFAttention.fuse_qkv) is cut back into the three
        # weights bitwise, so AFD runs the same per-role layout from a fused or unfused model.
        for k, w in zip(("q_proj", "k_proj", "v_proj"), a.qkv_weights(), strict=True):
            per[k].append(_val(w))
        for k in ("wq", "o_proj"):
            per[k].append(_val(getattr(a, k)))
        dt = per["input_norm"][-1].dtype
        per["router"].append(
            _val(layer.ffn.router) if layer.is_moe else np.zeros((c.num_experts, c.hidden_size), dt)
        )
    out = {k: np.stack(v) for k, v in per.items()}
    out["embed"] = _val(model.embed_tokens)[None]
    out["final_norm"] = _val(model.norm.weight)[None]
    out["lm_head"] = _val(model.lm_head)[None]
    return out


def ffn_params(model) -> dict[str, np.ndarray]:
    """FFN-role tensors of ``model`` (unsplit): MoE ones stacked over MoE layers, dense ones
    over dense layers, both in layer order."""
    out: dict[str, list] = {}
    for layer in model.layers:
        f = layer.ffn
        if layer.is_moe:
            items = {"gate": f.gate_proj, "up": f.up_proj, "down": f.down_proj}
            if f.shared_expert is not None:
                s = f.shared_expert
                items |= {
                    "shared_gate": s.gate_proj,
                    "shared_up": s.up_proj,
                    "shared_down": s.down_proj,
                }
        else:
            items = {"dense_gate": f.gate_proj, "dense_up": f.up_proj, "dense_down": f.down_proj}
        for k, v in items.items():
            out.setdefault(k, []).append(_val(v))
    return {k: np.stack(v) for k, v in out.items()}


def _tp_slice(w: np.ndarray, axis: int, index: int, ways: int) -> np.ndarray:
    """Slice ``index`` of ``ways`` along ``axis``, zero-padded to equal widths (exact: a zero
    gate/up row or down column adds exactly 0 to the SwiGLU output)."""
    n = w.shape[axis]
    width = -(-n // ways)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, width * ways - n)
    w = np.pad(w, pad)
    return np.take(w, np.arange(index * width, (index + 1) * width), axis=axis)


def ffn_device_params(full: dict[str, np.ndarray], layout, j: int) -> dict[str, np.ndarray]:
    """FFN device ``j``'s share: experts of its EP group, F slice of its TP index; shared
    expert and dense FFN split over all FFN devices. Arrays keep the leading layer axis."""
    ep, tp = layout.ffn_coords(j)
    y = layout.num_ffn
    e_local = full["gate"].shape[1] // layout.ffn_ep if "gate" in full else 0
    out = {}
    for k, w in full.items():
        if k in ("gate", "up"):
            w = _tp_slice(w[:, ep * e_local : (ep + 1) * e_local], 2, tp, layout.ffn_tp)
        elif k == "down":
            w = _tp_slice(w[:, ep * e_local : (ep + 1) * e_local], 3, tp, layout.ffn_tp)
        elif k in ("shared_gate", "shared_up", "dense_gate", "dense_up"):
            w = _tp_slice(w, 1, j, y)
        else:  # shared_down, dense_down: [L, D, F]
            w = _tp_slice(w, 2, j, y)
        out[k] = w
    return out


def reference_step_fn(model, batch: int, max_len: int, fp8_transfer: bool) -> StepFn:
    """Single-device oracle with the executors' ``step`` signature (cache held inside)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    holder = [KVCache.for_config(model.config, batch, max_len, model.dtype)]

    @jax.jit
    def run(state, tokens, positions, select, cache):
        m = nnx.merge(graphdef, state)
        logits, cache = reference_forward(m, tokens, positions, cache, fp8_transfer)
        return jnp.take_along_axis(logits, select[:, None, None], 1)[:, 0], cache

    def step(tokens, positions, select):
        args = (jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(select))
        logits, holder[0] = run(state, *args, holder[0])
        return logits

    return step
