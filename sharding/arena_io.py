"""Reading and writing tensors in the per-device role arenas (layout: `step3_jax.sharding.layout`).

Inside the compiled AFD step each device holds its arenas ``{dtype: [rows, ALIGN]}``. Plain
tensors are read as views (`view`: one dynamic slice of whole rows + reshape; XLA copies it
when a custom call consumes it); *pooled* regions (routed experts, KV-cache pages) are handed
to the kernels in place (`pool`: the whole arena as matrices + the item's first matrix); the KV
cache is written by one masked scatter (`write_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from step3_jax.quant_model import Fp8Weight
from step3_jax.sharding import protocol
from step3_jax.sharding.layout import ALIGN, Region

_NUM_CONTRACT = {"o_proj": 2}  # contracted trailing dims of each weight (default 1)


def view(arenas: dict, reg: Region, item) -> jax.Array:
    """Item ``item`` of ``reg``: whole arena rows, cut to the item's size and shape."""
    rows = reg.stride // ALIGN
    start = reg.offset // ALIGN + item * rows
    flat = lax.dynamic_slice(arenas[reg.dtype], (start, 0), (rows, ALIGN)).reshape(-1)
    if reg.stride != reg.size:
        flat = flat[: reg.size]
    return flat.reshape(reg.shape)


def pool(arenas: dict, reg: Region, item, scale) -> protocol.ExpertPool:
    """Item ``item`` of a pool-aligned region, in place: the arena as ``[P, N, K]`` matrices
    (a bitcast: no copy) and the item's first matrix (computed in matrices, so int32 is
    enough however large the arena)."""
    nk = reg.pool_matrix
    matrices = arenas[reg.dtype].reshape(-1, *reg.shape[1:])
    first = reg.offset // nk + item * (reg.stride // nk)
    return protocol.ExpertPool(matrices, jnp.asarray(first, jnp.int32), scale, reg.shape[0])


def params(arenas: dict, regions: dict, names, item, in_place: bool = False) -> dict:
    """Views of ``names`` at ``item``; FP8 values with ``<name>_scale`` become `Fp8Weight`.
    With ``in_place``, pool-aligned regions (the routed experts) become `ExpertPool`s."""
    out = {}
    for name in names:
        reg = regions[name]
        if in_place and reg.pool_matrix is not None:
            s_reg = regions.get(name + "_scale")
            scale = None if s_reg is None else view(arenas, s_reg, item)
            out[name] = pool(arenas, reg, item, scale)
            continue
        v = view(arenas, reg, item)
        if name + "_scale" in regions:
            v = Fp8Weight(
                v,
                view(arenas, regions[name + "_scale"], item),
                num_contract=_NUM_CONTRACT.get(name, 1),
            )
        out[name] = v
    return out


def write_rows(arenas, reg: Region, item, b_idx, positions, values, active):
    """Scatter ``values [Bm, T, *row]`` into item ``item`` of ``reg`` (shape [Bm, S, *row])
    at slots ``positions [Bm, T]``: a flat in-place scatter into the (donated) arena. When
    ``active`` is False (FFN devices, idle ticks) every index is out of range and dropped."""
    row = int(np.prod(reg.shape[2:]))
    local = ((b_idx * reg.shape[1] + positions) * row)[..., None] + jnp.arange(row)  # int32
    rows = reg.offset // ALIGN + item * (reg.stride // ALIGN) + local // ALIGN
    rows = jnp.where(active, rows, arenas[reg.dtype].shape[0])  # out of range: dropped
    vals = values.reshape(-1).astype(reg.dtype)
    flat = (
        arenas[reg.dtype].at[rows.reshape(-1), (local % ALIGN).reshape(-1)].set(vals, mode="drop")
    )
    return {**arenas, reg.dtype: flat}
