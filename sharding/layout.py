"""AFD layouts ("xAyF"), meshes, PartitionSpecs, and the per-device memory layout (role arenas).

This docstring is THE description of the AFD memory layout (docs/afd.md repeats it with the
measurements).

Layouts
-------
An `AfdLayout` ``xAyF`` puts ``x`` attention devices (data-parallel: each owns its sequences
and their KV cache, and runs embedding, MFA, router and LM head) and ``y = ffn_ep * ffn_tp``
FFN devices (routed experts split ``ffn_ep`` ways by expert and ``ffn_tp`` ways along each
expert's F) on a list of devices: attention devices first, then FFN devices (row-major over
``(ffn_ep, ffn_tp)``). The shared expert and the dense-layer SwiGLU are tensor-parallel over
ALL ``y`` FFN devices, their F padded with zero rows/columns to a multiple of ``y`` (a zero
gate/up row and a zero down column contribute exactly 0, so padding changes no result).

Meshes and specs. The readable executor (`step3_jax.sharding.reference`) uses two meshes with
role-named axes, ``attn_dp`` and ``(ffn_ep, ffn_tp)``, so a spec cannot land on the wrong role
(`AttentionSpecs`, `FfnSpecs`). The compiled executor (`step3_jax.sharding.afd`) runs ONE program
over a 1-D mesh ``afd`` holding every device; a device's role is ``axis_index('afd') < x``.

The memory catch, and the role arena
------------------------------------
In one SPMD program every device receives a same-shaped shard of every argument. Giving each
role its own arrays would make every device hold both roles' shards (for full Step-3 as 1A3F,
~100 GB of experts on the attention GPU). Instead every device holds, for each storage dtype,
ONE flat buffer (an *arena*, global shape ``[n_devices * P_dtype]`` sharded over ``afd``), and
each role lays out its own tensors in it:

Regions are named by the model's own parameter paths (`step3_jax.sharding.layer_state`), so the
program rebuilds each layer as the NNX `DecoderLayer` it is and runs its methods:

* attention role: per layer (count L) the attention-side parameters of a `DecoderLayer`:
  ``input_layernorm.weight [D]``, ``self_attn.q_proj [R,D]``, ``k_proj``/``v_proj [H,D]`` (or
  ``self_attn.qkv_proj [R+2H, D]`` for FP8 weights whose rows fuse exactly),
  ``self_attn.inter_norm.weight [R]``, ``self_attn.wq [N,H,R]``, ``self_attn.o_proj [D,N,H]``,
  ``post_attention_layernorm.weight [D]``, ``ffn.router [E,D]`` (zero in dense layers); FP8
  weights add ``<path>:scale``; once: ``embed_tokens [V,D]``, ``norm.weight [D]``,
  ``lm_head [head_rows(V),D]`` (V rounded up to a multiple of 8, zero rows: cuBLAS then reads
  it in place, where a V like Step-3's 128,815 made XLA pad a 1.85 GB copy every step); the
  KV cache as items ``cache_k, cache_v [Bm,S,H]`` (count L*M: item
  ``l*M + m`` is micro-batch m of layer l) plus, for an FP8 cache, ``cache_k_scale,
  cache_v_scale [Bm,S]`` float32.
* FFN role: per MoE layer ``moe/ffn.gate_proj, moe/ffn.up_proj [E/ep, F/tp, D]``,
  ``moe/ffn.down_proj [E/ep, D, F/tp]``, ``moe/ffn.shared_expert.* `` (``w(Fs)`` wide);
  per dense layer ``dense/ffn.gate_proj, dense/ffn.up_proj [w(Fd), D]``,
  ``dense/ffn.down_proj [D, w(Fd)]``, where ``w(F) = ceil(F/y)``, rounded up to a multiple of
  128 when F is one and w(F) >= 128 (`layer_state.split_width`: zero-padded, so the FP8 GEMM
  takes the slice).

Each arena is a ``[rows, ALIGN]`` array; each region starts on a row and item i of a region
sits at element ``offset + i * stride`` (``stride`` = the item size rounded up to a row).
``P_dtype = max over roles`` of that role's end offset: the two
roles OVERLAP in the same bytes, so a device's memory is the larger role's, never the sum. The
executor reads a tensor with one ``lax.dynamic_slice`` + reshape and writes the cache with a
scatter into the (donated) arena, in place. The routed experts (``gate``, ``up``, ``down``) are
NOT sliced: their regions are *pool-aligned* (offset and stride multiples of one expert matrix,
N*K elements; the arena length too), so the arena reshaped to ``[arena/(N*K), N, K]`` (a free
bitcast) holds a layer's experts as consecutive matrices and the grouped GEMM reads them in
place at a matrix offset (`pool_align`; a dynamic slice would materialize 1.7-5 GB per tick).
Waste of a role = arena bytes it does not use; the
attention role turns its spare bytes into KV cache (`kv_batch_that_fits`), so on full Step-3
the only waste is the per-dtype mismatch (e.g. the FFN devices' unused bf16 embedding slot),
checked by tests/sharding/test_afd_layout.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from step3_jax.cache import V_TILE, check_v_transposed, v_tiles_shape
from step3_jax.config import check_sizes
from step3_jax.sharding import layer_state
from step3_jax.sharding.layer_state import ParamSpec

ALIGN = 512  # elements: every region starts 512-element aligned (>= 512 B: coalesced loads)
_LAYOUT_RE = re.compile(r"^\s*(\d+)\s*[Aa]\s*(\d+)\s*[Ff]\s*$")


@dataclasses.dataclass(frozen=True)
class AfdLayout:
    """``num_attention`` attention devices + ``ffn_ep * ffn_tp`` FFN devices."""

    num_attention: int  # x: data-parallel attention devices
    ffn_ep: int  # expert-parallel ways of the FFN devices
    ffn_tp: int = 1  # tensor-parallel ways (along F) of each expert

    def __post_init__(self):
        check_sizes(
            "AfdLayout", num_attention=self.num_attention, ffn_ep=self.ffn_ep, ffn_tp=self.ffn_tp
        )

    @classmethod
    def parse(cls, text: str, ffn_ep: int | None = None) -> AfdLayout:
        """``"1A3F"`` -> 1 attention + 3 FFN devices; ``ffn_ep`` defaults to all EP."""
        m = _LAYOUT_RE.match(text)
        if not m:
            raise ValueError(f"layout must look like '2A6F' (xAyF), got {text!r}")
        a, f = int(m.group(1)), int(m.group(2))
        ep = f if ffn_ep is None else int(ffn_ep)
        if ep < 1 or f % ep:
            raise ValueError(f"ffn_ep={ep} must divide the {f} FFN devices of {text!r}")
        return cls(a, ep, f // ep)

    @property
    def num_ffn(self) -> int:
        return self.ffn_ep * self.ffn_tp

    @property
    def num_devices(self) -> int:
        return self.num_attention + self.num_ffn

    @property
    def name(self) -> str:
        return f"{self.num_attention}A{self.num_ffn}F"

    def check_config(self, config) -> None:
        """Raises ValueError if the experts / expert F do not split over this layout."""
        if config.num_experts % self.ffn_ep:
            raise ValueError(
                f"{self.name}: ffn_ep={self.ffn_ep} must divide num_experts={config.num_experts}"
            )
        if config.moe_intermediate_size % self.ffn_tp:
            raise ValueError(
                f"{self.name}: ffn_tp={self.ffn_tp} must divide "
                f"moe_intermediate_size={config.moe_intermediate_size}"
            )

    def check_devices(self, devices) -> list:
        devices = list(devices)
        if len(devices) != self.num_devices:
            raise ValueError(
                f"layout {self.name} (ep={self.ffn_ep}, tp={self.ffn_tp}) needs exactly "
                f"{self.num_devices} devices, got {len(devices)}"
            )
        return devices

    # ------------------------------------------------------------------ meshes
    def afd_mesh(self, devices) -> Mesh:
        """One 1-D mesh ``('afd',)``: attention devices first, then FFN devices."""
        return Mesh(np.array(self.check_devices(devices)), ("afd",))

    def attention_mesh(self, devices) -> Mesh:
        devices = self.check_devices(devices)
        return Mesh(np.array(devices[: self.num_attention]), ("attn_dp",))

    def ffn_mesh(self, devices) -> Mesh:
        devices = self.check_devices(devices)
        grid = np.array(devices[self.num_attention :]).reshape(self.ffn_ep, self.ffn_tp)
        return Mesh(grid, ("ffn_ep", "ffn_tp"))

    def ffn_coords(self, j: int) -> tuple[int, int]:
        """FFN device j (0-based among FFN devices) -> (ep index, tp index)."""
        return j // self.ffn_tp, j % self.ffn_tp


@dataclasses.dataclass(frozen=True)
class AttentionSpecs:
    """PartitionSpecs on the attention mesh (axis ``attn_dp``); weights are replicated."""

    act_btd: PartitionSpec = PartitionSpec("attn_dp")
    tokens_bt: PartitionSpec = PartitionSpec("attn_dp")
    cache_lbsh: PartitionSpec = PartitionSpec(None, "attn_dp")
    routing_btk: PartitionSpec = PartitionSpec("attn_dp")
    weights: PartitionSpec = PartitionSpec()


@dataclasses.dataclass(frozen=True)
class FfnSpecs:
    """PartitionSpecs on the FFN mesh (axes ``ffn_ep``, ``ffn_tp``).

    Tokens arrive replicated on every FFN device; each returns a partial ``[A, T, D]`` sum
    (stacked over the FFN devices along a leading axis) that the attention side adds up.
    """

    w_gate_efd: PartitionSpec = PartitionSpec("ffn_ep", "ffn_tp", None)
    w_down_edf: PartitionSpec = PartitionSpec("ffn_ep", None, "ffn_tp")
    shared_gate_fd: PartitionSpec = PartitionSpec(("ffn_ep", "ffn_tp"), None)
    shared_down_df: PartitionSpec = PartitionSpec(None, ("ffn_ep", "ffn_tp"))
    tokens_td: PartitionSpec = PartitionSpec()
    partial_ytd: PartitionSpec = PartitionSpec(("ffn_ep", "ffn_tp"))


@dataclasses.dataclass(frozen=True)
class ArenaSpecs:
    """The compiled executor's specs on the 1-D ``afd`` mesh: one row per device."""

    arena_p: PartitionSpec = PartitionSpec("afd")
    per_device_bt: PartitionSpec = PartitionSpec("afd")


