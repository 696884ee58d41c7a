"""The KV cache: one K head and one V head per layer (Step-3's MFA), stacked over layers.

Layout (all arrays on device, a pytree so it flows through jit/scan/shard_map):

* ``k``, ``v``: ``[L, B, S, H]``, dtype bfloat16 (or float32), or float8_e4m3fn for the FP8
  cache. Row-major: for layer l and sequence b, token s's 256 K values are contiguous, so a
  token costs ``2 * H`` bytes per layer in FP8 (512 B for Step-3) plus its scales.
* ``k_scale``, ``v_scale``: ``[L, B, S]`` float32 per-token scales (FP8 cache only, else
  None); dequantized K = float32(k) * k_scale[..., None] (format in `step3_jax.quant`).
* ``v_transposed`` (static; FP8 only): ``v`` is stored as V^T tiles ``[L, B, S / 64, H, 64]``:
  per 64 tokens, each value dim's 64 tokens contiguous, i.e. one contiguous 16 KiB block per
  64 tokens, which is what the decode kernel's FP8 P.V wgmma reads as one TMA box (see
  `step3_jax.kernels.mfa_decode.api`; the cache is handed to the kernel as 64-token pages).
  Same bytes per token; a write scatters one column of a tile. S must be a multiple of 64.
* ``lengths``: ``[B]`` int32, the number of valid tokens of each sequence. Slots at or past a
  sequence's length hold stale data and are never read by attention.

Writes are scatters at explicit positions into the stacked buffers, which XLA performs in place
when the cache is donated.

The cache interface the decoder layer uses (`step3_jax.model.DecoderLayer.attention_half`) is
two methods: ``write(layer, k, v, positions) -> cache`` and ``attend(layer, q, positions,
implementation) -> o``. Other caches implement the same two (the AFD arena cache in
`step3_jax.sharding.arena_io`), so every executor runs the same layer code.
"""

from __future__ import annotations

import math
import numbers
import os

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from step3_jax import quant
from step3_jax.config import check_sizes
from step3_jax.kernels import dispatch
from step3_jax.kernels.mfa_decode import mfa_decode_attention, supported
from step3_jax.kernels.mfa_decode.api import MAX_T
from step3_jax.layers.mfa import mfa_attention_xla


def attend_cache(
    q, k, v, k_scale, v_scale, positions, implementation, v_transposed=False,
    quantize_out=False, **paged,
):  # fmt: skip
    """Attention of the new tokens' queries ``q [B, T, N, H]`` (at ``positions [B, T]``,
    consecutive, ending at ``lengths - 1``) against one layer's cache (already holding them;
    ``v_transposed``: v is [.., H, S], see `KVCache`). ``quantize_out``: the output as an
    o_proj's FP8 input (`quant.QuantizedActivations`, per head per 128 columns; the kernel's
    epilogue writes it where it can, `KernelPolicy.o_quant`).

    The Pallas decode kernel (`step3_jax.kernels.mfa_decode`) where the kernels' dispatch rule
    picks it for ``implementation`` ("pallas" | "xla" | None) and T <= 8; otherwise the XLA
    path over the dequantized cache (a paged cache through the kernel API's XLA gather).
    ``paged``: ``block_table`` / ``page_offsets`` of a paged layout."""
    lengths = positions[:, -1] + 1
    reason = supported(q, k) if q.shape[1] <= MAX_T else f"T={q.shape[1]} > {MAX_T}"
    impl = "xla" if implementation == "xla" and not paged else implementation
    if paged or dispatch.choose("mfa_decode_attention", impl, reason) == "pallas":
        out = mfa_decode_attention(
            q, k, v, lengths, k_scale=k_scale, v_scale=v_scale, implementation=impl,
            v_transposed=v_transposed, quantize_out=quantize_out, **paged,
        )  # fmt: skip
        return out.astype(q.dtype)  # (`QuantizedActivations.astype`: the dtype it stands for)
    v = jnp.swapaxes(v, -1, -2) if v_transposed else v
    if k_scale is None:
        kd, vd = k.astype(q.dtype), v.astype(q.dtype)
    else:
        kd, vd = quant.dequantize_kv(k, k_scale, q.dtype), quant.dequantize_kv(v, v_scale, q.dtype)
    out = mfa_attention_xla(q, kd, vd, positions, kv_lengths=lengths)
    return quant.QuantizedActivations.quantize(out) if quantize_out else out


SUPPORTED_DTYPES = ("bfloat16", "float32", "float16", "float8_e4m3fn")


