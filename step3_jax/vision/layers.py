"""Flax NNX building blocks of the Step3-VL vision tower, each usable on its own.

Every layer takes explicit sizes (never the config). Weights keep PyTorch's layouts, the
release's on-disk layout: linear ``weight [out, in]`` (contraction axis last, as
`step3_jax.layers.linear.project` and Hopper FP8 want), conv ``weight [O, I, kh, kw]``.
Biases everywhere (the released ViT has them on every linear, conv and norm).

One encoder layer, as vLLM's ``Step3VisionEncoderLayer`` computes it (NOTE the order: the norms
sit on the branch OUTPUTS, "sandwich/post-branch" style, not on the inputs as in CLIP)::

    x = x + layer_norm1(self_attn(x))
    x = x + layer_norm2(mlp(x))          # mlp = fc2(quick_gelu(fc1(x)))

Attention is full bidirectional softmax attention, no mask, scale head_dim**-0.5, q/k/v the
three consecutive ``D``-row blocks of one fused ``qkv_proj`` (each head a contiguous run of H),
computed as three GEMMs over those row blocks (`Linear.split_outputs`).
The only mask is the tower's own token padding (`pad_tokens`): padded keys are never attended
to, so the real tokens' outputs are those of the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from step3_jax.kernels.grouped_gemm.activations import quick_gelu
from step3_jax.layers.linear import init_weight, project
from step3_jax.quant_model import linear_activation_fused, rows_split_exactly, split_rows

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def layer_norm(x: Float[Array, "... D"], weight, bias, eps: float) -> Float[Array, "... D"]:
    """LayerNorm over the last axis in float32 (biased variance, like torch), cast back."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with ``weight [out, in]``; ``weight`` may be an `Fp8Weight`."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(init_weight(rngs.params(), (d_out, d_in), d_in, param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None

    def __call__(self, x: Float[Array, "... I"], gemm: str | None = None) -> Float[Array, "... O"]:
        """``gemm``: the FP8 GEMM implementation (`KernelPolicy.gemm`) when ``weight`` is FP8."""
        # float32 accumulation, output (and bias add) in x's dtype: a bf16 GEMM output that XLA
        # can fuse the bias into, instead of a float32 intermediate twice the bytes.
        return self._project(x, self.weight[...], self.bias, gemm)

    @staticmethod
    def _project(x, weight, bias, gemm):
        y = project(x, weight, "...i,oi->...o", out_dtype=x.dtype, implementation=gemm)
        return y if bias is None else y + bias[...].astype(y.dtype)

    def split_outputs(
        self, x: Float[Array, "... I"], sizes: Sequence[int], gemm: str | None = None
    ) -> tuple[Array, ...]:
        """``self(x)`` cut along its outputs into blocks of ``sizes``, as one GEMM per block
        over the weight's row blocks (contiguous: views, not copies), so that each block comes
        out dense. One GEMM and a split of its output costs a strided copy per block (the
        tower's q/k/v: 29 us a layer at 728 px on an H100, docs/LOG.md). A block-FP8 weight
        whose cuts are not multiples of its 128-row scale blocks runs the one GEMM and the
        split instead."""
        w, cuts = self.weight[...], np.cumsum(sizes)[:-1].tolist()
        if not rows_split_exactly(w, sizes):
            return tuple(jnp.split(self(x, gemm), cuts, axis=-1))
        biases = [None] * len(sizes) if self.bias is None else jnp.split(self.bias[...], cuts)
        return tuple(
            self._project(x, part, b, gemm)
            for part, b in zip(split_rows(w, sizes), biases, strict=True)
        )


class Conv2d(nnx.Module):
    """A 2-D convolution on channels-last maps: ``[B, Y, X, I] -> [B, Y', X', O]``.

    ``weight [O, I, k, k]`` (PyTorch layout), symmetric zero ``padding``, float32 accumulation,
    output (and bias add) in x's dtype, as `Linear`.

    Computed as ONE GEMM over the input's k x k windows (im2col: ``[B, Y', X', I, k, k]``,
    built from k*k strided slices) against the weight as the ``[O, I*k*k]`` matrix it already
    is in memory. The tower's downsamplers run on a single image's 52 x 52 and 26 x 26 grids,
    where the weights dominate (``vit_downsampler2``: 302 M parameters against a 5.5 MB input):
    XLA's convolution path converted that weight to float32 and re-laid it out for cuDNN on
    every call (a 622 us transpose, tf32 convolutions, ~1.5 ms a 728 px view on an H100,
    docs/LOG.md), where the GEMM reads it once, in place. The window copy costs k*k/stride**2
    times the input (2.25x for the 3 x 3 stride-2 downsampler; one transposed copy of it
    when the kernel equals the stride)."""

    def __init__(
        self, d_in: int, d_out: int, kernel: int, *, stride: int, padding: int = 0,
        param_dtype, rngs: nnx.Rngs,
    ):  # fmt: skip
        self.stride, self.padding = stride, padding
        fan_in = d_in * kernel * kernel
        self.weight = nnx.Param(
            init_weight(rngs.params(), (d_out, d_in, kernel, kernel), fan_in, param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype))

    def __call__(self, x: Float[Array, "B Y X I"]) -> Float[Array, "B Yo Xo O"]:
        w = self.weight[...]
        if x.ndim != 4 or x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"Conv2d expects x [B, Y, X, {w.shape[1]}] (channels last), got x {x.shape}"
            )
        windows = self.windows(x, w.shape[-1])
        y = project(windows, w, "BYXIhw,OIhw->BYXO", out_dtype=x.dtype)
        return y + self.bias[...].astype(y.dtype)

    def windows(self, x: Float[Array, "B Y X I"], k: int) -> Float[Array, "B Yo Xo I k k"]:
        """The k x k input window under each output position (im2col), zero-padded."""
        s, p = self.stride, self.padding
        b, ny, nx, ch = x.shape
        oy, ox = (ny + 2 * p - k) // s + 1, (nx + 2 * p - k) // s + 1
        if oy < 1 or ox < 1:
            raise ValueError(
                f"Conv2d expects x [B, Y, X, I] with Y, X >= {k - 2 * p} (kernel {k}, padding "
                f"{p}), got x {x.shape}"
            )
        if k == s and p == 0:  # non-overlapping windows: a reshape, then one transposed copy
            x = x[:, : oy * k, : ox * k].reshape(b, oy, k, ox, k, ch)
            return x.transpose(0, 1, 3, 5, 2, 4)
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        span_y, span_x = s * (oy - 1) + 1, s * (ox - 1) + 1
        cols = [xp[:, i : i + span_y : s, j : j + span_x : s] for i in range(k) for j in range(k)]
        return jnp.stack(cols, axis=-1).reshape(b, oy, ox, ch, k, k)


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S N H"],
    v: Float[Array, "B S N H"],
    implementation: str = "xla",
    kv_len: int | None = None,
) -> Float[Array, "B T N H"]:
    """Bidirectional softmax attention, scale H**-0.5. ``"xla"``: explicit float32 logits and
    softmax (the reference path); ``"cudnn"``: `jax.nn.dot_product_attention`'s fused cuDNN
    kernel (GPU, bf16/f16).

    ``kv_len`` (a Python int, the same for every row): only keys ``0 .. kv_len-1`` are
    attended to (the tower's token padding, `pad_tokens`); None: all ``S``. Every query row,
    padded ones included, sees at least one real key, so no row is an empty softmax (no NaN).
    """
    s = k.shape[1]
    if kv_len is not None and not 1 <= kv_len <= s:
        raise ValueError(f"kv_len must be in [1, {s}] (the key count S), got {kv_len}")
    masked = kv_len is not None and kv_len < s
    scale = q.shape[-1] ** -0.5
    if implementation == "cudnn":
        # key_value_seq_lengths selects cuDNN's PADDING mask type: the kernel skips the padded
        # keys itself, with no [B, N, T, S] mask or bias tensor in memory.
        lengths = jnp.full((q.shape[0],), kv_len, jnp.int32) if masked else None
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
        )
    if implementation != "xla":
        raise ValueError(
            f"implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
        )
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    if masked:
        logits = jnp.where(jnp.arange(s) < kv_len, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "BNTS,BSNH->BTNH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.astype(q.dtype)


def pad_tokens(
    x: Float[Array, "B T D"], multiple: int
) -> tuple[Float[Array, "B Tp D"], int | None]:
    """``x`` with zero rows appended up to the next multiple of ``multiple`` tokens, and the
    real token count to mask the padded keys with (`attention`'s ``kv_len``; None when no row
    was added).

    Why: a bf16 cuBLAS GEMM wants M a multiple of 8; otherwise XLA pads the operands of every
    GEMM of every layer (`loop_pad_fusion`s: padding once made a 728 px view 57.5 -> 55.7 ms
    on an H100, docs/LOG.md). Padding once at the tower's entry costs one copy. The padded
    rows stay finite through the layers (as queries they attend to the real keys only), and
    are dropped after."""
    t = x.shape[1]
    pad = padded_length(t, multiple) - t
    if pad == 0:
        return x, None
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0))), t


