"""Reading and writing tensors in the per-device role arenas (layout: `step3_jax.sharding.layout`).

Inside the compiled AFD step each device holds its arenas ``{dtype: [rows, ALIGN]}``. Plain
tensors are read as views (`view`: one dynamic slice of whole rows + reshape; XLA copies it
when a custom call consumes it); *pooled* regions (routed experts, KV-cache pages) are handed
to the kernels in place (`pool`: the whole arena as matrices + the item's first matrix); the KV
cache is written by one masked scatter per arena dtype (`write_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from step3_jax import quant
from step3_jax.cache import V_TILE, attend_cache, v_from_tiles
from step3_jax.kernels.mfa_decode.api import MAX_T
from step3_jax.layers.moe import ExpertPool
from step3_jax.quant_model import Fp8Weight
from step3_jax.sharding.layout import ALIGN, Region

CACHE_REGIONS = ("cache_k", "cache_v", "cache_k_scale", "cache_v_scale")


def view(arenas: dict, reg: Region, item) -> jax.Array:
    """Item ``item`` of ``reg``: whole arena rows, cut to the item's size and shape."""
    rows = reg.stride // ALIGN
    start = reg.offset // ALIGN + item * rows
    flat = lax.dynamic_slice(arenas[reg.dtype], (start, 0), (rows, ALIGN)).reshape(-1)
    if reg.stride != reg.size:
        flat = flat[: reg.size]
    return flat.reshape(reg.shape)


def pool(arenas: dict, reg: Region, item, scale) -> ExpertPool:
    """Item ``item`` of a pool-aligned region, in place: the arena as ``[P, N, K]`` matrices
    (a bitcast: no copy) and the item's first matrix (computed in matrices, so int32 is
    enough however large the arena)."""
    nk = reg.pool_matrix
    matrices = arenas[reg.dtype].reshape(-1, *reg.shape[1:])
    first = reg.offset // nk + item * (reg.stride // nk)
    return ExpertPool(matrices, jnp.asarray(first, jnp.int32), scale, reg.shape[0])


def layer_values(arenas: dict, regions: dict, specs, prefix: str, item, in_place=False) -> dict:
    """``{path: value}`` of one layer's parameters (``specs``: `layer_state.ParamSpec` of the
    role template) at ``item``, for `layer_state.merge_layer`: views of the arena, FP8 values
    with their ``":scale"`` region as `Fp8Weight`; with ``in_place``, pool-aligned regions (the
    routed experts) as `ExpertPool`s read where they are."""
    out = {}
    for spec in specs:
        reg = regions[prefix + spec.path]
        s_reg = regions.get(prefix + spec.path + ":scale")
        scale = None if s_reg is None else view(arenas, s_reg, item)
        if in_place and reg.pool_matrix is not None:
            out[spec.path] = pool(arenas, reg, item, scale)
            continue
        v = view(arenas, reg, item)
        out[spec.path] = v if scale is None else Fp8Weight(v, scale, spec.num_contract)
    return out


