"""The Step3-VL vision tower, downsamplers and projector as Flax NNX modules.

Shapes for the release (``Step3VisionConfig.step3()``) and one 728 x 728 view::

    pixel_values  [B, 3, 728, 728]   normalized (CLIP mean/std), channels first like the reference
    patches       [B, 52*52, 1792]   conv k14 s14 (== a linear over each 14x14x3 patch)
    + class token [B, 1 + 2704, 1792]  then + position_embedding [2705, 1792]
    + 3 copies    [B, 4 + 2704, 1792]  of token 0 (class token + its position): 2708 tokens
    pad to 2712   [B, 2712, 1792]    zero rows up to a multiple of ``token_multiple`` (8)
    63 layers     [B, 2712, 1792]    attention over the 2708 real tokens (padded keys masked)
    drop 4 + pad  [B, 52, 52, 1792]  (tokens 4..2707, row-major over the patch grid)
    vit_downsampler   conv k2 s2      [B, 26, 26, 4096]
    vit_downsampler2  conv k3 s2 p1   [B, 13, 13, 8192]
    vit_large_projector               [B, 169, 7168]

A 504 x 504 crop gives a 36 x 36 grid: the position table's 52 x 52 patch part is resized to
36 x 36 (bicubic, antialiased, in float32, then cast back: torch's
``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``, here the same
separable weights computed on the host, `antialiased_bicubic_weights`); the class token's
position row is used as is. Output: 81 tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from step3_jax.layers.linear import init_weight
from step3_jax.policy import KernelPolicy
from step3_jax.quant_model import Fp8Weight
from step3_jax.vision.config import NUM_PREFIX_TOKENS, Step3VisionConfig
from step3_jax.vision.layers import Conv2d, Linear, VisionEncoderLayer, pad_tokens

# The tower pads its tokens to a multiple of this (`pad_tokens`): what a bf16 cuBLAS GEMM wants.
TOKEN_MULTIPLE = 8


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = a * (((x - 5) * x + 8) * x - 4)
    return np.where(x < 1, inner, np.where(x < 2, outer, 0.0))


@functools.lru_cache(maxsize=32)
def antialiased_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float32 resampling weights along one axis, as Pillow's and torch's
    ``antialias=True`` bicubic compute them: output pixel i is centred at ``(i + 0.5) * s``
    (``s = n_in / n_out``), the Keys a = -0.5 kernel is stretched by ``max(s, 1)``, taps are
    input pixels ``int(c - support + 0.5) .. int(c + support + 0.5) - 1`` clipped to the input
    (``support = 2 max(s, 1)``), and each row is renormalized to sum to 1. (Computed on the host
    in float64: `jax.image.resize`'s antialiased cubic differs from torch by ~1e-5 relative
    because it does not cut the taps at the support the same way.)"""
    s = n_in / n_out
    stretch = max(s, 1.0)
    support = 2.0 * stretch
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * s
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
        taps = _keys_cubic((np.arange(lo, hi) + 0.5 - c) / stretch)
        w[i, lo:hi] = taps / taps.sum()
    return w.astype(np.float32)


