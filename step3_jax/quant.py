"""FP8 (float8_e4m3fn) formats used across step3_jax: one place, byte-exact layouts.

Every FP8 tensor in this project is a pair (values, scales) with

    dequantized = float32(values) * scale          (scale broadcast over its block)

Formats (all scales float32, never zero: a block whose amax is below 448e-12, including an
all-zero block, gets scale 1e-12, so ``x / scale`` stays finite and zeros stay exactly zero):

* **Weights, 128x128 block scales** (`quantize_weight_blocks`), the layout of the released
  block-FP8 Step-3 checkpoint. Weights are stored ``[..., N_out, K_in]`` (contraction axis
  last, "K-major"), which Hopper FP8 tensor cores need for both operands.
  ``values``: ``[..., N, K]`` float8_e4m3fn, row-major, 1 byte per value.
  ``scales``: ``[..., ceil(N/128), ceil(K/128)]`` float32; ``scales[..., i, j]`` covers rows
  ``128*i : 128*(i+1)`` and columns ``128*j : 128*(j+1)`` (the checkpoint's ``weight_scale_inv``).
* **Weights, per output channel** (`quantize_weight_channels`): ``scales`` ``[..., N, 1]``.
* **Activations, dynamic per-token scales per 128-wide group** (`quantize_activations`):
  ``values`` ``[..., K]``, ``scales`` ``[..., ceil(K/128)]``; ``scales[..., g]`` covers
  ``values[..., 128*g : 128*(g+1)]``.
* **KV cache, per-token scales** (`quantize_kv`): for K (and separately V) of shape
  ``[..., S, H]``: ``values`` ``[..., S, H]`` float8_e4m3fn and ``scales`` ``[..., S]``; one
  float32 per cached token per tensor, so a Step-3 token costs 256 + 256 value bytes plus 8
  scale bytes per layer.

Rounding: values are ``clip(x / scale, -448, 448)`` cast to e4m3 with round-to-nearest-even;
the clip matters because casting an out-of-range float to float8_e4m3fn gives NaN (the format
has no infinity). ``scale = max(amax * float32(1/448), 1e-12)`` in float32, so the block's
largest magnitude maps to 448 (written as a multiply because XLA rewrites a division by a
constant into one: spelling it out keeps NumPy emulations bit-exact). Round-trip error per
value: ``|x - dequant(x)| <= 2**-4 |x| + 2**-10 scale`` (3 mantissa bits in the normal range,
subnormal spacing 2**-9 below 2**-6; tests/quant/test_quant_formats.py derives and checks it).

NaN/inf policy: a NaN or +-inf input poisons its own block: the block's scale becomes inf and
every value of the block dequantizes to NaN (0 * inf, or the NaN itself), so corrupted
activations are never silently hidden. Other blocks are unaffected. (`_amax` reads a NaN as
inf inside ONE max reduction: a separate "any NaN" reduction cost one more small kernel per
quantization on the GPU, and XLA:CPU's multi-axis reduce-max can drop a NaN.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from step3_jax.config import is_int

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Smallest scale we ever emit: keeps `x / scale` finite for all-zero blocks.
MIN_SCALE = 1e-12  # the scale of a block whose amax is below 448e-12 (all zeros included)
BLOCK = 128


# Below 2**-6, e4m3fn is subnormal: a fixed spacing of 2**-9.
_E4M3_MIN_NORMAL = 2.0**-6
_E4M3_SUBNORMAL_STEP = 2.0**-9


def round_to_e4m3_grid(x: Array) -> Array:
    """float32 ``x`` rounded to the nearest float8_e4m3fn value (ties to even), still float32.

    Normal range: ``lax.reduce_precision`` to 3 mantissa bits (5 exponent bits so nothing
    overflows or goes subnormal early); subnormals: ties-to-even at the fixed 2**-9 spacing.
    Why not just ``astype``: XLA:GPU may convert float32 to e4m3 through a 16-bit intermediate
    (double rounding), which changes a value near a rounding midpoint; a value already on the
    e4m3 grid converts exactly on every backend, so CPU and GPU give the same bytes.
    """
    x = x.astype(jnp.float32)
    normal = lax.reduce_precision(x, exponent_bits=5, mantissa_bits=3)
    sub = jnp.round(x * (1.0 / _E4M3_SUBNORMAL_STEP)) * _E4M3_SUBNORMAL_STEP
    return jnp.where(jnp.abs(x) < _E4M3_MIN_NORMAL, sub, normal)


def _cast_fp8(x_scaled: Array) -> Array:
    clipped = jnp.clip(x_scaled.astype(jnp.float32), -FP8_MAX, FP8_MAX)
    return round_to_e4m3_grid(clipped).astype(FP8_DTYPE)


_INV_FP8_MAX = np.float32(1.0 / FP8_MAX)


def _amax(x: Array, axis) -> Array:
    """float32 max |x| over ``axis``; inf if any input of the block is NaN or inf (module doc)."""
    xf = jnp.abs(x.astype(jnp.float32))
    return jnp.max(jnp.where(jnp.isnan(xf), jnp.inf, xf), axis=axis)


def _scale_from_amax(amax: Array) -> Array:
    return jnp.maximum(amax.astype(jnp.float32) * _INV_FP8_MAX, MIN_SCALE)


def _check_size(name: str, value) -> int:
    """A block/group size: a positive Python (or NumPy) int, static."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_input(x, axes: str) -> None:
    """``x`` to quantize: at least ``len(axes.split())`` axes, a real (float or int) dtype."""
    if x.ndim < len(axes.split()):
        raise ValueError(f"x must be [..., {axes}] (at least {axes!r}), got shape {x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"x must be a real (float or int) array to quantize, got {x.dtype}")


def _check_scale_shape(scale, want: tuple, values, layout: str) -> None:
    """Dequantization: ``scale`` must have exactly the format's shape (a wrong one would
    broadcast into garbage or fail deep inside jnp)."""
    if tuple(scale.shape) != tuple(want):
        raise ValueError(
            f"scale must be {layout} = {tuple(want)} for values {tuple(values.shape)}, got "
            f"{tuple(scale.shape)}"
        )


def quantize_activations(
    x: Float[Array, "... K"], group: int = BLOCK
) -> tuple[Array, Float[Array, "... G"]]:
    """Per-token, per-``group``-wide dynamic FP8 quantization of activations.

    Returns ``(values [..., K] e4m3, scales [..., ceil(K/group)] f32)``.
    """
    group = _check_size("group", group)
    _check_input(x, "K")
    k = x.shape[-1]
    g = -(-k // group)
    pad = g * group - k
    xf = x.astype(jnp.float32)
    xp = jnp.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else xf
    xg = xp.reshape(*x.shape[:-1], g, group)
    scale = _scale_from_amax(_amax(xg, -1))
    q = _cast_fp8(xg / scale[..., None]).reshape(*x.shape[:-1], g * group)[..., :k]
    return q, scale


def dequantize_activations(
    q: Array, scale: Float[Array, "... G"], group: int = BLOCK, dtype=jnp.float32
) -> Array:
    group = _check_size("group", group)
    k = q.shape[-1]
    _check_scale_shape(scale, (*q.shape[:-1], -(-k // group)), q, "[..., ceil(K/group)]")
    s = jnp.repeat(scale, group, axis=-1)[..., :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["dtype"]
)
@dataclasses.dataclass(frozen=True)
class QuantizedActivations:
    """Activations already in the `quantize_activations` format: ``values [..., K]`` e4m3,
    ``scales [..., ceil(K/128)]`` float32, standing for a ``dtype`` activation (what the AFD
    packet carries to the FFN side). An FP8 GEMM reads them as they are, with no second
    quantization; everything else reads `dequantize`. Reshapes keep the last axis."""

    values: Array
    scales: Array
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    def reshape(self, *shape) -> QuantizedActivations:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        k = self.values.shape[-1]
        if shape[-1] not in (k, -1):
            raise ValueError(f"QuantizedActivations.reshape keeps the last axis ({k}), got {shape}")
        lead = shape[:-1]
        return QuantizedActivations(
            self.values.reshape(*lead, k), self.scales.reshape(*lead, self.scales.shape[-1]),
            self.dtype,
        )  # fmt: skip

    @classmethod
    def quantize(cls, x: Float[Array, "... K"]) -> QuantizedActivations:
        """``x`` in this format (`quantize_activations`), standing for its own dtype."""
        return cls(*quantize_activations(x), jnp.dtype(x.dtype))

    def astype(self, dtype) -> QuantizedActivations:
        """The same bytes standing for a ``dtype`` activation (what `dequantize` returns)."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def dequantize(self) -> Array:
        return dequantize_activations(self.values, self.scales, dtype=self.dtype)


def quantize_weight_blocks(
    w: Float[Array, "... N K"], block: int = BLOCK
) -> tuple[Array, Float[Array, "... NB KB"]]:
    """128x128 block FP8 quantization of a ``[..., N, K]`` (K-major) weight."""
    block = _check_size("block", block)
    _check_input(w, "N K")
    n, k = w.shape[-2:]
    nb, kb = -(-n // block), -(-k // block)
    wf = w.astype(jnp.float32)
    pads = [(0, 0)] * (w.ndim - 2) + [(0, nb * block - n), (0, kb * block - k)]
    wp = jnp.pad(wf, pads)
    wb = wp.reshape(*w.shape[:-2], nb, block, kb, block)
    scale = _scale_from_amax(_amax(wb, (-3, -1)))  # [..., nb, kb]
    q = _cast_fp8(wb / scale[..., :, None, :, None])
    q = q.reshape(*w.shape[:-2], nb * block, kb * block)[..., :n, :k]
    return q, scale


def dequantize_weight_blocks(
    q: Array, scale: Float[Array, "... NB KB"], block: int = BLOCK, dtype=jnp.float32
) -> Array:
    block = _check_size("block", block)
    n, k = q.shape[-2:]
    want = (*q.shape[:-2], -(-n // block), -(-k // block))
    _check_scale_shape(scale, want, q, "[..., ceil(N/block), ceil(K/block)]")
    s = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)[..., :n, :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


def quantize_weight_channels(w: Float[Array, "... N K"]) -> tuple[Array, Float[Array, "... N 1"]]:
    """Per-output-channel FP8 quantization of a ``[..., N, K]`` weight."""
    _check_input(w, "N K")
    scale = _scale_from_amax(_amax(w, -1)[..., None])
    return _cast_fp8(w.astype(jnp.float32) / scale), scale


def dequantize_weight_channels(q: Array, scale: Array, dtype=jnp.float32) -> Array:
    _check_scale_shape(scale, (*q.shape[:-1], 1), q, "[..., N, 1]")
    return (q.astype(jnp.float32) * scale).astype(dtype)


def quantize_kv(x: Float[Array, "... S H"]) -> tuple[Array, Float[Array, "... S"]]:
    """Per-token FP8 quantization of K or V: ``(values [..., S, H] e4m3, scales [..., S])``."""
    _check_input(x, "H")
    scale = _scale_from_amax(_amax(x, -1))
    return _cast_fp8(x.astype(jnp.float32) / scale[..., None]), scale


def dequantize_kv(q: Array, scale: Float[Array, "... S"], dtype=jnp.float32) -> Array:
    _check_scale_shape(scale, q.shape[:-1], q, "[..., S] (values [..., S, H])")
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


_SAME_WIDTH_UINT = {1: jnp.uint8, 2: jnp.uint16}


def set_at(buf: Array, index, values: Array, mode: str | None = None) -> Array:
    """``buf.at[index].set(values, mode=mode)`` for the caches and arenas, without the CPU upcast.

    XLA:CPU has no FP8, bfloat16 or float16 scatter: it converts the WHOLE buffer to a wider
    float, scatters and converts back, so every write to a KV cache or arena copied it twice
    at 2-4x its bytes. On CPU the same bytes are scattered into an unsigned-integer bitcast of
    the buffer (exact; XLA:CPU still materializes the bitcast-convert, one buffer-sized copy).
    XLA:GPU scatters these types natively in place, so other platforms keep the plain scatter."""

    def plain(buf, values):
        return buf.at[index].set(values.astype(buf.dtype), mode=mode)

    raw_dtype = _SAME_WIDTH_UINT.get(jnp.dtype(buf.dtype).itemsize)
    if raw_dtype is None or not jnp.issubdtype(buf.dtype, jnp.floating):
        return plain(buf, values)

    def as_raw(buf, values):
        raw = lax.bitcast_convert_type(buf, raw_dtype)
        new = lax.bitcast_convert_type(values.astype(buf.dtype), raw_dtype)
        return lax.bitcast_convert_type(raw.at[index].set(new, mode=mode), buf.dtype)

    return lax.platform_dependent(buf, values, cpu=as_raw, default=plain)


def fp8_relative_step() -> float:
    """Relative rounding step of e4m3 (3 mantissa bits): half-ulp is 2**-4 of the value."""
    return 2.0**-4


__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "MIN_SCALE",
    "QuantizedActivations",
    "dequantize_activations",
    "dequantize_kv",
    "dequantize_weight_blocks",
    "dequantize_weight_channels",
    "fp8_relative_step",
    "quantize_activations",
    "quantize_kv",
    "quantize_weight_blocks",
    "quantize_weight_channels",
    "set_at",
]
