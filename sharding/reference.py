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
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from step3_jax.cache import KVCache
from step3_jax.model import head_logits
from step3_jax.policy import KernelPolicy
from step3_jax.sharding import layer_state, protocol
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
        policy: KernelPolicy | None = None,
    ):
        c = self.config = model.config
        layout.check_config(c)
        if batch % layout.num_attention:
            raise ValueError(
                f"batch={batch} must divide over {layout.num_attention} attention devices"
            )
        self.layout, self.fp8 = layout, fp8_transfer
        self.policy = model.policy if policy is None else policy
        self.dtype = model.dtype
        self.mesh_a, self.mesh_f = layout.attention_mesh(devices), layout.ffn_mesh(devices)
        sa, sf = AttentionSpecs(), FfnSpecs()
        self.rep_a = NamedSharding(self.mesh_a, sa.weights)
        self.act_a = NamedSharding(self.mesh_a, sa.act_btd)
        self.rep_f = NamedSharding(self.mesh_f, sf.tokens_td)
        # The model's own layers: each attention layer whole (replicated), each FFN device's
        # share of each layer as a layer of the local config (stacked [ep, tp] over the mesh).
        self.att = [
            {
                k: jax.device_put(v, self.rep_a)
                for k, v in layer_state.attention_values(lay, c).items()
            }
            for lay in model.layers
        ]
        self.globals = {
            "embed": jax.device_put(np.asarray(model.embed_tokens[...]), self.rep_a),
            "head": jax.device_put(np.asarray(model.lm_head[...]), self.rep_a),
            "norm": jax.device_put(np.asarray(model.norm.weight[...]), self.rep_a),
        }
        self.ffn = [self._place_ffn(lay) for lay in model.layers]
        local, dt = layer_state.local_config(c, layout), model.dtype
        kinds = [k for k in layer_state.KINDS if layer_state.layer_id_of_kind(c, k) is not None]
        self.att_tmpl = {
            k: layer_state.template(c, k, dtype=dt, param_dtype=dt, fp8=False) for k in kinds
        }
        self.ffn_tmpl = {
            k: layer_state.template(local, k, dtype=dt, param_dtype=dt, fp8=False) for k in kinds
        }
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
            self._attention, static_argnames=("kind",), donate_argnames=("cache",)
        )
        self._ffn_fns = {kind: self._make_ffn(kind) for kind in self.ffn_tmpl}

    def _place_ffn(self, layer):
        """Each FFN device's share of ``layer`` stacked ``[ep, tp, ...]`` over the FFN mesh."""
        lay, sh = self.layout, NamedSharding(self.mesh_f, P("ffn_ep", "ffn_tp"))
        shards = [layer_state.ffn_values(layer, lay, j) for j in range(lay.num_ffn)]
        return {
            k: jax.device_put(
                np.stack([s[k] for s in shards]).reshape(lay.ffn_ep, lay.ffn_tp, *v.shape), sh
            )
            for k, v in shards[0].items()
        }

    def _attention(self, values, x, positions, cache, layer, kind):
        """The layer's ``attention_half`` on the attention mesh, then the A->F packet."""
        c, tmpl = self.config, self.att_tmpl[kind]
        mod = layer_state.merge_layer(nnx.split(tmpl)[0], tmpl, values)
        x_mid, h2, routing, cache = mod.attention_half(x, positions, cache, layer, self.policy)
        b, t, d = h2.shape
        if routing is not None:
            routing = jax.tree.map(lambda a: a.reshape(b * t, -1), routing)
        return x_mid, protocol.pack(h2.reshape(b * t, d), routing, c.top_k, self.fp8), cache

    def _make_ffn(self, kind: str):
        e_local = self.config.num_experts // self.layout.ffn_ep
        tmpl = self.ffn_tmpl[kind]
        graphdef, _ = nnx.split(tmpl)

        def per_device(packet, values):
            values = {k: v[0, 0] for k, v in values.items()}
            mod = layer_state.merge_layer(graphdef, tmpl, values)
            first = jax.lax.axis_index("ffn_ep") * e_local
            x = protocol.unpack(packet, self.dtype)
            routing = (packet.weights, packet.ids) if kind == "moe" else None
            return mod.ffn_half(x, routing, self.policy, first)[None, None]

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
        return head_logits(last, g["norm"], g["head"], self.config.rms_norm_eps)

    def step(self, tokens, positions, select) -> jax.Array:
        """One forward over ``tokens [B, T]`` at ``positions``; logits of token ``select``."""
        tokens = jax.device_put(np.asarray(tokens, np.int32), self.act_a)
        positions = jax.device_put(np.asarray(positions, np.int32), self.act_a)
        x = self._embed(self.globals, tokens)
        cache = self.cache
        for layer in range(self.config.num_layers):
            kind = "moe" if self.config.is_moe_layer(layer) else "dense"
            x_mid, packet, cache = self._attn_fn(
                self.att[layer], x, positions, cache, jnp.int32(layer), kind
            )
            packet = jax.device_put(packet, self.rep_f)  # A -> F
            partials = self._ffn_fns[kind](packet, self.ffn[layer])
            b, t = positions.shape
            partials = partials.reshape(-1, b, t, partials.shape[-1])
            partials = jax.device_put(partials, NamedSharding(self.mesh_a, P(None, "attn_dp")))
            x = self._combine(x_mid, partials)  # F -> A, sum of partials, residual
        self.cache = cache.replace(lengths=positions[:, -1] + 1)
        select = jax.device_put(np.asarray(select, np.int32), self.act_a)
        return self._head(self.globals, x, select)