def resize_positions(pos: Float[Array, "G G D"], grid: int) -> Float[Array, "g g D"]:
    """The learned patch-position grid resized to ``grid`` x ``grid`` (antialiased bicubic in
    float32, `antialiased_bicubic_weights`), cast back to ``pos.dtype``. Identity when the size
    already matches."""
    if pos.shape[0] == grid:
        return pos
    w = jnp.asarray(antialiased_bicubic_weights(pos.shape[0], grid))
    out = jnp.einsum(
        "yY,xX,YXD->yxD", w, w, pos.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(pos.dtype)


class VisionEmbeddings(nnx.Module):
    """Patch embedding + class token + learned positions + the 3 prefix copies of token 0."""

    def __init__(self, c: Step3VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        d, p, ch = c.hidden_size, c.patch_size, c.num_channels
        self.patch_size, self.grid0 = p, c.position_grid
        self.class_embedding = nnx.Param(init_weight(rngs.params(), (1, d), 1, param_dtype))
        self.patch_embedding = Conv2d(ch, d, p, stride=p, param_dtype=param_dtype, rngs=rngs)
        rows = self.grid0**2 + 1
        self.position_embedding = nnx.Param(init_weight(rngs.params(), (rows, d), 1, param_dtype))

    def patches(self, pixel_values: Float[Array, "B C P P"], dtype) -> Float[Array, "B T D"]:
        """The patch convolution (kernel = stride: a reshape, then one GEMM): ``[B, G*G, D]``."""
        b = pixel_values.shape[0]
        y = self.patch_embedding(pixel_values.astype(dtype).transpose(0, 2, 3, 1))
        return y.reshape(b, -1, y.shape[-1])

    def __call__(self, pixel_values: Float[Array, "B C P P"], dtype) -> Float[Array, "B T D"]:
        b, _, py, _ = pixel_values.shape
        g = py // self.patch_size
        patches = self.patches(pixel_values, dtype)
        pos = self.position_embedding[...]
        grid = resize_positions(pos[1:].reshape(self.grid0, self.grid0, -1), g)
        pos = jnp.concatenate([pos[:1], grid.reshape(g * g, -1)], axis=0).astype(dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1) + pos[None]
        prefix = jnp.repeat(x[:, :1], NUM_PREFIX_TOKENS - 1, axis=1)
        return jnp.concatenate([prefix, x], axis=1)


def check_pixels(pixel_values, c: Step3VisionConfig) -> None:
    """Clear errors for pixel batches the tower cannot take."""
    shape = getattr(pixel_values, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] != c.num_channels:
        raise ValueError(
            f"pixel_values must be [N, {c.num_channels}, H, W] (normalized, channels first), "
            f"got {shape if shape is not None else type(pixel_values)}"
        )
    n, _, h, w = shape
    if n == 0:
        raise ValueError("pixel_values is empty (N = 0): pass at least one image")
    if h != w or h % c.patch_size:
        raise ValueError(
            f"pixel_values must be square with a side that is a multiple of patch_size="
            f"{c.patch_size} (the processor makes {c.image_size} / {c.crop_size}), got {h} x {w}"
        )
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise ValueError(
            f"pixel_values must be floating point (normalized), got {pixel_values.dtype}"
        )


class VisionTransformer(nnx.Module):
    """``vision_model``: embeddings + ``num_layers`` encoder layers (no final norm).

    Returns the patch tokens only, ``[B, G*G, D]`` (the 4 prefix tokens are dropped). The
    layers run on the token axis padded to a multiple of ``token_multiple`` (`pad_tokens`;
    1: no padding) with the padded keys masked, which leaves the real tokens' outputs as
    they are."""

    def __init__(self, c: Step3VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.embeddings = VisionEmbeddings(c, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                VisionEncoderLayer(
                    c.hidden_size,
                    c.num_heads,
                    c.intermediate_size,
                    eps=c.layer_norm_eps,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )  # fmt: skip
                for _ in range(c.num_layers)
            ]
        )

    def __call__(
        self, pixel_values, *, dtype, implementation: str = "xla", gemm=None,
        token_multiple: int = TOKEN_MULTIPLE, mlp: str | None = None,
    ) -> Float[Array, "B T D"]:  # fmt: skip
        x = self.embeddings(pixel_values, dtype)
        t = x.shape[1]
        x, kv_len = pad_tokens(x, token_multiple)
        x = self.encode(x, implementation=implementation, gemm=gemm, kv_len=kv_len, mlp=mlp)
        return x[:, NUM_PREFIX_TOKENS:t]

    def encode(
        self, x: Float[Array, "B T D"], *, implementation: str = "xla", gemm=None,
        kv_len: int | None = None, mlp: str | None = None,
    ) -> Float[Array, "B T D"]:  # fmt: skip
        """The encoder layers on embedded tokens, all ``T`` rows kept (padded ones included);
        ``kv_len``: the real tokens of a padded ``x`` (None: all); ``mlp``: `VisionMLP`'s
        implementation."""
        for layer in self.layers:
            x = layer(x, implementation, gemm, kv_len, mlp)
        return x


class Step3VisionModel(nnx.Module):
    """Tower + ``vit_downsampler`` + ``vit_downsampler2`` + ``vit_large_projector``.

    ``model(pixel_values [B, 3, P, P])`` -> ``[B, tokens, M]`` image embeddings in the text
    model's width (169 tokens at P = 728, 81 at P = 504), in ``dtype``. Kernels come from
    ``policy`` (`step3_jax.KernelPolicy`): attention runs ``policy.vision_attention`` ("cudnn" |
    "xla"; None: cuDNN on a GPU in 16-bit, else XLA), FP8 linears ``policy.gemm``.
    ``token_multiple``: the tower pads its token axis to a multiple of this (8: what a bf16
    cuBLAS GEMM wants, `pad_tokens`; 1: no padding), with the padded keys masked.
    """

    def __init__(
        self, config: Step3VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16, policy: KernelPolicy | None = None,
        token_multiple: int = TOKEN_MULTIPLE,
    ):  # fmt: skip
        c = self.config = config
        if policy is not None and not isinstance(policy, KernelPolicy):
            raise TypeError(f"policy must be a step3_jax.KernelPolicy, got {type(policy)}")
        bad = isinstance(token_multiple, bool) or not isinstance(token_multiple, int)
        if bad or token_multiple < 1:
            raise ValueError(f"token_multiple must be an int >= 1, got {token_multiple!r}")
        # A plain attribute (static pytree data: changing it recompiles the tower) that a
        # benchmark may switch to compare.
        self.token_multiple = token_multiple
        self.policy = policy or KernelPolicy()
        # Resolved once here (the attribute a benchmark may switch to compare both).
        self.dtype = dtype
        self.attention_implementation = self.policy.vision_attention or default_attention_impl(
            dtype
        )
        o = c.output_hidden_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.vision_model = VisionTransformer(c, **kw)
        self.vit_downsampler = Conv2d(c.hidden_size, o, 2, stride=c.projector_stride, **kw)
        self.vit_downsampler2 = Conv2d(o, 2 * o, 3, stride=2, padding=1, **kw)
        self.vit_large_projector = Linear(2 * o, c.text_hidden_size, bias=c.projector_bias, **kw)

    def features(self, pixel_values: Float[Array, "B C P P"]) -> Float[Array, "B G G D"]:
        """The tower's patch tokens on their grid, ``[B, G, G, D]``."""
        check_pixels(pixel_values, self.config)
        x = self.vision_model(
            pixel_values,
            dtype=self.dtype,
            implementation=self.attention_implementation,
            gemm=self.policy.gemm,
            mlp=self.policy.vision_mlp,
            token_multiple=self.token_multiple,
        )
        g = self.config.grid(pixel_values.shape[-1])
        return x.reshape(x.shape[0], g, g, x.shape[-1])

    def project(self, features: Float[Array, "B G G D"]) -> Float[Array, "B T M"]:
        """Downsamplers + projector: ``[B, G, G, D] -> [B, g*g, M]`` (row-major grid)."""
        y = self.vit_downsampler2(self.vit_downsampler(features))
        b, gy, gx, ch = y.shape
        return self.vit_large_projector(y.reshape(b, gy * gx, ch), self.policy.gemm)

    def __call__(self, pixel_values: Float[Array, "B C P P"]) -> Float[Array, "B T M"]:
        return self.project(self.features(pixel_values))


def quantize_linears(model: nnx.Module) -> int:
    """Replaces (in place) every vision `Linear` weight (the ViT's qkv/out/fc1/fc2 and the
    projector) by a block-scaled `step3_jax.quant_model.Fp8Weight` (activations quantized per
    token per 128 at run time; the GEMM is the model's ``policy.gemm``); convolutions, norms
    and embeddings stay as they are. Weights that already are FP8 are kept. Returns the number
    of linears."""
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            if not isinstance(node.weight[...], Fp8Weight):
                node.weight.set_value(Fp8Weight.quantize(node.weight[...]))
            count += 1
    if count == 0:
        raise ValueError("quantize_linears found no vision Linear layers")
    return count


def default_attention_impl(dtype) -> str:
    """``"cudnn"`` (fused attention) on a GPU with a 16-bit compute dtype, else ``"xla"``."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


__all__ = [
    "Step3VisionModel",
    "antialiased_bicubic_weights",
    "VisionEmbeddings",
    "VisionTransformer",
    "check_pixels",
    "default_attention_impl",
    "quantize_linears",
    "resize_positions",
]