def padded_length(tokens: int, multiple: int) -> int:
    """``tokens`` rounded up to a multiple of ``multiple`` (the rows `pad_tokens` gives)."""
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"token multiple must be an int >= 1, got {multiple!r}")
    return -(-tokens // multiple) * multiple


class VisionAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, param_dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must divide by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv_proj = Linear(dim, 3 * dim, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = Linear(dim, dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x: Float[Array, "B T D"], implementation: str = "xla", gemm: str | None = None,
        kv_len: int | None = None,
    ) -> Float[Array, "B T D"]:  # fmt: skip
        """``kv_len``: the real tokens of a padded ``x`` (`attention`); None: all ``T``."""
        b, t, d = x.shape
        q, k, v = self.qkv_proj.split_outputs(x, (d, d, d), gemm)
        heads = (b, t, self.num_heads, d // self.num_heads)
        o = attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), implementation, kv_len)
        return self.out_proj(o.reshape(b, t, d), gemm)


class VisionMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x: Float[Array, "B T D"], gemm: str | None = None, implementation: str | None = None
    ) -> Float[Array, "B T D"]:
        """``implementation`` (`KernelPolicy.vision_mlp`): fc1, its bias and quick_gelu as ONE
        Pallas GEMM with the bias and activation in its epilogue ("pallas"; None where it runs
        here), or fc1 as a GEMM and quick_gelu as one more XLA pass over its output ("xla").
        ``gemm``: the FP8 linears' implementation where the unfused path runs FP8 weights."""
        fc1 = self.fc1
        h = linear_activation_fused(
            x, fc1.weight[...], fc1.bias, "quick_gelu", implementation, gemm
        )
        if h is None:  # quick_gelu in float32 on the compute-dtype fc1 output (one fused pass)
            h = fc1(x, gemm)
            h = quick_gelu(h.astype(jnp.float32)).astype(h.dtype)
        return self.fc2(h, gemm)