def check_cache_request(where: str, layout: str, shape: tuple, dtype) -> bool:
    """Validates a cache allocation of K and V, each ``shape`` (``layout`` names its axes, the
    last is the head dim), before it is made; returns whether it is FP8. Serves `KVCache`
    and the engine's `PagedKVCache`.

    The dtype must be one of `SUPPORTED_DTYPES`, and the estimate (k + v, plus two float32
    scales per token for FP8) must fit the free memory of the default device
    (``memory_stats`` on GPU; ``MemAvailable`` on a CPU host), so an absurd request raises
    instead of aborting the process.
    """
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{where}: dtype={dtype!r} is not a dtype") from e
    if dt.name not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: dtype {dt.name} not in {SUPPORTED_DTYPES}")
    fp8 = dt == jnp.dtype(quant.FP8_DTYPE)
    tokens = math.prod(int(n) for n in shape[:-1])  # python ints: no overflow
    need = 2 * tokens * (int(shape[-1]) * dt.itemsize + (4 if fp8 else 0))
    device = jax.local_devices()[0]  # addressable (multi-process runs see remote devices too)
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable"))
        except (OSError, StopIteration):
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > free:
        raise ValueError(
            f"{where}: a {layout} = {[int(n) for n in shape]} {dt.name} cache needs "
            f"{need / 2**30:.3g} GiB, more than the {free / 2**30:.3g} GiB free on "
            f"{device.device_kind}: lower its sizes"
        )
    return fp8


V_TILE = 64  # tokens per V^T tile of a transposed contiguous cache (the kernel's block_s)


def write_kv(cache, index: tuple, k_new, v_new, v_index: tuple | None = None):
    """``cache`` (any pytree with ``k, v`` and optional per-token ``k_scale, v_scale``) with
    the new tokens' K/V [B, T, H] stored at ``index`` (e.g. ``(layer, b, positions)`` for
    `KVCache`, ``(layer, page, offset)`` for a paged cache) and V at ``v_index`` (default
    ``index``; a transposed layout puts the token index behind a ``slice(None)`` over the
    value dim: the advanced indices around it put [B, T] first, so the update is still
    [B, T, H]): quantized per token (`quant.quantize_kv`) for an FP8 cache, cast to the
    cache dtype otherwise."""
    v_index = index if v_index is None else v_index
    if cache.k_scale is not None:
        kq, ks = quant.quantize_kv(k_new)
        vq, vs = quant.quantize_kv(v_new)
        return cache.replace(
            k=quant.set_at(cache.k, index, kq),
            v=quant.set_at(cache.v, v_index, vq),
            k_scale=cache.k_scale.at[index].set(ks),
            v_scale=cache.v_scale.at[index].set(vs),
        )
    return cache.replace(
        k=quant.set_at(cache.k, index, k_new), v=quant.set_at(cache.v, v_index, v_new)
    )


def layer_arrays(cache, layer) -> tuple[Array, Array, Array | None, Array | None]:
    """``(k, v, k_scale | None, v_scale | None)`` of one layer of a layer-stacked cache."""
    ks = None if cache.k_scale is None else cache.k_scale[layer]
    vs = None if cache.v_scale is None else cache.v_scale[layer]
    return cache.k[layer], cache.v[layer], ks, vs


def check_v_transposed(v_transposed, fp8: bool, where: str) -> bool:
    """The transposed V layout exists for the FP8 P.V kernel only."""
    if not isinstance(v_transposed, bool):
        raise ValueError(f"{where}: v_transposed must be a bool, got {v_transposed!r}")
    if v_transposed and not fp8:
        raise ValueError(f"{where}: v_transposed=True needs an FP8 (float8_e4m3fn) cache")
    return v_transposed


def transposed_v_shape(shape: tuple) -> tuple:
    """``[..., S, H]`` -> ``[..., H, S]`` (a transposed page)."""
    return (*shape[:-2], shape[-1], shape[-2])


