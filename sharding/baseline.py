"""The non-disaggregated baseline: DP attention + EP experts on EVERY device, one program.

Mesh ``('dp',)`` over all N devices. Each device runs attention for its own ``B/N`` sequences
(replicated attention weights, batch-sharded KV cache), then every layer:
``all_gather`` of the FFN packets (the same FP8 tokens + scales + ids + weights as AFD) so
each device sees all tokens, its local experts ``E/N`` plus its ``1/N`` F slice of the shared
expert / dense SwiGLU, and a ``psum_scatter`` returns each device the sum for its own tokens.
`lax.scan` over layers; one compiled program per step. Same numerics contract as AFD: tokens
equal single-device decode (tests/sharding/test_afd_equality.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from step3_jax.cache import KVCache
from step3_jax.model import head_logits
from step3_jax.policy import KernelPolicy
from step3_jax.sharding import layer_state, protocol
from step3_jax.sharding.layout import (
    DEFAULT_DTYPES,
    AfdLayout,
    ArenaDtypes,
    attention_kind,
    role_template,
)


class BaselineExecutor:
    """``step(tokens [B,T], positions [B,T], select [B]) -> logits [B, V]`` on N devices.

    Every device runs the model's own `DecoderLayer` halves: the attention half for its
    sequences (weights replicated, stacked ``[L, ...]`` by parameter path), the FFN half on
    its share (``E/N`` experts, ``1/N`` of the shared/dense SwiGLU: a layer of
    `layer_state.local_config`), stacked ``[N, L_kind, ...]``."""

    def __init__(
        self,
        config,
        devices,
        *,
        batch: int,
        max_len: int,
        fp8_transfer=True,
        act_dtype=jnp.bfloat16,
        cache_dtype=None,
        policy: KernelPolicy | None = None,
        dtypes: ArenaDtypes = DEFAULT_DTYPES,
    ):
        devices = list(devices)
        n = len(devices)
        if batch % n or config.num_experts % n:
            raise ValueError(
                f"batch={batch} and num_experts={config.num_experts} must both "
                f"divide over the {n} devices"
            )
        self.config, self.n, self.fp8 = config, n, fp8_transfer
        self.act_dtype, self.policy, self.dtypes = act_dtype, policy or KernelPolicy(), dtypes
        self.mesh = Mesh(np.array(devices), ("dp",))
        self.ffn_layout = AfdLayout(1, n, 1)  # the FFN split of an N-way EP group
        self.rep, self.dp = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("dp"))
        self.att_tmpl = role_template(config, dtypes, attention_kind(config), act_dtype)
        local = layer_state.local_config(config, self.ffn_layout)
        self.ffn_tmpl = {
            k: role_template(local, dtypes, k, act_dtype)
            for k in layer_state.KINDS
            if layer_state.layer_id_of_kind(config, k) is not None
        }
        cache = KVCache.for_config(config, batch, max_len, cache_dtype or act_dtype)
        csh = NamedSharding(self.mesh, P(None, "dp"))
        self.cache = jax.tree.map(
            lambda a: jax.device_put(a, csh if a.ndim > 1 else self.dp), cache
        )
        self.attn = self.ffn = self.glob = None
        self._program = jax.jit(self._build(), donate_argnums=(3,))

    # ----------------------------------------------------------------- weights
    def load_model(self, model) -> None:
        c = self.config
        att = [layer_state.attention_values(lay, c) for lay in model.layers]
        self.attn = {k: jax.device_put(np.stack([a[k] for a in att]), self.rep) for k in att[0]}
        self.glob = {
            "embed": jax.device_put(np.asarray(model.embed_tokens[...]), self.rep),
            "norm": jax.device_put(np.asarray(model.norm.weight[...]), self.rep),
            "head": jax.device_put(np.asarray(model.lm_head[...]), self.rep),
        }
        self.ffn = {}
        for kind, ids in (("moe", c.moe_layer_ids), ("dense", c.dense_layer_ids)):
            if not ids:
                continue
            per = [
                [layer_state.ffn_values(model.layers[i], self.ffn_layout, j) for i in ids]
                for j in range(self.n)
            ]
            self.ffn[kind] = {
                k: jax.device_put(np.stack([np.stack([p[k] for p in dev]) for dev in per]), self.dp)
                for k in per[0][0]
            }

    def load_random(self, seed: int = 0, scale: float = 0.02) -> None:
        """Random weights of the templates' shapes on device (benchmarks): normal * ``scale``,
        FP8 values with ~``scale``-sized dequantized weights when ``dtypes`` says FP8."""
        c = self.config
        keys = iter(jax.random.split(jax.random.key(seed), 4096))

        def make(spec, lead, sharding, norm_dtype):
            shape = (*lead, *spec.shape)
            if spec.scale_shape is None:
                dt = norm_dtype if len(spec.shape) == 1 else self.dtypes.weight
                f = lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(dt)
                return jax.jit(f, out_shardings=sharding)(next(keys))
            f = lambda k: jnp.clip(jax.random.normal(k, shape) * 64, -448, 448).astype(
                jnp.float8_e4m3fn
            )
            vals = jax.jit(f, out_shardings=sharding)(next(keys))
            sc = jax.jit(
                lambda: jnp.full((*lead, *spec.scale_shape), scale / 64, jnp.float32),
                out_shardings=sharding,
            )()
            return layer_state.fp8_value(spec, vals, sc)

        att = layer_state.role_params(self.att_tmpl, layer_state.ATTENTION)
        self.attn = {s.path: make(s, (c.num_layers,), self.rep, self.dtypes.norm) for s in att}
        self.ffn = {}
        for kind, tmpl in self.ffn_tmpl.items():
            n_k = len(c.moe_layer_ids if kind == "moe" else c.dense_layer_ids)
            specs = layer_state.role_params(tmpl, layer_state.FFN)
            self.ffn[kind] = {
                s.path: make(s, (self.n, n_k), self.dp, self.dtypes.norm) for s in specs
            }
        v, d = c.vocab_size, c.hidden_size
        rnd = lambda shape, dt: jax.jit(
            lambda k: (jax.random.normal(k, shape) * scale).astype(dt), out_shardings=self.rep
        )(next(keys))
        self.glob = {
            "embed": rnd((v, d), self.dtypes.embed),
            "norm": rnd((d,), self.dtypes.norm) + 1,
            "head": rnd((v, d), self.dtypes.embed),
        }

    # ----------------------------------------------------------------- program
    def _layer(self, attn, ffn, x, pos, cache, layer, is_moe, kind_index, first):
        c, policy = self.config, self.policy
        values = jax.tree.map(lambda a: a[layer], attn)
        mod = layer_state.merge_layer(nnx.split(self.att_tmpl)[0], self.att_tmpl, values)
        x_mid, h2, routing, cache = mod.attention_half(x, pos, cache, layer, policy)
        b, t, d = h2.shape
        if routing is None:
            z = jnp.zeros((b, t, c.top_k), jnp.float32)
            routing = (z, z.astype(jnp.int32))
        keep = jnp.asarray(is_moe)
        routing = (jnp.where(keep, routing[0], 0.0), jnp.where(keep, routing[1], 0))
        routing = tuple(r.reshape(b * t, -1) for r in routing)
        packet = protocol.pack(h2.reshape(b * t, d), routing, c.top_k, self.fp8)
        every = jax.tree.map(lambda a: lax.all_gather(a, "dp", tiled=True), packet)
        xe = protocol.unpack(every, self.act_dtype)

        def run(kind):
            tmpl = self.ffn_tmpl[kind]
            vals = jax.tree.map(lambda a: a[0, kind_index], ffn[kind])
            fmod = layer_state.merge_layer(nnx.split(tmpl)[0], tmpl, vals)
            rt = (every.weights, every.ids) if kind == "moe" else None
            return fmod.ffn_half(xe, rt, policy, first).astype(self.act_dtype)

        kinds = tuple(self.ffn_tmpl)
        out = (
            run(kinds[0])
            if len(kinds) == 1
            else lax.cond(is_moe, lambda: run("moe"), lambda: run("dense"))
        )
        mine = lax.psum_scatter(out.astype(jnp.float32), "dp", scatter_dimension=0, tiled=True)
        return x_mid + mine.reshape(b, t, d).astype(x.dtype), cache

    def _build(self):
        c = self.config
        is_moe = jnp.asarray([c.is_moe_layer(i) for i in range(c.num_layers)])
        kind = np.zeros(c.num_layers, np.int32)
        for ids in (c.moe_layer_ids, c.dense_layer_ids):
            kind[list(ids)] = np.arange(len(ids))
        kind = jnp.asarray(kind)
        e_local = c.num_experts // self.n

        def body(glob, attn, ffn, cache, tokens, positions, select):
            first = lax.axis_index("dp") * e_local
            x = jnp.take(glob["embed"], tokens, axis=0).astype(self.act_dtype)

            def step(carry, layer):
                x, cache = carry
                x, cache = self._layer(
                    attn, ffn, x, positions, cache, layer, is_moe[layer], kind[layer], first
                )
                return (x, cache), None

            (x, cache), _ = lax.scan(step, (x, cache), jnp.arange(c.num_layers))
            last = jnp.take_along_axis(x, select[:, None, None], axis=1)[:, 0]
            logits = head_logits(last, glob["norm"], glob["head"], c.rms_norm_eps)
            return logits, cache.replace(lengths=positions[:, -1] + 1)

        cache_spec = KVCache(
            P(None, "dp"),
            P(None, "dp"),
            P("dp"),
            *(
                None if a is None else P(None, "dp")
                for a in (self.cache.k_scale, self.cache.v_scale)
            ),
        )
        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(P(), P(), P("dp"), cache_spec, P("dp"), P("dp"), P("dp")),
            out_specs=(P("dp"), cache_spec),
            check_vma=False,
        )

    def step(self, tokens, positions, select) -> jax.Array:
        if self.attn is None:
            raise ValueError("weights are empty: call load_model(model) or load_random() first")
        args = [
            jax.device_put(np.asarray(a, np.int32), self.dp) for a in (tokens, positions, select)
        ]
        logits, self.cache = self._program(self.glob, self.attn, self.ffn, self.cache, *args)
        return logits
