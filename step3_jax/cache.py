"""The KV cache: one K head and one V head per layer (Step-3's MFA), stacked over layers.

Layout (all arrays on device, a pytree so it flows through jit/scan/shard_map):

* ``k``, ``v``: ``[L, B, S, H]``, dtype bfloat16 (or float32), or float8_e4m3fn for the FP8
  cache. Row-major: for layer l and sequence b, token s's 256 K values are contiguous, so a
  token costs ``2 * H`` bytes per layer in FP8 (512 B for Step-3) plus its scales.
* ``k_scale``, ``v_scale``: ``[L, B, S]`` float32 per-token scales (FP8 cache only, else
  None); dequantized K = float32(k) * k_scale[..., None] (format in `step3_jax.quant`).
* ``v_transposed`` (static; FP8 only): ``v`` is stored ``[L, B, H, S]``, each value dim's
  tokens contiguous: the layout the decode kernel's FP8 P.V wgmma reads (see
  `step3_jax.kernels.mfa_decode.api`). Same bytes per token; writes scatter one column.
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

import numbers
import os

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from step3_jax import quant
from step3_jax.kernels import dispatch
from step3_jax.kernels.mfa_decode import mfa_decode_attention, supported
from step3_jax.kernels.mfa_decode.api import MAX_T
from step3_jax.layers.mfa import mfa_attention_xla


def attend_cache(q, k, v, k_scale, v_scale, positions, implementation, v_transposed=False, **paged):
    """Attention of the new tokens' queries ``q [B, T, N, H]`` (at ``positions [B, T]``,
    consecutive, ending at ``lengths - 1``) against one layer's cache (already holding them;
    ``v_transposed``: v is [.., H, S], see `KVCache`).

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
            v_transposed=v_transposed, **paged,
        )  # fmt: skip
        return out.astype(q.dtype)
    v = jnp.swapaxes(v, -1, -2) if v_transposed else v
    if k_scale is None:
        kd, vd = k.astype(q.dtype), v.astype(q.dtype)
    else:
        kd, vd = quant.dequantize_kv(k, k_scale, q.dtype), quant.dequantize_kv(v, v_scale, q.dtype)
    return mfa_attention_xla(q, kd, vd, positions, kv_lengths=lengths)


SUPPORTED_DTYPES = ("bfloat16", "float32", "float16", "float8_e4m3fn")


def _check_cache_request(shape: tuple, dtype) -> bool:
    """Validates `KVCache.create` arguments before allocation; returns whether it is FP8.

    The estimate (k + v, plus two float32 scales per token for FP8) must fit the free
    memory of the default device (``memory_stats`` on GPU; ``MemAvailable`` on a CPU host),
    so an absurd request raises instead of aborting the process.
    """
    names = ("num_layers", "batch", "max_len", "head_dim")
    for name, val in zip(names, shape, strict=True):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val <= 0:
            raise ValueError(f"KVCache.create: {name} must be an integer > 0, got {val!r}")
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"KVCache.create: dtype={dtype!r} is not a dtype") from e
    if dt.name not in SUPPORTED_DTYPES:
        raise ValueError(f"KVCache.create: dtype {dt.name} not in {SUPPORTED_DTYPES}")
    fp8 = dt == jnp.dtype(quant.FP8_DTYPE)
    tokens = shape[0] * shape[1] * shape[2]  # python ints: no overflow
    need = 2 * tokens * (shape[3] * dt.itemsize + (4 if fp8 else 0))
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
            f"KVCache.create: a [L, B, S, H] = {list(shape)} {dt.name} cache needs "
            f"{need / 2**30:.3g} GiB, more than the {free / 2**30:.3g} GiB free on "
            f"{device.device_kind}: lower batch or max_len"
        )
    return fp8


def write_kv(cache, index: tuple, k_new, v_new):
    """``cache`` (any pytree with ``k, v``, optional per-token ``k_scale, v_scale`` and a static
    ``v_transposed``) with the new tokens' K/V [B, T, H] stored at ``index`` (e.g. ``(layer, b,
    positions)`` for `KVCache`, ``(layer, page, offset)`` for a paged cache): quantized per
    token (`quant.quantize_kv`) for an FP8 cache, cast to the cache dtype otherwise."""
    # Transposed V: the token index moves behind the value dim; the advanced indices around
    # the slice put [B, T] first, so the update is still [B, T, H].
    v_index = (*index[:-1], slice(None), index[-1]) if cache.v_transposed else index
    if cache.k_scale is not None:
        kq, ks = quant.quantize_kv(k_new)
        vq, vs = quant.quantize_kv(v_new)
        return cache.replace(
            k=cache.k.at[index].set(kq),
            v=cache.v.at[v_index].set(vq),
            k_scale=cache.k_scale.at[index].set(ks),
            v_scale=cache.v_scale.at[index].set(vs),
        )
    return cache.replace(
        k=cache.k.at[index].set(k_new.astype(cache.k.dtype)),
        v=cache.v.at[v_index].set(v_new.astype(cache.v.dtype)),
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
    """``[..., S, H]`` -> ``[..., H, S]``."""
    return (*shape[:-2], shape[-1], shape[-2])


@struct.dataclass
class KVCache:
    k: Array  # [L, B, S, H]
    v: Array  # [L, B, S, H]; [L, B, H, S] if v_transposed
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
        ``v_transposed=True`` (FP8 only) stores V as [L, B, H, S] for the FP8 P.V kernel.

        Validated before anything is allocated: positive integer sizes, a supported dtype
        (`SUPPORTED_DTYPES`) and a size that fits the device's free memory."""
        shape = (num_layers, batch, max_len, head_dim)
        fp8 = _check_cache_request(shape, dtype)
        check_v_transposed(v_transposed, fp8, "KVCache.create")
        scales = jnp.ones(shape[:3], jnp.float32) if fp8 else None
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(transposed_v_shape(shape) if v_transposed else shape, dtype),
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
        return write_kv(self, (layer, b_idx, positions), k_new, v_new)

    def advance(self, positions: Int[Array, "B T"]) -> KVCache:
        """After a forward over ``positions``: each sequence ends at its last position."""
        return self.replace(lengths=positions[:, -1] + 1)

    def attend(
        self,
        layer: int,
        q: Float[Array, "B T N H"],
        positions: Int[Array, "B T"],
        implementation: str | None = None,
    ) -> Float[Array, "B T N H"]:
        """Attention of ``q`` against layer ``layer`` (see `attend_cache`)."""
        return attend_cache(q, *self.layer(layer), positions, implementation, self.v_transposed)

    def layer(self, layer: int) -> tuple[Array, Array, Array | None, Array | None]:
        """``(k [B,S,H], v [B,S,H] (or [B,H,S] if v_transposed), k_scale [B,S] | None,
        v_scale [B,S] | None)``."""
        return layer_arrays(self, layer)

    def dequantized_layer(self, layer: int, dtype) -> tuple[Array, Array]:
        """Layer ``layer``'s K and V as ``[B, S, H]`` of ``dtype`` (V token-major always)."""
        k, v, ks, vs = self.layer(layer)
        v = jnp.swapaxes(v, -1, -2) if self.v_transposed else v
        if ks is None:
            return k.astype(dtype), v.astype(dtype)
        return quant.dequantize_kv(k, ks, dtype), quant.dequantize_kv(v, vs, dtype)


__all__ = ["SUPPORTED_DTYPES", "KVCache", "check_v_transposed", "transposed_v_shape"]