# ---------------------------------------------------------------------------- memory layout
@dataclasses.dataclass(frozen=True)
class Region:
    """``count`` items of ``shape`` in the ``dtype`` arena, item i at ``offset + i*size``."""

    name: str
    dtype: str  # numpy dtype name of the arena it lives in
    shape: tuple[int, ...]
    count: int
    offset: int = 0
    pooled: bool = False  # items read in place as matrices of shape[1:] (see `pool_align`)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def align(self) -> int:
        """Offset and stride are multiples of this (a multiple of ALIGN)."""
        return pool_align(self.shape) if self.pooled else ALIGN

    @property
    def stride(self) -> int:
        """Elements between items: ``size`` rounded up to ``align`` (>= ALIGN), so every item
        starts on an arena row (arenas are ``[rows, ALIGN]``: int32 row indices reach 2**31 *
        ALIGN elements, where a flat int32 index would overflow at 2 GiB-elements)."""
        return -(-self.size // self.align) * self.align

    @property
    def pool_matrix(self) -> int | None:
        """Elements of one ``shape[1:]`` matrix if the region is pooled, else None: item i is
        then matrices ``[first, first + shape[0])`` of the arena viewed as ``[arena / nk,
        *shape[1:]]``, read in place (grouped GEMM experts, paged-attention cache pages)."""
        return math.prod(self.shape[1:]) if self.pooled else None

    @property
    def end(self) -> int:
        return self.offset + self.count * self.stride

    @property
    def nbytes(self) -> int:
        return self.count * self.size * np.dtype(self.dtype).itemsize


def pool_align(shape: tuple[int, ...]) -> int:
    """Alignment (elements) that lets a stacked ``[E, N, K]`` expert weight be read IN PLACE:
    with offsets and strides multiples of N*K, the whole arena reshaped (a free bitcast) to
    ``[arena / (N*K), N, K]`` holds each item's experts as consecutive matrices, so the grouped
    GEMM reads them at a matrix offset; a sliced copy of a layer's experts (~1.7-5 GB) per tick
    is avoided (it doubled the FFN tick on 2 H200s: docs/afd.md)."""
    return math.lcm(ALIGN, math.prod(shape[1:]))


def _place(specs: list[tuple]) -> dict[str, Region]:
    """Assigns aligned offsets, region after region, separately in each dtype's arena.
    ``specs``: (name, dtype, shape, count) or (name, dtype, shape, count, pooled)."""
    cursor: dict[str, int] = {}
    out = {}
    for name, dtype, shape, count, *rest in specs:
        reg = Region(
            name, dtype, tuple(int(s) for s in shape), int(count), 0, bool(rest and rest[0])
        )
        start = -(-cursor.get(dtype, 0) // reg.align) * reg.align
        out[name] = dataclasses.replace(reg, offset=start)
        cursor[dtype] = out[name].end
    return out


@dataclasses.dataclass(frozen=True)
class ArenaDtypes:
    """Storage dtypes (numpy names) of the tensor kinds an arena holds."""

    weight: str = "bfloat16"  # linear weights ("float8_e4m3fn": + float32 block scales)
    norm: str = "bfloat16"  # RMSNorm scales and the router
    embed: str = "bfloat16"  # embedding and lm_head
    cache: str = "bfloat16"  # KV cache ("float8_e4m3fn": + float32 per-token scales)
    # Storage layout, FP8 cache only: cache_v items as V^T tiles [Bm, S / 64, H, 64], the
    # layout of the decode kernel's FP8 P.V (`step3_jax.cache.KVCache`, ``v_transposed``).
    v_transposed: bool = False

    def __post_init__(self):
        check_v_transposed(
            self.v_transposed, self.cache == "float8_e4m3fn", f"ArenaDtypes(cache={self.cache!r})"
        )

    @property
    def fp8_weights(self) -> bool:
        return self.weight == "float8_e4m3fn"


DEFAULT_DTYPES = ArenaDtypes()


def _param_regions(spec: ParamSpec, prefix: str, count: int, dt: ArenaDtypes) -> list[tuple]:
    """A parameter's region(s), named by its path: values (pool-aligned for the routed experts,
    read in place), plus ``":scale"`` (float32 128x128 block scales) when FP8."""
    if spec.scale_shape is not None:
        dtype = "float8_e4m3fn"
    elif len(spec.shape) == 1 or spec.path == layer_state.ROUTER:
        dtype = dt.norm  # RMSNorm scales and the router (never quantized)
    else:
        dtype = dt.weight
    pooled = spec.path in layer_state.EXPERT_PATHS and len(spec.shape) == 3  # routed experts
    out = [(prefix + spec.path, dtype, spec.shape, count, *([True] if pooled else []))]
    if spec.scale_shape is not None:
        out.append((prefix + spec.path + ":scale", "float32", spec.scale_shape, count))
    return out


def role_template(config, dt: ArenaDtypes, kind: str, act_dtype=jnp.bfloat16):
    """The abstract layer a role's regions are cut from (`layer_state.template`), computing
    in ``act_dtype``."""
    param = dt.norm if dt.fp8_weights else dt.weight
    return layer_state.template(
        config, kind, dtype=jnp.dtype(act_dtype), param_dtype=jnp.dtype(param), fp8=dt.fp8_weights
    )


def attention_kind(config) -> str:
    """The layer kind whose template the attention role uses for every layer (MoE if any: its
    router is the only attention-side difference, zero for dense layers)."""
    return "moe" if config.moe_layer_ids else "dense"


HEAD_ROW_MULTIPLE = 8  # cuBLAS bf16 GEMMs want N % 8 == 0, else XLA pads (copies) the weight


def head_rows(vocab_size: int) -> int:
    """Rows of the arena's lm_head region: the vocabulary rounded up to HEAD_ROW_MULTIPLE."""
    return -(-vocab_size // HEAD_ROW_MULTIPLE) * HEAD_ROW_MULTIPLE


def attention_specs(config, dt: ArenaDtypes, microbatch: int, num_mb: int, max_len: int):
    """(name, dtype, shape, count) of everything an attention device holds: per layer the
    attention-side parameters of the model's own `DecoderLayer` by path, once the embedding,
    final norm and lm_head (the model's paths), and the KV cache items."""
    c, n_l, h = config, config.num_layers, config.head_dim
    tmpl = role_template(config, dt, attention_kind(config))
    specs = []
    for spec in layer_state.role_params(tmpl, layer_state.ATTENTION):
        specs += _param_regions(spec, "", n_l, dt)
    d = c.hidden_size
    specs += [("embed_tokens", dt.embed, (c.vocab_size, d), 1), ("norm.weight", dt.norm, (d,), 1)]
    specs += [("lm_head", dt.embed, (head_rows(c.vocab_size), d), 1)]
    # Pool-aligned: the arena viewed as [*, S, H] pages (one page per sequence) holds each
    # item's sequences as consecutive pages, read in place by the paged attention kernel.
    kv, n_items = (microbatch, max_len, h), n_l * num_mb
    kv_v = kv
    if dt.v_transposed:  # V^T tiles: one contiguous [H, 64] block per 64 tokens
        if max_len % V_TILE:
            raise ValueError(
                f"v_transposed=True stores V in {V_TILE}-token tiles: max_len must be a multiple "
                f"of {V_TILE}, got {max_len}"
            )
        kv_v = v_tiles_shape(kv)
    for name, shape in (("cache_k", kv), ("cache_v", kv_v)):
        specs += [(name, dt.cache, shape, n_items, True)]
    if dt.cache == "float8_e4m3fn":
        for name in ("cache_k_scale", "cache_v_scale"):
            specs += [(name, "float32", kv[:2], n_items, True)]
    return specs


def ffn_local_dims(config, layout: AfdLayout) -> dict[str, int]:
    """Per-FFN-device widths: experts, routed F, shared F and dense F (padded to split,
    `layer_state.split_width`)."""
    local = layer_state.local_config(config, layout)
    return dict(
        experts=local.num_experts,
        moe_f=local.moe_intermediate_size,
        shared_f=local.share_expert_dim,
        dense_f=local.intermediate_size,
    )


def ffn_specs(config, layout: AfdLayout, dt: ArenaDtypes):
    """(name, dtype, shape, count) of everything an FFN device holds: for each layer kind
    ("moe/..." over the MoE layers, "dense/..." over the dense ones) the FFN-side parameters of
    a `DecoderLayer` of the device's local config (`layer_state.local_config`), by path."""
    local = layer_state.local_config(config, layout)
    specs = []
    for kind, ids in (("moe", config.moe_layer_ids), ("dense", config.dense_layer_ids)):
        if not ids:
            continue
        tmpl = role_template(local, dt, kind)
        for spec in layer_state.role_params(tmpl, layer_state.FFN):
            specs += _param_regions(spec, kind + "/", len(ids), dt)
    return specs


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    """Where each role's tensors live in the per-dtype arenas (see the module docstring)."""

    attention: dict[str, Region]
    ffn: dict[str, Region]
    sizes: dict[str, int]  # dtype -> elements per device (max over roles, ALIGN-rounded)

    @classmethod
    def build(
        cls,
        config,
        layout: AfdLayout,
        *,
        microbatch: int,
        num_microbatches: int,
        max_len: int,
        dtypes: ArenaDtypes = DEFAULT_DTYPES,
        roles: tuple[str, ...] = ("attention", "ffn"),
    ) -> ArenaLayout:
        """``roles``: the roles whose regions the arena must hold (one role: a one-device
        program of that role, `AfdExecutor(role=...)`; its size ignores the other role)."""
        check_sizes(
            "ArenaLayout.build",
            microbatch=microbatch,
            num_microbatches=num_microbatches,
            max_len=max_len,
        )
        layout.check_config(config)
        att = _place(attention_specs(config, dtypes, microbatch, num_microbatches, max_len))
        ffn = _place(ffn_specs(config, layout, dtypes))
        sizes: dict[str, int] = {}
        unit: dict[str, int] = {}  # arena length multiple: every pool view must tile it
        held = [
            *(att.values() if "attention" in roles else ()),
            *(ffn.values() if "ffn" in roles else ()),
        ]
        for reg in held:
            sizes[reg.dtype] = max(sizes.get(reg.dtype, 0), reg.end)
            unit[reg.dtype] = math.lcm(unit.get(reg.dtype, ALIGN), reg.align)
        sizes = {t: -(-n // unit[t]) * unit[t] for t, n in sizes.items()}
        return cls(att, ffn, sizes)

    def role(self, role: str) -> dict[str, Region]:
        if role not in ("attention", "ffn"):
            raise ValueError(f"role must be 'attention' or 'ffn', got {role!r}")
        return self.attention if role == "attention" else self.ffn

    def bytes_per_device(self) -> int:
        return sum(n * np.dtype(t).itemsize for t, n in self.sizes.items())

    def used_bytes(self, role: str) -> int:
        return sum(r.nbytes for r in self.role(role).values())

    def waste_bytes(self, role: str) -> int:
        """Arena bytes a device of ``role`` holds but never reads (alignment gaps included)."""
        return self.bytes_per_device() - self.used_bytes(role)

    def naive_bytes_per_device(self) -> int:
        """What one array per tensor would cost: every device holds BOTH roles' shards."""
        return self.used_bytes("attention") + self.used_bytes("ffn")

    def report(self) -> dict:
        gib = 2.0**30
        return {
            "arena_elements": dict(self.sizes),
            "bytes_per_device_gib": self.bytes_per_device() / gib,
            "attention_used_gib": self.used_bytes("attention") / gib,
            "ffn_used_gib": self.used_bytes("ffn") / gib,
            "naive_two_role_gib": self.naive_bytes_per_device() / gib,
        }


def kv_batch_that_fits(
    config,
    layout: AfdLayout,
    *,
    device_bytes: int,
    num_microbatches: int,
    max_len: int,
    dtypes: ArenaDtypes = DEFAULT_DTYPES,
    reserve_bytes: int = 0,
) -> int:
    """Largest micro-batch whose arena fits ``device_bytes - reserve_bytes`` (0 if none)."""
    where = "kv_batch_that_fits"
    sizes = dict(device_bytes=device_bytes, num_microbatches=num_microbatches, max_len=max_len)
    check_sizes(where, **sizes)
    check_sizes(where, minimum=0, reserve_bytes=reserve_bytes)

    def fits(mb: int) -> bool:
        arena = ArenaLayout.build(
            config,
            layout,
            microbatch=mb,
            num_microbatches=num_microbatches,
            max_len=max_len,
            dtypes=dtypes,
        )
        return arena.bytes_per_device() <= device_bytes - reserve_bytes

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def arena_sharding(mesh: Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, ArenaSpecs().arena_p)
