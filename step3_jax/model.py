"""The Step-3 text decoder as a Flax NNX module.

Each decoder layer is written as two halves so the disaggregated runtime (`step3_jax.sharding.afd`)
can run them on different devices without rewriting the model:

* ``attention_half``: input norm, MFA (with the KV-cache write), residual add, post-attention
  norm and, for MoE layers, the router's top-k. Returns the residual stream ``x_mid``, the
  normalized FFN input ``h2`` and the routing.
* ``ffn_half``: the routed + shared experts (MoE layers) or the dense SwiGLU, on ``h2``.

The layer output is ``x_mid + ffn_half(h2, routing)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from step3_jax.cache import KVCache
from step3_jax.config import Step3Config
from step3_jax.layers.linear import init_weight, project
from step3_jax.layers.mfa import MFAttention, mfa_attention_xla
from step3_jax.layers.mlp import SwiGLU
from step3_jax.layers.moe import MoE
from step3_jax.layers.norms import RMSNorm

Routing = tuple[Float[Array, "B T K"], Int[Array, "B T K"]] | None
ATTENTION_IMPLEMENTATIONS = ("xla", "pallas", None)
# The decode kernel handles up to this many new tokens per sequence against the cache.
MAX_KERNEL_QUERY_TOKENS = 8


def default_attention_impl(num_heads: int = 64, head_dim: int = 256, dtype=jnp.bfloat16) -> str:
    """ "pallas" where the Mosaic GPU decode kernel applies (an H100/H200, Step-3's 64 heads of
    256, a bf16 model), else "xla"."""
    from step3_jax.kernels.mfa_decode.api import _on_hopper

    fits = (num_heads, head_dim) == (64, 256) and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    return "pallas" if fits and _on_hopper() else "xla"


def cached_attention(
    q: Float[Array, "B T N H"],
    cache: KVCache,
    layer: int,
    positions: Int[Array, "B T"],
    implementation: str | None,
) -> Float[Array, "B T N H"]:
    """Attention of the new tokens' queries against layer ``layer`` of the (updated) cache.

    Decode-sized T goes through `step3_jax.kernels.mfa_decode_attention` (Pallas on Hopper, XLA
    elsewhere); long prefills use the plain XLA path over the dequantized cache. Both assume
    the new tokens of a sequence sit at consecutive positions ending at ``lengths - 1``.
    """
    t = q.shape[1]
    lengths = positions[:, -1] + 1
    implementation = implementation or default_attention_impl(q.shape[2], q.shape[3], q.dtype)
    if implementation != "xla" and t <= MAX_KERNEL_QUERY_TOKENS:
        from step3_jax.kernels.mfa_decode import mfa_decode_attention

        k, v, ks, vs = cache.layer(layer)
        out = mfa_decode_attention(
            q, k, v, lengths, k_scale=ks, v_scale=vs, implementation=implementation
        )
        return out.astype(q.dtype)
    k, v = cache.dequantized_layer(layer, q.dtype)
    return mfa_attention_xla(q, k, v, positions, kv_lengths=lengths)


class DecoderLayer(nnx.Module):
    def __init__(
        self,
        config: Step3Config,
        layer_id: int,
        *,
        dtype,
        param_dtype,
        moe_implementation: str,
        rngs: nnx.Rngs,
    ):
        c = config
        self.layer_id, self.is_moe = layer_id, c.is_moe_layer(layer_id)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MFAttention(
            c.hidden_size,
            c.share_q_dim,
            c.num_heads,
            c.head_dim,
            rope_theta=c.rope_theta,
            eps=c.rms_norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype
        )
        if self.is_moe:
            self.ffn = MoE(
                c.hidden_size,
                c.num_experts,
                c.top_k,
                c.moe_intermediate_size,
                c.share_expert_dim,
                implementation=moe_implementation,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.ffn = SwiGLU(
                c.hidden_size, c.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def attention_half(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        cache: KVCache | None = None,
        cache_layer: int | None = None,
        attention_implementation: str | None = None,
    ) -> tuple[Array, Array, Routing, KVCache | None]:
        """Returns ``(x_mid, h2, routing, cache)``; ``routing`` is None for dense layers."""
        attn = self.self_attn
        q, k, v = attn.qkv(self.input_layernorm(x), positions)
        if cache is None:
            o = mfa_attention_xla(q, k, v, positions, kv_positions=positions)
        else:
            layer = self.layer_id if cache_layer is None else cache_layer
            cache = cache.write(layer, k, v, positions)
            o = cached_attention(q, cache, layer, positions, attention_implementation)
        x_mid = x + attn.output(o).astype(x.dtype)
        h2 = self.post_attention_layernorm(x_mid)
        routing = self.ffn.route(h2) if self.is_moe else None
        return x_mid, h2, routing, cache

    def ffn_half(self, h2: Float[Array, "B T D"], routing: Routing = None) -> Float[Array, "B T D"]:
        if self.is_moe:
            return self.ffn(h2, routing=routing)
        return self.ffn(h2)

    def __call__(self, x, positions, cache=None, attention_implementation=None):
        x_mid, h2, routing, cache = self.attention_half(
            x, positions, cache, attention_implementation=attention_implementation
        )
        return x_mid + self.ffn_half(h2, routing).astype(x.dtype), cache


def _check_tokens(tokens, vocab_size: int) -> None:
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
        raise ValueError(
            "tokens must be an int array of shape [B, T], got "
            f"{getattr(tokens, 'shape', type(tokens))}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must have an integer dtype (int32), got {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty [B, T], got shape {tokens.shape}")
    if not isinstance(tokens, jax.core.Tracer):
        lo, hi = int(np.min(np.asarray(tokens))), int(np.max(np.asarray(tokens)))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"tokens must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]"
            )


class Step3Model(nnx.Module):
    """Step-3 text decoder: embedding, ``num_layers`` decoder layers, final norm, lm_head.

    ``model(tokens)`` with int32 ``tokens [B, T]`` returns float32 logits ``[B, T, V]`` for
    positions 0..T-1 (no cache). ``model(tokens, cache=cache, positions=positions)`` writes the
    tokens' K/V at ``positions [B, T]`` (default: each sequence's current length onward),
    attends causally over the cache and returns ``(logits, cache)`` with
    ``cache.lengths = positions[:, -1] + 1``.
    """

    def __init__(
        self,
        config: Step3Config,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        moe_implementation: str = "grouped",
        attention_implementation: str | None = None,
    ):
        if attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {attention_implementation!r}"
            )
        c = self.config = config
        self.dtype = dtype
        # None: the Pallas decode kernel on a Hopper GPU, the XLA path elsewhere (decided once
        # here, so CPU runs do not warn on every trace).
        self.attention_implementation = attention_implementation or default_attention_impl(
            c.num_heads, c.head_dim, dtype
        )
        v, d = c.vocab_size, c.hidden_size
        self.embed_tokens = nnx.Param(init_weight(rngs.params(), (v, d), 1, param_dtype))
        self.layers = nnx.List(
            [
                DecoderLayer(
                    c,
                    i,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    moe_implementation=moe_implementation,
                    rngs=rngs,
                )
                for i in range(c.num_layers)
            ]
        )
        self.norm = RMSNorm(d, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = nnx.Param(init_weight(rngs.params(), (v, d), d, param_dtype))

    def embed(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

    def logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        return project(self.norm(x), self.lm_head[...], "BTD,VD->BTV", out_dtype=jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        cache: KVCache | None = None,
        positions: Int[Array, "B T"] | None = None,
    ):
        _check_tokens(tokens, self.config.vocab_size)
        b, t = tokens.shape
        if cache is not None and (cache.batch != b or cache.num_layers != self.config.num_layers):
            raise ValueError(
                f"cache has batch={cache.batch}, layers={cache.num_layers}; expected batch={b}, "
                f"layers={self.config.num_layers}"
            )
        if positions is None:
            start = 0 if cache is None else cache.lengths[:, None]
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
        x = self.embed(tokens)
        for layer in self.layers:
            x, cache = layer(x, positions, cache, self.attention_implementation)
        logits = self.logits(x)
        if cache is None:
            return logits
        return logits, cache.replace(lengths=positions[:, -1] + 1)