class VisionEncoderLayer(nnx.Module):
    """One ViT layer: ``x + LN1(attn(x))``, then ``+ LN2(mlp(.))`` (norms on branch outputs)."""

    def __init__(
        self, dim: int, num_heads: int, hidden: int, *, eps: float, param_dtype, rngs: nnx.Rngs
    ):
        self.self_attn = VisionAttention(dim, num_heads, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(dim, eps=eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(dim, hidden, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, eps=eps, param_dtype=param_dtype)

    def __call__(
        self, x: Float[Array, "B T D"], implementation: str = "xla", gemm: str | None = None,
        kv_len: int | None = None, mlp: str | None = None,
    ) -> Float[Array, "B T D"]:  # fmt: skip
        """``kv_len``: the real tokens of a padded ``x`` (`pad_tokens`); None: all ``T``.
        ``mlp``: the MLP's fc1 + quick_gelu implementation (`VisionMLP`)."""
        x = x + self.layer_norm1(self.self_attn(x, implementation, gemm, kv_len))
        return x + self.layer_norm2(self.mlp(x, gemm, mlp))


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "Conv2d",
    "LayerNorm",
    "Linear",
    "VisionAttention",
    "VisionEncoderLayer",
    "VisionMLP",
    "attention",
    "layer_norm",
    "pad_tokens",
    "padded_length",
    "quick_gelu",
]
