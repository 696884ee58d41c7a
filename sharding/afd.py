"""The compiled AFD executor: ONE program per decode step over all devices.

``jax.jit(shard_map(body))`` over the 1-D ``afd`` mesh; each device holds only its role's
tensors in its arenas (memory layout: `step3_jax.sharding.layout`). The body is a `lax.scan` over
*ticks* of a static software-pipeline schedule (`pipeline_schedule`): at each tick an
attention device runs the attention half of one (layer, micro-batch) item while the FFN
devices run the FFN half of an earlier item; ONE `lax.switch` on the device's role, the row
and the FFN layer kind picks the work (no collective sits inside a branch). A one-role
program (``role=``) runs only its role's ticks, as one scan per run of same-branch ticks with
the branch static (no switch). Then two sets of `lax.ppermute` rounds exchange the
tick's messages: A->F `protocol.Packet` (FP8 tokens + scales + expert ids + weights) and
F->A partial outputs (activation dtype), which the attention device sums and adds to the
residual. With M >= 2 micro-batches the attention and FFN devices are both busy every tick
(the schedule has ``L*M + 1`` ticks; M = 1 needs ``2L``).

Exchange rounds (`exchange_rounds`): the complete bipartite A x F graph split into
``max(x, y)`` matchings, so every ppermute is a valid permutation and each (A, F) pair talks
exactly once per direction per tick.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from step3_jax import quant
from step3_jax.config import check_sizes
from step3_jax.model import head_logits
from step3_jax.policy import KernelPolicy, compiler_options
from step3_jax.sharding import arena_io, layer_state, protocol
from step3_jax.sharding.layout import (
    ALIGN,
    DEFAULT_DTYPES,
    AfdLayout,
    ArenaDtypes,
    ArenaLayout,
    attention_kind,
    head_rows,
    role_template,
)
from step3_jax.sharding.schedule import exchange_rounds, pipeline_schedule

STAGES = ("attention", "ffn", "exchange")
# XLA options of the step on a GPU: `step3_jax.policy.GPU_COMPILER_OPTIONS` (cuBLAS GEMMs, the
# dynamic-slice fusion; AfdConfig.compiler_options override them). The bf16 lm_head GEMM
# ([B, D] x [head_rows(V), D], a view of the arena): as a Triton GEMM fusion, XLA first copied
# the 1.85 GB view (1.61 ms per step) and then ran at 1.39 TB/s (1.34 ms); as a cuBLAS GEMM
# with the dynamic-slice fusion it reads the view in place at 2.5 TB/s (0.74 ms; H100,
# docs/LOG.md). Under the default KernelPolicy every other GEMM of the step is a Pallas kernel;
# with gemm="xla" the linears become cuBLAS GEMMs too.
ROLES = ("attention", "ffn")


@dataclasses.dataclass(frozen=True)
class AfdConfig:
    """Static settings of one compiled AFD step."""

    microbatch: int  # Bm: sequences per micro-batch per attention device
    num_microbatches: int  # M: micro-batches in flight (1, 2 or 3)
    max_len: int  # S: KV-cache slots per sequence
    fp8_transfer: bool = True  # FP8 tokens + scales A->F (else the activation dtype)
    # Kernels of the layers' halves (the model's own `DecoderLayer` methods run on each role).
    policy: KernelPolicy = KernelPolicy()
    # Grouped MoE (policy.moe != "dense"): read the routed experts in place from the arena
    # (`ExpertPool`) rather than as a sliced copy per tick (False: the copy, kept as a control).
    experts_in_place: bool = True
    # XLA debug options for the step's compilation, e.g. {"xla_backend_optimization_level": 0}
    # makes CPU test compiles ~3x faster. A tuple of (name, value) pairs (hashable). On a GPU
    # they are merged over GPU_COMPILER_OPTIONS (these win).
    compiler_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        sizes = ("microbatch", "num_microbatches", "max_len")
        check_sizes("AfdConfig", **{name: getattr(self, name) for name in sizes})
        if not isinstance(self.policy, KernelPolicy):
            raise TypeError(f"AfdConfig.policy must be a KernelPolicy, got {self.policy!r}")


def _qkv_before_write(active, qkv, zeros, conditional: bool):
    """``qkv()`` (q, k, v) where ``active`` (``zeros`` elsewhere), with every read it makes of
    the pre-write arena (the q/k/v weights) ordered before the in-place KV write that follows.
    Unordered, XLA copies the whole arena every tick (XLA:CPU, `afd_hlo_probe.py --tiny`).

    ``conditional``: a `lax.cond` on ``active``, whose outputs exist only once every read in
    it is done. Needed where some devices must skip the work (the full program: FFN devices)
    and off GPUs (XLA:CPU: an optimization barrier does not prevent the copy there). On a GPU
    a one-role program (every tick active) uses an `lax.optimization_barrier`: no
    predicate goes to the host. An XLA:GPU conditional waits for the host every tick; the
    16-layer attention role ran 12.13 ms with it, 9.88 ms without (H100, no arena copy in
    either: docs/LOG.md)."""
    if conditional:
        return lax.cond(active, qkv, lambda: zeros)
    return lax.optimization_barrier(qkv())


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _stack(per_layer: list[dict]) -> dict[str, np.ndarray]:
    """``[{path: array}]`` over layers -> ``{path: [L, ...]}``."""
    return {k: np.stack([p[k] for p in per_layer]) for k in per_layer[0]} if per_layer else {}


class AfdExecutor:
    """One compiled AFD step over ``layout`` on ``devices`` (see the module docstring).

    ``step(tokens [B, T], positions [B, T], select [B]) -> logits [B, V]`` with
    ``B = num_attention * num_microbatches * microbatch``: sequence b lives on attention
    device ``b // (M * Bm)``, micro-batch ``(b // Bm) % M``. The KV cache lives in the arenas.
    """

    def __init__(
        self,
        config,
        layout: AfdLayout,
        devices,
        afd: AfdConfig,
        *,
        dtypes: ArenaDtypes = DEFAULT_DTYPES,
        act_dtype=jnp.bfloat16,
        stages: tuple[str, ...] = STAGES,
        role: str | None = None,
    ):
        """``role`` ("attention" | "ffn"): ONE device runs that role's side of this layout's
        step (attention device 0, or FFN device 0) with the same tick code, the exchange
        replaced by local buffers (the FFN side reads a fixed random inbox with uniform
        routing), only the role's own ticks and each tick's branch static (`_segments`):
        what `benchmarks/bench_afd.py --role` times on one GPU. Its arena holds only that
        role's regions."""
        if any(s not in STAGES for s in stages):
            raise ValueError(f"stages must be a subset of {STAGES}, got {stages}")
        if role not in (None, *ROLES):
            raise ValueError(f"role must be None or one of {ROLES}, got {role!r}")
        self.config, self.layout, self.afd, self.dtypes = config, layout, afd, dtypes
        self.role = role
        self.act_dtype = jnp.dtype(act_dtype)
        self.stages = tuple(stages) if role is None else (role,)
        if role is None:
            self.mesh = layout.afd_mesh(devices)
        else:
            self.mesh = Mesh(np.array(list(devices)[:1]), ("afd",))
        self.on_gpu = self.mesh.devices.flat[0].platform == "gpu"
        self.arena = ArenaLayout.build(
            config,
            layout,
            microbatch=afd.microbatch,
            num_microbatches=afd.num_microbatches,
            max_len=afd.max_len,
            dtypes=dtypes,
            roles=ROLES if role is None else (role,),
        )
        self.schedule = pipeline_schedule(config.num_layers, afd.num_microbatches)
        # The model's own layer on each role: graphdef + template + the parameters held.
        kind = attention_kind(config)
        self.att_layer = self._role_layer(config, kind, layer_state.ATTENTION)
        local = layer_state.local_config(config, layout)
        self.ffn_layers = {
            k: self._role_layer(local, k, layer_state.FFN)
            for k, ids in (("moe", config.moe_layer_ids), ("dense", config.dense_layer_ids))
            if ids
        }
        self.sharding = NamedSharding(self.mesh, P("afd"))
        self.arenas: dict | None = None
        self._program = self._build()

    def _role_layer(self, config, kind: str, role: str):
        tmpl = role_template(config, self.dtypes, kind, self.act_dtype)
        graphdef, _ = nnx.split(tmpl)
        return graphdef, tmpl, layer_state.role_params(tmpl, role)

    def _merged(self, role_layer, values):
        graphdef, tmpl, _ = role_layer
        return layer_state.merge_layer(graphdef, tmpl, values)

    @property
    def num_mesh_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def num_attention_devices(self) -> int:
        """Attention devices in this program (1 in the attention role, 0 in the FFN role)."""
        if self.role is None:
            return self.layout.num_attention
        return 1 if self.role == "attention" else 0

    @property
    def batch(self) -> int:
        n_a = self.layout.num_attention if self.role != "attention" else 1
        return n_a * self.afd.num_microbatches * self.afd.microbatch

    # ------------------------------------------------------------------ arenas
    def _device_buffers(self, d: int, sources) -> dict[str, np.ndarray]:
        regions = self.arena.attention if d < self.layout.num_attention else self.arena.ffn
        src = sources(d)
        bufs = {t: np.zeros((n,), jnp.dtype(t)) for t, n in self.arena.sizes.items()}
        for name, reg in regions.items():
            if name in arena_io.CACHE_REGIONS:
                fill = 1.0 if name.endswith("_scale") else 0.0
                bufs[reg.dtype][reg.offset : reg.end] = fill
                continue
            items = bufs[reg.dtype][reg.offset : reg.end].reshape(reg.count, reg.stride)
            arr = np.asarray(src[name]).astype(jnp.dtype(reg.dtype))
            if arr.shape != (reg.count, *reg.shape):
                raise ValueError(
                    f"{name}: got {arr.shape}, arena region wants {(reg.count, *reg.shape)}"
                )
            items[:, : reg.size] = arr.reshape(reg.count, reg.size)
        return {t: b.reshape(-1, ALIGN) for t, b in bufs.items()}

    def _arrays_from(self, device_buffers) -> dict:
        """Global arena arrays; each process builds only its addressable devices' rows."""
        n = self.num_mesh_devices
        pos = {dev: i for i, dev in enumerate(self.mesh.devices.flat)}
        cache: dict[int, dict] = {}

        def buffers(i):
            if i not in cache:
                cache[i] = device_buffers(i)
            return cache[i]

        out = {}
        for t, size in self.arena.sizes.items():
            arrs = [
                jax.device_put(buffers(pos[dev])[t], dev)
                for dev in self.sharding.addressable_devices
            ]
            shape = (n * size // ALIGN, ALIGN)
            out[t] = jax.make_array_from_single_device_arrays(shape, self.sharding, arrs)
        return out

    def load_model(self, model) -> None:
        """Packs ``model``'s weights (and an empty cache) into the arenas."""
        if self.dtypes.fp8_weights:
            raise ValueError("load_model packs float weights; use ArenaDtypes(weight=<float>)")
        c, n_a = self.config, self.layout.num_attention
        att = _stack([layer_state.attention_values(lay, c) for lay in model.layers])
        att |= {
            "embed_tokens": np.asarray(model.embed_tokens[...])[None],
            "norm.weight": np.asarray(model.norm.weight[...])[None],
            "lm_head": _pad_rows(np.asarray(model.lm_head[...]), head_rows(c.vocab_size))[None],
        }

        def sources(d):
            if d < n_a:
                return att
            out = {}
            for kind, ids in (("moe", c.moe_layer_ids), ("dense", c.dense_layer_ids)):
                per = [layer_state.ffn_values(model.layers[i], self.layout, d - n_a) for i in ids]
                if per:
                    out |= {f"{kind}/{k}": v for k, v in _stack(per).items()}
            return out

        self.arenas = self._arrays_from(lambda d: self._device_buffers(d, sources))

    def load_random(self, seed: int = 0, scale: float = 0.02) -> None:
        """Random arenas on device (benchmarks): normal * ``scale`` for floats, 1 + small
        noise for norms; FP8 scales ``1/448``-sized so dequantized weights stay ~``scale``."""

        @functools.partial(jax.jit, static_argnums=(1, 2), out_shardings=self.sharding)
        def make(key, t, size):
            rows = self.num_mesh_devices * size // ALIGN
            x = jax.random.normal(key, (rows, ALIGN), jnp.float32)
            if t == "float32":  # FP8 block / KV scales: ~2e-4 x e4m3 values ~64 -> ~0.013
                return (jnp.abs(x) * 0.5 + 0.5) * 2e-4
            if t == "float8_e4m3fn":
                return jnp.clip(x * 64, -448, 448).astype(t)
            return (x * scale).astype(t)

        self.arenas = {
            t: make(jax.random.key(seed + i), t, n)
            for i, (t, n) in enumerate(self.arena.sizes.items())
        }

    # ----------------------------------------------------------------- program
    def _tables(self):
        """Static per-layer and per-round lookup tables (indexed by traced values)."""
        c, n_a = self.config, self.layout.num_attention
        is_moe = np.array([c.is_moe_layer(i) for i in range(c.num_layers)])
        names = self._branch_names()
        # layer -> its FFN branch's index in the tick's switch (an FFN device's work)
        ffn_branch = np.array([names.index(self._ffn_branch(i)) for i in range(c.num_layers)])
        kind_index = np.zeros(c.num_layers, np.int32)
        for ids in (c.moe_layer_ids, c.dense_layer_ids):
            kind_index[list(ids)] = np.arange(len(ids))
        rounds = exchange_rounds(n_a, self.layout.num_ffn)
        n = self.layout.num_devices
        src = np.full((len(rounds), n), n_a, np.int32)  # F device: which A it hears from
        dst = np.zeros((len(rounds), n), np.int32)  # F device: which A it answers
        for r, pairs in enumerate(rounds):
            for a, f in pairs:
                src[r, n_a + f] = dst[r, n_a + f] = a
        tables = (jnp.asarray(t) for t in (is_moe, kind_index, ffn_branch))
        return *tables, rounds, src, dst

    def _branch_names(self) -> tuple[str, ...]:
        """The tick's branches: ``attention``, ``ffn_<kind>`` per FFN layer kind, ``idle``."""
        return ("attention", *(f"ffn_{k}" for k in self.ffn_layers), "idle")

    def _ffn_branch(self, layer: int) -> str:
        """The FFN branch of ``layer``: ``ffn_moe`` or ``ffn_dense``."""
        return "ffn_" + ("moe" if self.config.is_moe_layer(layer) else "dense")

    def _static_branch(self, row) -> str:
        """What ``self.role``'s device does at schedule ``row`` (``idle`` if nothing)."""
        a_ok, _, _, f_ok, f_l, _ = (int(v) for v in row)
        if self.role == "attention" and a_ok:  # (a one-role program's stages are its role)
            return "attention"
        if self.role == "ffn" and f_ok:
            return self._ffn_branch(f_l)
        return "idle"

    def _segments(self) -> list[tuple[str | None, np.ndarray]]:
        """The schedule as scans: ``[(branch, rows)]``. The full program is one scan whose
        tick picks its branch with ONE `lax.switch` (branch None: chosen on device, from the
        device's role and the row). A one-role program knows each tick's branch statically:
        it drops its idle ticks (pipeline bubbles that only cost it a tick's overhead; with
        M >= 2 the full program has none in steady state) and runs each run of same-branch
        ticks as a scan with no conditional at all (XLA:GPU's conditional copies its
        predicate to the host and waits: ~35-45 us per tick measured on H100)."""
        if self.role is None:
            return [(None, self.schedule)]
        segments: list[tuple[str | None, list]] = []
        for row in self.schedule:
            name = self._static_branch(row)
            if name == "idle":
                continue
            if not segments or segments[-1][0] != name:
                segments.append((name, []))
            segments[-1][1].append(row)
        return [(name, np.array(rows, np.int32)) for name, rows in segments]

    def _attention_module(self, arenas, layer):
        """The attention-side `DecoderLayer` of ``layer`` (traced), parameters viewed in place."""
        values = arena_io.layer_values(arenas, self.arena.attention, self.att_layer[2], "", layer)
        return self._merged(self.att_layer, values)

    def _attention_rest(self, cache, x, q, pos, layer, is_moe):
        """The layer's `DecoderLayer.attention_out` over the written cache, then the A->F
        packet: ``(x_mid, packet)``. Its weights are read from the WRITTEN arena (one buffer
        holds weights and cache: views of the pre-write arena would keep it alive across the
        in-place scatter, and XLA would copy it). The attention role runs every layer as the
        MoE kind: a dense layer's (zero) routing is masked by ``is_moe`` (traced) and ignored
        by the FFN side."""
        c, a = self.config, self.afd
        module = self._attention_module(cache.arenas, layer)
        o = module.attend(cache, 0, q, pos, a.policy)
        x_mid, h2, routing = module.attention_out(x, o, a.policy)
        if routing is None:  # a model without MoE layers
            b, t = h2.shape[:2]
            zeros = jnp.zeros((b, t, c.top_k), jnp.float32)
            routing = (zeros, zeros.astype(jnp.int32))
        routing = (jnp.where(is_moe, routing[0], 0.0), jnp.where(is_moe, routing[1], 0))
        b, t, d = h2.shape
        routing = tuple(r.reshape(b * t, -1) for r in routing)
        packet = protocol.pack(h2.reshape(b * t, d), routing, c.top_k, a.fp8_transfer)
        return x_mid, packet

    def _ffn_item(self, arenas, packet, kind: str, kind_index, first_expert):
        """The ``kind`` layer's ``ffn_half`` on this FFN device's share (its experts in
        place)."""
        regs, policy = self.arena.ffn, self.afd.policy
        n_a, rows = packet.values.shape[:2]
        flat = jax.tree.map(lambda v: v.reshape(n_a * rows, *v.shape[2:]), packet)
        x = protocol.unpack(flat, self.act_dtype)
        in_place = policy.moe != "dense" and self.afd.experts_in_place
        role_layer = self.ffn_layers[kind]
        values = arena_io.layer_values(
            arenas, regs, role_layer[2], kind + "/", kind_index, in_place=in_place
        )
        mod = self._merged(role_layer, values)
        routing = (flat.weights, flat.ids) if kind == "moe" else None
        out = mod.ffn_half(x, routing, policy, first_expert).astype(self.act_dtype)
        return out.reshape(n_a, rows, -1)

    def _zero_packet(self, t: int, lead=()):
        c, a = self.config, self.afd
        rows, d, k = a.microbatch * t, c.hidden_size, c.top_k
        vdt = quant.FP8_DTYPE if a.fp8_transfer else self.act_dtype
        scales = jnp.zeros((*lead, rows, -(-d // quant.BLOCK)), jnp.float32)
        return protocol.Packet(
            jnp.zeros((*lead, rows, d), vdt),
            scales if a.fp8_transfer else None,
            jnp.zeros((*lead, rows, k), jnp.int32),
            jnp.zeros((*lead, rows, k), jnp.float32),
        )

    def _synthetic_inbox(self, t: int):
        """FFN-only timing: a fixed random inbox with realistic (uniform) routing."""
        c, m = self.config, self.afd.num_microbatches + 1
        z = self._zero_packet(t, (m, self.layout.num_attention))
        key = jax.random.key(7)
        h = jax.random.normal(key, z.values.shape, jnp.float32)
        ids = jax.random.randint(key, z.ids.shape, 0, c.num_experts, jnp.int32)
        w = jax.random.uniform(key, z.weights.shape, jnp.float32)
        if self.afd.fp8_transfer:
            vals, scales = quant.quantize_activations(h)
            return protocol.Packet(vals, scales, ids, w)
        return protocol.Packet(h.astype(self.act_dtype), None, ids, w)

    def _exchange(self, packet, result, dev, rounds, src, dst):
        """A->F packets (into a ``[x+1, ...]`` receive buffer, slot x = nobody) and F->A
        partials (summed in float32 over the FFN devices)."""
        n_a = self.layout.num_attention
        recv = jax.tree.map(lambda v: jnp.zeros((n_a + 1, *v.shape), v.dtype), packet)
        total = jnp.zeros(result.shape[1:], jnp.float32)
        for r, pairs in enumerate(rounds):
            fwd = [(a, n_a + f) for a, f in pairs]
            got = jax.tree.map(lambda v, fwd=fwd: lax.ppermute(v, "afd", fwd), packet)
            slot = jnp.asarray(src[r])[dev]
            recv = jax.tree.map(lambda b, g, slot=slot: b.at[slot].set(g), recv, got)
            back = [(n_a + f, a) for a, f in pairs]
            send = result[jnp.asarray(dst[r])[dev]]
            total = total + lax.ppermute(send, "afd", back).astype(jnp.float32)
        return jax.tree.map(lambda b: b[:n_a], recv), total

    def _body(self, arenas, tokens, positions, select):
        c, a, lay = self.config, self.afd, self.layout
        m_count, bm = a.num_microbatches, a.microbatch
        _, bd, t = tokens.shape
        is_moe_t, kind_t, ffn_branch_t, rounds, src, dst = self._tables()
        dev = lax.axis_index("afd")
        e_local = c.num_experts // lay.ffn_ep
        if self.role is None:
            is_attn = dev < lay.num_attention
            first_expert = ((dev - lay.num_attention) // lay.ffn_tp) * e_local
        else:  # one device playing attention device 0 or FFN device 0
            is_attn, first_expert = jnp.asarray(self.role == "attention"), 0
        d = c.hidden_size

        def embed():
            embed_w = arena_io.view(arenas, self.arena.attention["embed_tokens"], 0)
            return jnp.take(embed_w, tokens[0], axis=0).astype(self.act_dtype)

        x0 = (
            embed()
            if self.role == "attention"
            else lax.cond(is_attn, embed, lambda: jnp.zeros((bd, t, d), self.act_dtype))
            if self.role is None
            else jnp.zeros((bd, t, d), self.act_dtype)
        )
        trash = jnp.zeros((1, bm, t, d), self.act_dtype)
        x = jnp.concatenate([x0.reshape(m_count, bm, t, d), trash])
        pos = jnp.concatenate(
            [positions[0].reshape(m_count, bm, t), jnp.zeros((1, bm, t), jnp.int32)]
        )
        do_a, do_f, do_x = (s in self.stages for s in STAGES)
        inbox = (
            self._zero_packet(t, (m_count + 1, lay.num_attention))
            if do_a
            else self._synthetic_inbox(t)
        )
        zero_packet = self._zero_packet(t)
        zero_result = jnp.zeros((lay.num_attention, bm * t, d), self.act_dtype)
        names = self._branch_names()
        zq = (
            jnp.zeros((bm, t, c.num_heads, c.head_dim), self.act_dtype),
            *[jnp.zeros((bm, t, c.head_dim), self.act_dtype)] * 2,
        )

        def tick(carry, row, branch: str | None):
            arenas, x, x_mid, inbox = carry
            a_ok, a_l, a_m, f_ok, f_l, f_m = (row[i] for i in range(6))
            # Traced even in a one-role program (a_ok > 0 on all its rows): a constant
            # predicate would let XLA inline the q/k/v conditional and lose its ordering.
            act_a = (a_ok > 0) & (branch == "attention" if branch else is_attn & do_a)
            conditional = branch is None or not self.on_gpu
            cache = q = None
            if self.role != "ffn":  # an FFN-only program holds no attention regions
                # The arena is written by ONE masked scatter outside every branch (inactive:
                # indices out of range) and only read inside them: a branch returning it
                # makes XLA copy it. The reads of the pre-write arena for q/k/v are ordered
                # before the write (`_qkv_before_write`).
                def qkv():
                    mod = self._attention_module(arenas, a_l)
                    return mod.attention_qkv(x[a_m], pos[a_m], a.policy)

                q, k, v = _qkv_before_write(act_a, qkv, zq, conditional)
                item = a_l * m_count + a_m
                cache = arena_io.ArenaKVCache(
                    arenas, self.arena.attention, item, bm, act_a, self.dtypes.v_transposed
                )
                cache = cache.write(0, k, v, pos[a_m])
                arenas = cache.arenas

            def attention():
                xm, pk = self._attention_rest(cache, x[a_m], q, pos[a_m], a_l, is_moe_t[a_l])
                return x_mid.at[a_m].set(xm), pk, zero_result

            def ffn(kind):
                pk = jax.tree.map(lambda v: v[f_m], inbox)
                res = self._ffn_item(arenas, pk, kind, kind_t[f_l], first_expert)
                return x_mid, zero_packet, res

            def idle():
                return x_mid, zero_packet, zero_result

            fns = {"attention": attention, "idle": idle}
            fns |= {n: functools.partial(ffn, n[4:]) for n in names if n.startswith("ffn_")}
            if branch is not None:  # a one-role program: known statically
                x_mid, packet, result = fns[branch]()
            else:  # the full program: one `lax.switch` on the device's role and the row
                f_on = ~is_attn & (f_ok > 0) & do_f
                index = jnp.where(act_a, 0, jnp.where(f_on, ffn_branch_t[f_l], len(names) - 1))
                x_mid, packet, result = lax.switch(index, [fns[n] for n in names])
            if do_x:
                got, total = self._exchange(packet, result, dev, rounds, src, dst)
            else:  # stage timing: no exchange. The messages stay on the device and are used
                # as the step uses them (or XLA deletes the work that makes them: the router,
                # the packet): the packet goes where a receive puts it, the partials are
                # summed into the residual.
                got = jax.tree.map(
                    lambda v: jnp.broadcast_to(v, (lay.num_attention, *v.shape)), packet
                )
                total = jnp.sum(result.astype(jnp.float32), axis=0)
            if do_a:
                inbox = jax.tree.map(lambda b, g: b.at[a_m].set(g), inbox, got)
            upd = x_mid[f_m] + total.reshape(bm, t, d).astype(self.act_dtype)
            x = x.at[f_m].set(upd)
            return (arenas, x, x_mid, inbox), None

        carry = (arenas, x, jnp.zeros_like(x), inbox)
        for branch, rows in self._segments():
            step = functools.partial(tick, branch=branch)
            carry, _ = lax.scan(step, carry, jnp.asarray(rows))
        arenas, x = carry[:2]

        def head():
            xs = x[:m_count].reshape(bd, t, d)
            last = jnp.take_along_axis(xs, select[0][:, None, None], axis=1)[:, 0]
            regs = self.arena.attention
            norm_w, head = (arena_io.view(arenas, regs[n], 0) for n in ("norm.weight", "lm_head"))
            return head_logits(last, norm_w, head, c.rms_norm_eps)[:, : c.vocab_size]

        zeros = jnp.zeros((bd, c.vocab_size), jnp.float32)
        if self.role is not None:
            logits = head() if self.role == "attention" and do_a else zeros
        else:
            logits = lax.cond(is_attn & do_a, head, lambda: zeros)
        if self.stages != STAGES:  # stage timing: x and the inbox stay live on every device
            live = [x, *(jax.tree.leaves(carry[3]) if do_a else ())]
            logits = logits + 1e-30 * sum(jnp.sum(v.astype(jnp.float32)) for v in live)
        return logits[None], arenas

    def _build(self):
        spec = P("afd")
        body = jax.shard_map(
            self._body,
            mesh=self.mesh,
            in_specs=(spec, spec, spec, spec),
            out_specs=(spec, spec),
            check_vma=False,
        )
        opts = compiler_options(self.on_gpu, self.afd.compiler_options)
        return jax.jit(body, donate_argnums=0, compiler_options=opts)

    # -------------------------------------------------------------------- step
    def _per_device(self, a: np.ndarray) -> jax.Array:
        """``[B, ...]`` (attention devices' sequences) -> ``[N, B/x, ...]``, FFN rows 0."""
        n_a, n = max(self.num_attention_devices, 1), self.num_mesh_devices
        a = np.asarray(a).reshape(n_a, -1, *np.shape(a)[1:])
        full = np.concatenate([a, np.zeros((n - n_a, *a.shape[1:]), a.dtype)])
        return jax.make_array_from_callback(full.shape, self.sharding, lambda i: full[i])

    def compiled(self) -> jax.stages.Compiled:
        """The step program compiled for abstract arenas and inputs (no device memory is
        touched): its optimized HLO (``as_text()``) and ``memory_analysis()``, for probes and
        for reading a profile's kernels back to the model's name scopes."""
        n, sh = self.num_mesh_devices, self.sharding
        arenas = {
            t: jax.ShapeDtypeStruct((n * size // ALIGN, ALIGN), jnp.dtype(t), sharding=sh)
            for t, size in self.arena.sizes.items()
        }
        shapes = ((self.batch, 1), (self.batch, 1), (self.batch,))
        feed = [self._per_device(np.zeros(s, np.int32)) for s in shapes]
        return self._program.lower(arenas, *feed).compile()

    def step(self, tokens, positions, select) -> jax.Array:
        """One compiled step; returns the attention devices' logits ``[B, V]`` float32
        (a global array; in multi-process runs fetch it with `multihost_utils`)."""
        if self.arenas is None:
            raise ValueError("arenas are empty: call load_model(model) or load_random() first")
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch:
            raise ValueError(f"tokens must be [B={self.batch}, T] int32, got {tokens.shape}")
        args = [
            self._per_device(a)
            for a in (tokens, np.asarray(positions, np.int32), np.asarray(select, np.int32))
        ]
        logits, self.arenas = self._program(self.arenas, *args)
        return logits[: max(self.num_attention_devices, 1)].reshape(self.batch, -1)
