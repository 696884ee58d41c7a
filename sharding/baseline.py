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
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from step3_jax.cache import KVCache
from step3_jax.sharding import protocol
from step3_jax.sharding.layout import AfdLayout


class BaselineExecutor:
    """``step(tokens [B,T], positions [B,T], select [B]) -> logits [B, V]`` on N devices."""

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
        ffn_implementation="dense",
        attention_implementation="xla",
    ):
        devices = list(devices)
        n = len(devices)
        if batch % n or config.num_experts % n:
            raise ValueError(
                f"batch={batch} and num_experts={config.num_experts} must both "
                f"divide over the {n} devices"
            )
        self.config, self.n, self.fp8 = config, n, fp8_transfer
        self.act_dtype, self.impl, self.attn_impl = (
            act_dtype,
            ffn_implementation,
            attention_implementation,
        )
        self.mesh = Mesh(np.array(devices), ("dp",))
        self.ffn_layout = AfdLayout(1, n, 1)  # the FFN split of an N-way EP group
        self.rep, self.dp = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("dp"))
        cache = KVCache.for_config(config, batch, max_len, cache_dtype or act_dtype)
        csh = NamedSharding(self.mesh, P(None, "dp"))
        self.cache = jax.tree.map(
            lambda a: jax.device_put(a, csh if a.ndim > 1 else self.dp), cache
        )
        self.attn = self.ffn = self.glob = None
        self._program = jax.jit(self._build(), donate_argnums=(3,))

    # ----------------------------------------------------------------- weights
    def load_model(self, model) -> None:
        att = protocol.attention_params(model)
        self.glob = {
            k: jax.device_put(att.pop(k)[0], self.rep) for k in ("embed", "final_norm", "lm_head")
        }
        self.attn = {k: jax.device_put(v, self.rep) for k, v in att.items()}
        full = protocol.ffn_params(model)
        shards = [protocol.ffn_device_params(full, self.ffn_layout, j) for j in range(self.n)]
        self.ffn = {k: jax.device_put(np.stack([s[k] for s in shards]), self.dp) for k in shards[0]}

    def load_random(self, model_shapes: dict, seed: int = 0, scale: float = 0.02) -> None:
        """Random weights of the given ``{name: (shape, dtype, sharded)}`` (benchmarks)."""
        out = {}
        for i, (k, (shape, dtype, sharded)) in enumerate(sorted(model_shapes.items())):
            sh = self.dp if sharded else self.rep
            f = jax.jit(
                lambda key, shape=shape, dtype=dtype: (
                    jax.random.normal(key, shape, jnp.float32) * scale
                ).astype(dtype),
                out_shardings=sh,
            )
            out[k] = f(jax.random.key(seed + i))
        self.glob = {k: out.pop(k) for k in ("embed", "final_norm", "lm_head")}
        ffn_keys = [k for k, v in model_shapes.items() if v[2]]
        self.ffn = {k: out.pop(k) for k in ffn_keys}
        self.attn = out

    # ----------------------------------------------------------------- program
    def _layer(self, glob_unused, attn, ffn, x, pos, cache, layer, is_moe, kind_index, first):
        c = self.config
        p = jax.tree.map(lambda a: a[layer], attn)
        q, k, v = protocol.attention_qkv(
            p, x, pos, eps=c.rms_norm_eps, rope_theta=c.rope_theta, dtype=self.act_dtype
        )
        cache = cache.write(layer, k, v, pos)
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
            pos,
            eps=c.rms_norm_eps,
            dtype=self.act_dtype,
            top_k=c.top_k,
            is_moe=is_moe,
            implementation=self.attn_impl,
        )
        b, t, d = h2.shape
        packet = protocol.pack(
            h2.reshape(b * t, d), tuple(r.reshape(b * t, -1) for r in routing), c.top_k, self.fp8
        )
        every = jax.tree.map(lambda a: lax.all_gather(a, "dp", tiled=True), packet)

        def run(moe):
            keys = [k for k in ffn if k.startswith("dense_") != moe]
            pl = {k: jax.tree.map(lambda a: a[0, kind_index], ffn[k]) for k in keys}
            return protocol.ffn_partial(
                every,
                pl,
                is_moe=moe,
                first_expert=first,
                dtype=self.act_dtype,
                implementation=self.impl,
            )

        kinds = [m for m in (True, False) if any(k.startswith("dense_") != m for k in ffn)]
        out = (
            run(kinds[0])
            if len(kinds) == 1
            else lax.cond(is_moe, lambda: run(True), lambda: run(False))
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
                    None, attn, ffn, x, positions, cache, layer, is_moe[layer], kind[layer], first
                )
                return (x, cache), None

            (x, cache), _ = lax.scan(step, (x, cache), jnp.arange(c.num_layers))
            last = jnp.take_along_axis(x, select[:, None, None], axis=1)[:, 0]
            logits = protocol.final_logits(glob, last, c.rms_norm_eps)
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
