"""The Step-3 text decoder as a Flax NNX module.

Each decoder layer is written as two halves so the disaggregated runtime (`step3_jax.sharding.afd`)
can run them on different devices without rewriting the model:

* ``attention_half``: input norm, MFA (with the KV-cache write), residual add, post-attention
  norm and, for MoE layers, the router's top-k. Returns the residual stream ``x_mid``, the
  normalized FFN input ``h2`` and the routing.
* ``ffn_half``: the routed + shared experts (MoE layers) or the dense SwiGLU, on ``h2``.

The layer output is ``x_mid + ffn_half(h2, routing)``. ``attention_half`` is itself
``attention_qkv`` -> ``cache.write`` -> ``attention_out``, public so an executor that must
place the cache write itself (the compiled AFD step writes its arena outside any branch) runs
the same two pieces. Every executor runs these methods: the layer's math exists once. Kernel
choices come from one `step3_jax.policy.KernelPolicy` passed down (``policy=``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from step3_jax.cache import KVCache, v_tiles_shape
from step3_jax.config import Step3Config
from step3_jax.kernels.checks import concrete
from step3_jax.layers.linear import init_weight, project
from step3_jax.layers.mfa import MFAttention, mfa_attention_xla
from step3_jax.layers.mlp import SwiGLU
from step3_jax.layers.moe import MoE
from step3_jax.layers.norms import RMSNorm, rms_norm
from step3_jax.policy import KernelPolicy

DEFAULT_POLICY = KernelPolicy()
Routing = tuple[Float[Array, "B T K"], Int[Array, "B T K"]] | None


class DecoderLayer(nnx.Module):
    def __init__(
        self,
        config: Step3Config,
        layer_id: int,
        *,
        dtype,
        param_dtype,
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
            rope_scaling=c.rope_scaling,
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
                renormalize=c.moe_renormalize,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.ffn = SwiGLU(
                c.hidden_size, c.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def attention_qkv(
        self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], policy: KernelPolicy
    ) -> tuple[Array, Array, Array]:
        """Input norm, q/k/v projections, inter_norm, wq, RoPE: ``(q [B,T,N,H], k, v [B,T,H])``."""
        with jax.named_scope("input_norm"):
            h = self.input_layernorm(x)
        return self.self_attn.qkv(h, positions, policy.gemm)

    def attention_out(
        self,
        x: Float[Array, "B T D"],
        o: Float[Array, "B T N H"],
        policy: KernelPolicy,
    ) -> tuple[Array, Array, Routing]:
        """o_proj of the attention output, residual, post-attention norm and (MoE layers) the
        router's top-k: ``(x_mid, h2, routing)``."""
        x_mid = x + self.self_attn.output(o, policy.gemm).astype(x.dtype)
        with jax.named_scope("post_norm"):
            h2 = self.post_attention_layernorm(x_mid)
        with jax.named_scope("router"):
            routing = self.ffn.route(h2) if self.is_moe else None
        return x_mid, h2, routing

    def attend(self, cache, layer: int, q, positions, policy: KernelPolicy):
        """``cache.attend`` of this layer's queries: o ``[B, T, N, H]``, or already FP8 for the
        o_proj where `MFAttention.quantizes_o` says so (``policy.o_quant``)."""
        quantize_out = self.self_attn.quantizes_o(policy.o_quant)
        with jax.named_scope("attend"):
            return cache.attend(layer, q, positions, policy.attention, quantize_out=quantize_out)

    def attention_half(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        cache=None,
        cache_layer=None,
        policy: KernelPolicy = DEFAULT_POLICY,
    ) -> tuple[Array, Array, Routing, object]:
        """Returns ``(x_mid, h2, routing, cache)``; ``routing`` is None for dense layers.
        ``cache``: anything with ``write``/``attend`` (`step3_jax.cache`), or None (causal
        attention over the T tokens alone)."""
        q, k, v = self.attention_qkv(x, positions, policy)
        if cache is None:
            o = mfa_attention_xla(q, k, v, positions, kv_positions=positions)
        else:
            layer = self.layer_id if cache_layer is None else cache_layer
            with jax.named_scope("kv_write"):
                cache = cache.write(layer, k, v, positions)
            o = self.attend(cache, layer, q, positions, policy)
        x_mid, h2, routing = self.attention_out(x, o, policy)
        return x_mid, h2, routing, cache

    def ffn_half(
        self,
        h2: Float[Array, "B T D"],
        routing: Routing = None,
        policy: KernelPolicy = DEFAULT_POLICY,
        first_expert=0,
    ) -> Float[Array, "B T D"]:
        """The FFN on ``h2``. A module holding a slice of the FFN (an FFN device) returns its
        partial sum: experts from ``first_expert`` on, its F slice of the shared/dense SwiGLU."""
        with jax.named_scope("moe" if self.is_moe else "dense_ffn"):
            if self.is_moe:
                return self.ffn(
                    h2, routing, policy.moe, policy.gemm, first_expert, policy.shared_expert
                )
            return self.ffn(h2, policy.gemm)

    def __call__(self, x, positions, cache=None, policy: KernelPolicy = DEFAULT_POLICY):
        x_mid, h2, routing, cache = self.attention_half(x, positions, cache, policy=policy)
        return x_mid + self.ffn_half(h2, routing, policy).astype(x.dtype), cache


