"""What crosses between the roles every layer: the message format.

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
layer kinds. The math on either side is the model's own `DecoderLayer` (its
``attention_qkv``/``attention_out`` and ``ffn_half`` methods; `step3_jax.sharding.layer_state`
builds the layer on each device): this module only packs and unpacks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

from step3_jax import quant


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


def unpack(p: Packet, dtype) -> Array | quant.QuantizedActivations:
    """FFN side: the hidden state the experts read. FP8: as `quant.QuantizedActivations`
    standing for ``dtype``, so the FFN's FP8 GEMMs read the packet's bytes as they are (no
    dequantize-then-quantize round trip) and anything else its dequantized value."""
    if p.scales is None:
        return p.values.astype(dtype)
    return quant.QuantizedActivations(p.values, p.scales, jnp.dtype(dtype))


def fake_transfer(h2: Array, fp8: bool) -> Array:
    """What the FFN side sees of ``h2`` after the transfer (for single-device oracles)."""
    if not fp8:
        return h2
    q, s = quant.quantize_activations(h2)
    return quant.dequantize_activations(q, s, dtype=h2.dtype)
