"""Paged KV cache: per-layer page pools shared by all sequences, block tables, host allocation.

Layout (a pytree, so it flows through jit with the pools donated):

* ``k``, ``v``: ``[L, P, page_size, H]`` page pools, bfloat16/float32, or float8_e4m3fn with
  ``k_scale``, ``v_scale`` ``[L, P, page_size]`` float32 per-token scales (the byte layout of
  `step3_jax.quant.quantize_kv`, the same as `step3_jax.cache.KVCache`).
* ``block_table``: ``[B, max_pages]`` int32; token s of sequence b lives in page
  ``block_table[b, s // page_size]`` at offset ``s % page_size``.
* ``lengths``: ``[B]`` int32 valid tokens per sequence.

Page 0 is the *null page*: never handed out by `PageAllocator`, it is where every entry of a
block table without a page points. Writes of idle batch rows, of padding tokens past a
sequence's pages, or past ``max_pages`` land there (out-of-range table reads are filled with
0), so a write can never reach another sequence's page, and attention never reads it for a
valid token (the gather path also zeroes it, so even a NaN there cannot leak).

Attention: the MFA decode kernel API reads the pools in place through the block table
(`step3_jax.kernels.mfa_decode`: Pallas on Hopper, its XLA gather elsewhere) when it applies
(T <= 8 new tokens, bfloat16 q, bf16/FP8 pools); otherwise (prefill chunks, float32 models) the
sequence's pages are gathered into a contiguous ``[B, max_pages * page_size, H]`` view and the
contiguous path of `step3_jax.cache.attend_cache` runs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from step3_jax import quant
from step3_jax.cache import (
    attend_cache,
    check_cache_request,
    check_v_transposed,
    layer_arrays,
    transposed_v_shape,
    write_kv,
)
from step3_jax.config import check_sizes
from step3_jax.kernels.mfa_decode.api import MAX_T

NULL_PAGE = 0
_KERNEL_KV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(quant.FP8_DTYPE))


class PoolExhausted(RuntimeError):
    """Not enough free pages for a request right now (it may fit once others finish)."""


class PageAllocator:
    """Host-side free list over pages ``1 .. num_pages - 1`` (page 0 is the null page).

    ``allocate(n)`` either returns ``n`` distinct pages or raises `PoolExhausted` having taken
    nothing; ``free`` returns pages and rejects double frees, so no page is ever owned twice.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = int(num_pages)
        self._free = list(range(self.num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._owned = np.zeros(self.num_pages, bool)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > len(self._free):
            raise PoolExhausted(f"need {n} pages, {len(self._free)} of {self.capacity} free")
        pages = [self._free.pop() for _ in range(n)]
        self._owned[pages] = True
        return pages

    def free(self, pages) -> None:
        for p in pages:
            if not 0 < p < self.num_pages or not self._owned[p]:
                raise ValueError(f"free: page {p} is not allocated")
            self._owned[p] = False
            self._free.append(p)


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-int(num_tokens) // page_size)


@struct.dataclass
class PagedKVCache:
    k: Array  # [L, P, page, H]
    v: Array  # [L, P, page, H]; [L, P, H, page] if v_transposed (`step3_jax.cache.KVCache`)
    block_table: Int[Array, "B M"]
    lengths: Int[Array, " B"]
    k_scale: Float[Array, "L P page"] | None = None
    v_scale: Float[Array, "L P page"] | None = None
    v_transposed: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        num_pages: int,
        page_size: int,
        max_pages: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        v_transposed: bool = False,
    ) -> PagedKVCache:
        """Zeroed pools, null block tables, lengths 0; ``dtype=float8_e4m3fn``: FP8 pools;
        ``v_transposed=True`` (FP8 only): V pages [H, page] for the FP8 P.V kernel."""
        where = "PagedKVCache.create"
        check_sizes(
            where,
            num_layers=num_layers,
            batch=batch,
            num_pages=num_pages,
            page_size=page_size,
            max_pages=max_pages,
            head_dim=head_dim,
        )
        if num_pages < 2:
            raise ValueError(f"{where}: num_pages must be >= 2, got {num_pages}")
        shape = (num_layers, num_pages, page_size, head_dim)
        fp8 = check_cache_request(where, "[L, P, page, H]", shape, dtype)
        check_v_transposed(v_transposed, fp8, "PagedKVCache.create")
        scale = (lambda: jnp.ones(shape[:3], jnp.float32)) if fp8 else (lambda: None)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(transposed_v_shape(shape) if v_transposed else shape, dtype),
            block_table=jnp.zeros((batch, max_pages), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            k_scale=scale(),
            v_scale=scale(),
            v_transposed=v_transposed,
        )

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        """Tokens one sequence can hold (its block table's width in tokens)."""
        return self.block_table.shape[1] * self.page_size

    @property
    def is_fp8(self) -> bool:
        return self.k_scale is not None

    def nbytes(self) -> int:
        leaves = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.is_fp8 else [])
        return int(sum(a.nbytes for a in leaves))

    def advance(self, positions: Int[Array, "B T"]) -> PagedKVCache:
        """After a forward over ``positions``: each sequence ends at its last position."""
        return self.replace(lengths=positions[:, -1] + 1)

    def _slots(self, positions):
        """``(page [B, T], offset [B, T])`` of each position; past the table: the null page."""
        col = positions // self.page_size
        page = jnp.take_along_axis(self.block_table, col, axis=1, mode="fill", fill_value=0)
        page = jnp.where((positions >= 0) & (col < self.block_table.shape[1]), page, NULL_PAGE)
        return page, positions % self.page_size

    def write(
        self,
        layer: int,
        k_new: Float[Array, "B T H"],
        v_new: Float[Array, "B T H"],
        positions: Int[Array, "B T"],
    ) -> PagedKVCache:
        """Stores token t of sequence b at ``positions[b, t]`` (through its block table)."""
        page, off = self._slots(positions)
        v_index = (layer, page, slice(None), off) if self.v_transposed else None
        return write_kv(self, (layer, page, off), k_new, v_new, v_index)

    def attend(
        self,
        layer: int,
        q: Float[Array, "B T N H"],
        positions: Int[Array, "B T"],
        implementation: str | None = None,
        quantize_out: bool = False,
    ) -> Float[Array, "B T N H"] | quant.QuantizedActivations:
        """Attention of ``q`` (at ``positions``, consecutive, the cache already holding them)
        against this layer's pages (see the module docstring for which path runs;
        ``quantize_out``: `step3_jax.cache.attend_cache`)."""
        kernel_api = (
            q.shape[1] <= MAX_T
            and q.dtype == jnp.bfloat16
            and jnp.dtype(self.k.dtype) in _KERNEL_KV_DTYPES
        )
        if kernel_api:
            return attend_cache(
                q, *layer_arrays(self, layer), positions, implementation, self.v_transposed,
                quantize_out=quantize_out, block_table=self.block_table,
            )  # fmt: skip
        return attend_cache(q, *self.gathered(layer), positions, "xla", quantize_out=quantize_out)

    def gathered(self, layer: int) -> tuple[Array, Array, Array | None, Array | None]:
        """Layer ``layer`` as a contiguous, token-major cache ``(k, v [B, M * page, H],
        k_scale, v_scale [B, M * page] | None)``; null-page slots zeroed (scales 0) so they
        hold no NaN."""
        b, m = self.block_table.shape
        real = jnp.repeat(self.block_table != NULL_PAGE, self.page_size, axis=1)  # [B, S]

        def gather(pool):
            out = pool[layer][self.block_table].reshape(b, m * self.page_size, *pool.shape[3:])
            mask = real if out.ndim == 2 else real[..., None]
            return jnp.where(mask, out, jnp.zeros((), out.dtype))

        ks = None if self.k_scale is None else gather(self.k_scale)
        vs = None if self.v_scale is None else gather(self.v_scale)
        v = jnp.swapaxes(self.v, -1, -2) if self.v_transposed else self.v  # token-major pages
        return gather(self.k), gather(v), ks, vs


__all__ = ["NULL_PAGE", "PageAllocator", "PagedKVCache", "PoolExhausted", "pages_for"]