def head_logits(
    x: Float[Array, "... D"], norm_weight, lm_head, eps: float
) -> Float[Array, "... V"]:
    """Final RMSNorm then lm_head, float32 logits (`Step3Model.logits`; executors that hold
    the head's weights elsewhere call this with them)."""
    return project(rms_norm(x, norm_weight, eps), lm_head, "...D,VD->...V", out_dtype=jnp.float32)


def check_tokens(tokens, vocab_size: int) -> None:
    """Clear errors for token batches a model cannot take: not ``[B, T]``, not integer, empty,
    or (concrete values only) outside ``[0, vocab_size)``."""
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
        raise ValueError(
            "tokens must be an int array of shape [B, T], got "
            f"{getattr(tokens, 'shape', type(tokens))}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must have an integer dtype (int32), got {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty [B, T], got shape {tokens.shape}")
    if concrete(tokens):
        host = np.asarray(tokens)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"tokens must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]"
            )


def check_cache(cache, config: Step3Config, batch: int) -> None:
    """Clear error for a cache that does not fit the model and the tokens' batch (static
    shapes only, so jit is unaffected): a `KVCache` must be ``[L, B, S, H]`` (v as V^T tiles
    where ``v_transposed``); any other cache (`step3_jax.engine.PagedKVCache`, ...) must have
    the model's layer count and the tokens' batch."""
    if not isinstance(cache, KVCache):
        if cache.batch != batch or cache.num_layers != config.num_layers:
            raise ValueError(
                f"cache has batch={cache.batch}, layers={cache.num_layers}; expected "
                f"batch={batch}, layers={config.num_layers}"
            )
        return
    want = (config.num_layers, batch, cache.max_len, config.head_dim)
    want_v = v_tiles_shape(want) if cache.v_transposed else want
    if tuple(cache.k.shape) != want or tuple(cache.v.shape) != want_v:
        layout = " (v: V^T tiles [L, B, S/64, H, 64])" if cache.v_transposed else ""
        raise ValueError(
            f"cache does not fit this model and batch: k is {tuple(cache.k.shape)}, v "
            f"{tuple(cache.v.shape)}, expected [L={config.num_layers}, B={batch} (the tokens' "
            f"batch), S, H={config.head_dim}]{layout}"
        )


def cache_positions(config: Step3Config, tokens, cache, positions) -> Int[Array, "B T"]:
    """The ``positions [B, T]`` of a forward over ``tokens [B, T]``: ``positions`` broadcast,
    or by default 0.. without a cache and each sequence's length onward with one.

    With a cache, after `check_cache`, and (concrete values only, as `check_tokens`: under jit
    they are tracers and nothing is read back) positions must lie in ``[0, cache.max_len)``:
    a scatter outside the cache would silently drop the write."""
    b, t = tokens.shape
    if cache is not None:
        check_cache(cache, config, b)
    if positions is None:
        start = 0 if cache is None else cache.lengths[:, None]
        positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    if cache is not None and concrete(positions):
        host = np.asarray(positions)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0:
            raise ValueError(f"positions must be >= 0, got values in [{lo}, {hi}]")
        if hi >= cache.max_len:
            raise ValueError(
                f"positions reach {hi} but the cache holds max_len={cache.max_len} tokens"
            )
    return positions


class Step3Model(nnx.Module):
    """Step-3 text decoder: embedding, ``num_layers`` decoder layers, final norm, lm_head.

    ``model(tokens)`` with int32 ``tokens [B, T]`` returns float32 logits ``[B, T, V]`` for
    positions 0..T-1 (no cache). ``model(tokens, cache=cache, positions=positions)`` writes the
    tokens' K/V at ``positions [B, T]`` (default: each sequence's current length onward),
    attends causally over the cache and returns ``(logits, cache)`` with
    ``cache.lengths = positions[:, -1] + 1`` (``cache.advance``: any cache with ``write``,
    ``attend``, ``advance``, ``batch``, ``num_layers`` and ``max_len``, e.g.
    `step3_jax.engine.PagedKVCache`). Positions outside ``[0, max_len)`` raise when they are
    concrete (`cache_positions`).
    """

    def __init__(
        self,
        config: Step3Config,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        policy: KernelPolicy | None = None,
    ):
        if policy is not None and not isinstance(policy, KernelPolicy):
            raise TypeError(f"policy must be a step3_jax.KernelPolicy, got {type(policy)}")
        c = self.config = config
        self.dtype = dtype
        # Which kernels run (None fields: the best for the device, decided per call by the
        # kernels' one dispatch rule). Executors may run the same layers with their own policy.
        self.policy = policy or KernelPolicy()
        v, d = c.vocab_size, c.hidden_size
        self.embed_tokens = nnx.Param(init_weight(rngs.params(), (v, d), 1, param_dtype))
        self.layers = nnx.List(
            [
                DecoderLayer(
                    c,
                    i,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for i in range(c.num_layers)
            ]
        )
        self.norm = RMSNorm(d, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = nnx.Param(init_weight(rngs.params(), (v, d), d, param_dtype))

    def embed(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

    def logits(self, x: Float[Array, "... D"]) -> Float[Array, "... V"]:
        return head_logits(x, self.norm.weight[...], self.lm_head[...], self.config.rms_norm_eps)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        cache: KVCache | None = None,
        positions: Int[Array, "B T"] | None = None,
    ):
        check_tokens(tokens, self.config.vocab_size)
        positions = cache_positions(self.config, tokens, cache, positions)
        x = self.embed(tokens)
        for layer in self.layers:
            x, cache = layer(x, positions, cache, self.policy)
        logits = self.logits(x)
        if cache is None:
            return logits
        return logits, cache.advance(positions)