def v_tiles_shape(shape: tuple) -> tuple:
    """``[..., S, H]`` -> V^T tiles ``[..., S / 64, H, 64]`` (``S`` a multiple of 64)."""
    *lead, s, h = shape
    return (*lead, s // V_TILE, h, V_TILE)


def v_from_tiles(v: Array) -> Array:
    """V^T tiles ``[..., S / 64, H, 64]`` -> token-major ``[..., S, H]``."""
    *lead, n, h, t = v.shape
    return jnp.swapaxes(v, -1, -2).reshape(*lead, n * t, h)


def tiles_as_pages(k, v, k_scale, v_scale) -> tuple:
    """One layer of a transposed contiguous cache (k [B, S, H], V^T tiles [B, S/64, H, 64],
    scales [B, S]) as 64-token pages for the paged kernel API: ``(k [B*S/64, 64, H], v
    [B*S/64, H, 64], k_scale, v_scale [B*S/64, 64], block_table [B, S/64])``. Reshapes only:
    page j of sequence b is tile j of b, in place."""
    b, s, h = k.shape
    n = s // V_TILE
    pages = lambda x: None if x is None else x.reshape(b * n, V_TILE, *x.shape[2:])
    table = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
    return pages(k), v.reshape(b * n, h, V_TILE), pages(k_scale), pages(v_scale), table


@struct.dataclass
class KVCache:
    k: Array  # [L, B, S, H]
    v: Array  # [L, B, S, H]; V^T tiles [L, B, S / 64, H, 64] if v_transposed
    lengths: Int[Array, " B"]
    k_scale: Float[Array, "L B S"] | None = None
    v_scale: Float[Array, "L B S"] | None = None
    v_transposed: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        max_len: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        v_transposed: bool = False,
    ) -> KVCache:
        """An empty cache (zeros, lengths 0). ``dtype=jnp.float8_e4m3fn`` makes an FP8 cache;
        ``v_transposed=True`` (FP8 only, ``max_len`` a multiple of 64) stores V as V^T tiles
        for the FP8 P.V kernel (module docstring).

        Validated before anything is allocated: positive integer sizes, a supported dtype
        (`SUPPORTED_DTYPES`) and a size that fits the device's free memory."""
        sizes = dict(num_layers=num_layers, batch=batch, max_len=max_len, head_dim=head_dim)
        check_sizes("KVCache.create", **sizes)
        shape = (num_layers, batch, max_len, head_dim)
        fp8 = check_cache_request("KVCache.create", "[L, B, S, H]", shape, dtype)
        check_v_transposed(v_transposed, fp8, "KVCache.create")
        if v_transposed and max_len % V_TILE:
            raise ValueError(
                f"KVCache.create: v_transposed=True stores V in {V_TILE}-token tiles: max_len "
                f"must be a multiple of {V_TILE}, got {max_len}"
            )
        scales = jnp.ones(shape[:3], jnp.float32) if fp8 else None
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(v_tiles_shape(shape) if v_transposed else shape, dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            k_scale=scales,
            v_scale=None if scales is None else jnp.ones(shape[:3], jnp.float32),
            v_transposed=v_transposed,
        )

    @classmethod
    def for_config(
        cls, config, batch: int, max_len: int, dtype=jnp.bfloat16, v_transposed: bool = False
    ) -> KVCache:
        if isinstance(max_len, numbers.Integral) and max_len > config.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len} exceeds max_position_embeddings="
                f"{config.max_position_embeddings}"
            )
        return cls.create(config.num_layers, batch, max_len, config.head_dim, dtype, v_transposed)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def is_fp8(self) -> bool:
        return self.k_scale is not None

    def nbytes(self) -> int:
        total = self.k.nbytes + self.v.nbytes
        if self.is_fp8:
            total += self.k_scale.nbytes + self.v_scale.nbytes
        return int(total)

    def write(
        self,
        layer: int,
        k_new: Float[Array, "B T H"],
        v_new: Float[Array, "B T H"],
        positions: Int[Array, "B T"],
    ) -> KVCache:
        """Stores token t of sequence b at slot ``positions[b, t]`` of ``layer``.

        Out-of-range positions are the caller's error: `generate` and `decode_step` check them
        before tracing, because a scatter would silently drop them.
        """
        b_idx = jnp.arange(k_new.shape[0])[:, None]
        v_index = None
        if self.v_transposed:  # tile pos // 64, column pos % 64 of every value dim
            v_index = (layer, b_idx, positions // V_TILE, slice(None), positions % V_TILE)
        return write_kv(self, (layer, b_idx, positions), k_new, v_new, v_index)

    def advance(self, positions: Int[Array, "B T"]) -> KVCache:
        """After a forward over ``positions``: each sequence ends at its last position."""
        return self.replace(lengths=positions[:, -1] + 1)

    def attend(
        self,
        layer: int,
        q: Float[Array, "B T N H"],
        positions: Int[Array, "B T"],
        implementation: str | None = None,
        quantize_out: bool = False,
    ) -> Float[Array, "B T N H"] | quant.QuantizedActivations:
        """Attention of ``q`` against layer ``layer`` (see `attend_cache`, also for
        ``quantize_out``). A transposed cache goes to the decode kernel API as 64-token pages
        (`tiles_as_pages`); beyond the API's reach (T > 8, a non-bf16 q) to the XLA path on the
        token-major view."""
        k, v, ks, vs = self.layer(layer)
        kw = dict(quantize_out=quantize_out)
        if not self.v_transposed:
            return attend_cache(q, k, v, ks, vs, positions, implementation, **kw)
        if q.shape[1] <= MAX_T and q.dtype == jnp.bfloat16:
            *pages, table = tiles_as_pages(k, v, ks, vs)
            return attend_cache(q, *pages, positions, implementation, True, block_table=table, **kw)
        return attend_cache(q, k, v_from_tiles(v), ks, vs, positions, "xla", **kw)

    def layer(self, layer: int) -> tuple[Array, Array, Array | None, Array | None]:
        """``(k [B,S,H], v [B,S,H] (V^T tiles [B,S/64,H,64] if v_transposed), k_scale [B,S] |
        None, v_scale [B,S] | None)``."""
        return layer_arrays(self, layer)

    def dequantized_layer(self, layer: int, dtype) -> tuple[Array, Array]:
        """Layer ``layer``'s K and V as ``[B, S, H]`` of ``dtype`` (V token-major always)."""
        k, v, ks, vs = self.layer(layer)
        v = v_from_tiles(v) if self.v_transposed else v
        if ks is None:
            return k.astype(dtype), v.astype(dtype)
        return quant.dequantize_kv(k, ks, dtype), quant.dequantize_kv(v, vs, dtype)


__all__ = [
    "SUPPORTED_DTYPES",
    "V_TILE",
    "KVCache",
    "check_cache_request",
    "check_v_transposed",
    "tiles_as_pages",
    "transposed_v_shape",
    "v_from_tiles",
    "v_tiles_shape",
]