def _token_index(arenas, reg: Region, item, b_idx, positions, active, transposed=False):
    """Flat ``(rows, columns)`` arena index of each element of item ``item``'s tokens in
    ``reg`` (shape [Bm, S, *row]) at slots ``positions [Bm, T]``, in the order of a
    ``[Bm, T, *row]`` value. Inactive (``active`` False: FFN devices, idle ticks): every row
    index out of range, so a ``mode="drop"`` scatter drops it. ``transposed``: ``reg`` holds
    V^T tiles [Bm, S/64, H, 64] and value h of token (b, t) goes to (b, pos // 64, h, pos %
    64)."""
    if transposed:
        n, h, tile = reg.shape[1:]
        row = (b_idx * n + positions // tile)[..., None] * h + jnp.arange(h)  # [Bm, T, H]
        local = row * tile + (positions % tile)[..., None]
    else:
        row = int(np.prod(reg.shape[2:]))
        local = ((b_idx * reg.shape[1] + positions) * row)[..., None] + jnp.arange(row)
    rows = reg.offset // ALIGN + item * (reg.stride // ALIGN) + local // ALIGN
    rows = jnp.where(active, rows, arenas[reg.dtype].shape[0])  # out of range: dropped
    return rows.reshape(-1), (local % ALIGN).reshape(-1)


def write_rows(arenas, writes, item, b_idx, positions, active) -> dict:
    """Scatter each ``(reg, values [Bm, T, *row], transposed)`` of ``writes`` into item
    ``item`` of its region at slots ``positions [Bm, T]`` (`_token_index`), as ONE flat
    in-place scatter per arena dtype (the FP8 K and V values together, their f32 scales
    together): a scatter is a kernel launch a tick whatever its few KB. Masked by ``active``."""
    by_dtype: dict[str, list] = {}
    for reg, values, transposed in writes:
        index = _token_index(arenas, reg, item, b_idx, positions, active, transposed)
        values = values.reshape(-1).astype(jnp.dtype(reg.dtype))
        by_dtype.setdefault(reg.dtype, []).append((*index, values))
    out = dict(arenas)
    for dtype, parts in by_dtype.items():
        rows, cols, vals = (jnp.concatenate(p) for p in zip(*parts, strict=True))
        out[dtype] = quant.set_at(out[dtype], (rows, cols), vals, mode="drop")
    return out


class ArenaKVCache:
    """One (layer, micro-batch) item of the KV cache in the attention arena, behind the cache
    interface the decoder layer uses (`step3_jax.cache`): ``write`` scatters the new tokens in
    place (masked by ``active``: an idle tick or an FFN device writes nothing), ``attend``
    reads the item in place through the paged kernel (the arena viewed as one page per
    sequence, per-operand page offsets; no copy) or, on the XLA path, through views that XLA
    fuses into the attention. ``layer`` arguments are ignored: the item is fixed.
    ``v_transposed``: cache_v items are V^T tiles [Bm, S/64, H, 64]
    (`layout.ArenaDtypes.v_transposed`): every operand is then read as 64-token pages."""

    def __init__(
        self, arenas: dict, regions: dict, item, microbatch: int, active=True, v_transposed=False
    ):
        self.arenas, self.regions, self.item = arenas, regions, item
        self.microbatch, self.active, self.v_transposed = microbatch, active, v_transposed

    def _replace(self, arenas) -> ArenaKVCache:
        return ArenaKVCache(
            arenas, self.regions, self.item, self.microbatch, self.active, self.v_transposed
        )

    def write(self, layer, k_new, v_new, positions) -> ArenaKVCache:
        """The new tokens' K/V (`quant.quantize_kv` per token for an FP8 cache, the format of
        `step3_jax.cache.KVCache.write`)."""
        regs, writes = self.regions, []
        for name, new in (("cache_k", k_new), ("cache_v", v_new)):
            if name + "_scale" in regs:
                new, scale = quant.quantize_kv(new)
                writes.append((regs[name + "_scale"], scale, False))
            writes.append((regs[name], new, name == "cache_v" and self.v_transposed))
        b_idx = jnp.arange(self.microbatch)[:, None]
        arenas = write_rows(self.arenas, writes, self.item, b_idx, positions, self.active)
        return self._replace(arenas)

    def attend(self, layer, q, positions, implementation=None, quantize_out=False):
        """Attention against this item's cache read in place (`step3_jax.cache.attend_cache`,
        also for ``quantize_out``): the decode kernel over the arena as page pools."""
        regs = self.regions
        kernel_api = q.shape[1] <= MAX_T and q.dtype == jnp.bfloat16  # the decode API's inputs
        if implementation == "xla" or (implementation is None and not kernel_api):
            views = [
                view(self.arenas, regs[n], self.item) if n in regs else None for n in CACHE_REGIONS
            ]
            if self.v_transposed:
                views[1] = v_from_tiles(views[1])
            return attend_cache(q, *views, positions, "xla", quantize_out=quantize_out)
        pools, base, stride = [], np.zeros(4, np.int32), np.zeros(4, np.int32)
        for i, name in enumerate(CACHE_REGIONS):
            reg = regs.get(name)
            if reg is None:
                pools.append(None)
                continue
            page = self._page_shape(name, reg)
            nk = int(np.prod(page))  # the region's offset and stride are multiples of it
            pools.append(self.arenas[reg.dtype].reshape(-1, *page))
            base[i], stride[i] = reg.offset // nk, reg.stride // nk
        s_len = regs["cache_k"].shape[1]
        per_seq = s_len // V_TILE if self.v_transposed else 1
        table = jnp.arange(self.microbatch * per_seq, dtype=jnp.int32).reshape(-1, per_seq)
        # One [4] expression of the (traced) item: a stack of four scalars was three small
        # kernels a layer in the attention role's trace.
        page_offsets = base + jnp.asarray(self.item, jnp.int32) * stride
        return attend_cache(
            q, *pools, positions, implementation, self.v_transposed, quantize_out=quantize_out,
            block_table=table, page_offsets=page_offsets,
        )  # fmt: skip

    def _page_shape(self, name: str, reg: Region) -> tuple:
        """One page of ``name`` for the paged kernel API: a whole sequence (token-major V), or
        64 tokens of every operand (V^T tiles: k [64, H], v [H, 64], scales [64])."""
        if not self.v_transposed:
            return reg.shape[1:]
        if name == "cache_v":
            return reg.shape[2:]
        return (V_TILE, *reg.shape[2:])
