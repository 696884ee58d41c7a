"""The readable AFD executor: two meshes and a `jax.device_put` per layer each way.

Slow by design (every layer crosses from Python: ~110-180 us per `device_put` on H200, see
docs/afd.md), it is the debugging path and the test oracle for `step3_jax.sharding.afd`. Per layer:

1. attention mesh (``attn_dp``, batch-sharded activations and cache, replicated weights): one
   jitted attention half -> `protocol.Packet` (FP8 tokens + scales + expert ids + weights);
2. `device_put` of the packet, replicated, onto the FFN mesh (``ffn_ep``, ``ffn_tp``);
3. FFN mesh: a `shard_map` in which each device computes its partial ``[B, T, D]``;
4. `device_put` of the stacked partials back to the attention mesh; sum over FFN devices and
   add to the residual.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from step3_jax.cache import KVCache
from step3_jax.sharding import protocol
from step3_jax.sharding.layout import AfdLayout, AttentionSpecs, FfnSpecs


class ReferenceExecutor:
    """``step(tokens [B,T], positions [B,T], select [B]) -> logits [B, V]`` over an xAyF layout.

    B (all sequences) must divide over the ``num_attention`` attention devices. The KV cache
    (``max_len`` slots) lives batch-sharded on the attention mesh.
    """

    def __init__(
        self,
        model,
        layout: AfdLayout,
        devices,
        *,
        batch: int,
        max_len: int,
        fp8_transfer: bool = True,
        ffn_implementation: str = "dense",
    ):
        c = self.config = model.config
        layout.check_config(c)
        if batch % layout.num_attention:
            raise ValueError(
                f"batch={batch} must divide over {layout.num_attention} attention devices"
            )
        self.layout, self.fp8, self.impl = layout, fp8_transfer, ffn_implementation
        self.dtype, self.attn_impl = model.dtype, model.attention_implementation
        self.mesh_a, self.mesh_f = layout.attention_mesh(devices), layout.ffn_mesh(devices)
        sa, sf = AttentionSpecs(), FfnSpecs()
        self.rep_a = NamedSharding(self.mesh_a, sa.weights)
        self.act_a = NamedSharding(self.mesh_a, sa.act_btd)
        self.rep_f = NamedSharding(self.mesh_f, sf.tokens_td)
        att = protocol.attention_params(model)
        self.globals = {
            k: jax.device_put(att.pop(k)[0], self.rep_a) for k in ("embed", "final_norm", "lm_head")
        }
        self.attn = [
            {k: jax.device_put(v[i], self.rep_a) for k, v in att.items()}
            for i in range(c.num_layers)
        ]
        self.ffn = self._place_ffn(protocol.ffn_params(model))
        cache = KVCache.for_config(c, batch, max_len, model.dtype)
        cache_sh = NamedSharding(self.mesh_a, sa.cache_lbsh)
        self.cache = cache.replace(  # lengths [B] are batch-sharded like the activations
            **{
                k: jax.device_put(getattr(cache, k), cache_sh)
                for k in ("k", "v", "k_scale", "v_scale")
                if getattr(cache, k) is not None
            },
            lengths=jax.device_put(cache.lengths, self.act_a),
        )
        self._attn_fn = jax.jit(
            self._attention, static_argnames=("is_moe",), donate_argnames=("cache",)
        )
        self._ffn_fns = {m: self._make_ffn(m) for m in (False, True)}

    def _place_ffn(self, full):
        """Per layer: each tensor stacked ``[ep, tp, ...]`` over the FFN devices."""
        lay, sh = self.layout, NamedSharding(self.mesh_f, P("ffn_ep", "ffn_tp"))
        shards = [protocol.ffn_device_params(full, lay, j) for j in range(lay.num_ffn)]
        moe_i = {n: i for i, n in enumerate(self.config.moe_layer_ids)}
        dense_i = {n: i for i, n in enumerate(self.config.dense_layer_ids)}
        per_layer = []
        for layer in range(self.config.num_layers):
            moe = layer in moe_i
            idx = moe_i[layer] if moe else dense_i[layer]
            keys = [k for k in full if k.startswith("dense_") != moe]
            per_layer.append(
                {
                    k: jax.device_put(
                        np.stack([s[k][idx] for s in shards]).reshape(
                            lay.ffn_ep, lay.ffn_tp, *shards[0][k].shape[1:]
                        ),
                        sh,
                    )
                    for k in keys
                }
            )
        return per_layer

    def _attention(self, p, x, positions, cache, layer, is_moe):
        c = self.config
        q, k, v = protocol.attention_qkv(
            p, x, positions, eps=c.rms_norm_eps, rope_theta=c.rope_theta, dtype=self.dtype
        )
        cache = cache.write(layer, k, v, positions)
        one = KVCache(
            *[None if a is None else a[layer][None] for a in (cache.k, cache.v)],
            cache.lengths,
            *[None if a is None else a[layer][None] for a in (cache.k_scale, cache.v_scale)],
        )
        x_mid, h2, routing = protocol.attention_out(
            p,
            x,
            q,
            one,
            positions,
            eps=c.rms_norm_eps,
            dtype=self.dtype,
            top_k=c.top_k,
            is_moe=is_moe,
            implementation=self.attn_impl,
        )
        b, t, d = h2.shape
        routing = jax.tree.map(lambda a: a.reshape(b * t, -1), routing)
        return x_mid, protocol.pack(h2.reshape(b * t, d), routing, c.top_k, self.fp8), cache

    def _make_ffn(self, is_moe: bool):
        e_local = self.config.num_experts // self.layout.ffn_ep

        def per_device(packet, p):
            p = {k: v[0, 0] for k, v in p.items()}
            first = jax.lax.axis_index("ffn_ep") * e_local
            out = protocol.ffn_partial(
                packet,
                p,
                is_moe=is_moe,
                first_expert=first,
                dtype=self.dtype,
                implementation=self.impl,
            )
            return out[None, None]

        fn = jax.shard_map(
            per_device,
            mesh=self.mesh_f,
            in_specs=(P(), P("ffn_ep", "ffn_tp")),
            out_specs=P("ffn_ep", "ffn_tp"),
            check_vma=False,
        )
        return jax.jit(fn)

    @functools.partial(jax.jit, static_argnums=0)
    def _combine(self, x_mid, partials):
        b, t, d = x_mid.shape
        total = jnp.sum(partials.reshape(-1, b, t, d), axis=0)
        return x_mid + total.astype(x_mid.dtype)

    @functools.partial(jax.jit, static_argnums=0)
    def _embed(self, g, tokens):
        return jnp.take(g["embed"], tokens, axis=0).astype(self.dtype)

    @functools.partial(jax.jit, static_argnums=0)
    def _head(self, g, x, select):
        last = jnp.take_along_axis(x, select[:, None, None], axis=1)[:, 0]
        return protocol.final_logits(g, last, self.config.rms_norm_eps)

    def step(self, tokens, positions, select) -> jax.Array:
        """One forward over ``tokens [B, T]`` at ``positions``; logits of token ``select``."""
        tokens = jax.device_put(np.asarray(tokens, np.int32), self.act_a)
        positions = jax.device_put(np.asarray(positions, np.int32), self.act_a)
        x = self._embed(self.globals, tokens)
        cache = self.cache
        for layer in range(self.config.num_layers):
            is_moe = self.config.is_moe_layer(layer)
            x_mid, packet, cache = self._attn_fn(
                self.attn[layer], x, positions, cache, jnp.int32(layer), is_moe
            )
            packet = jax.device_put(packet, self.rep_f)  # A -> F
            partials = self._ffn_fns[is_moe](packet, self.ffn[layer])
            b, t = positions.shape
            partials = partials.reshape(-1, b, t, partials.shape[-1])
            partials = jax.device_put(partials, NamedSharding(self.mesh_a, P(None, "attn_dp")))
            x = self._combine(x_mid, partials)  # F -> A, sum of partials, residual
        self.cache = cache.replace(lengths=positions[:, -1] + 1)
        select = jax.device_put(np.asarray(select, np.int32), self.act_a)
        return self._head(self.globals, x, select)
