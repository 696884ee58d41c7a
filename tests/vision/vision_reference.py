"""A float64 NumPy reference of the Step3-VL vision half, written from vLLM's step3_vl.py and
independent of step3_jax's JAX code: it reads the HF-named tensors directly.

Includes its own antialiased bicubic resampling (Pillow's / torch's ``antialias=True``
algorithm: Keys cubic with a = -0.5, support widened by the downscale factor, taps clipped to
the input and renormalized) for the position-table resize of non-728 inputs.
"""

from __future__ import annotations

import numpy as np

PREFIX = 4  # 1 class token + 3 copies


def cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of Pillow's antialiased bicubic resampling along one axis."""
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        taps = cubic((j - center + 0.5) * inv)
        w[i, lo:hi] = taps / taps.sum()
    return w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def conv2d(x, w, b, stride, pad):
    """x [B, Y, X, I] (channels last), w [O, I, k, k] (torch), zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[-1]
    yo = (x.shape[1] - k) // stride + 1
    xo = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], yo, xo, w.shape[0]))
    for dy in range(k):
        for dx in range(k):
            win = x[:, dy : dy + stride * yo : stride, dx : dx + stride * xo : stride]
            out += win @ w[:, :, dy, dx].T
    return out + b


def embeddings(t, pixels, patch, grid0):
    """pixels [B, 3, P, P] -> [B, 4 + G*G, D] (class token, positions, 3 prefix copies)."""
    g = lambda n: np.asarray(t[n], np.float64)  # noqa: E731
    b, _, p, _ = pixels.shape
    gs = p // patch
    w = g("vision_model.embeddings.patch_embedding.weight")  # [D, 3, p, p]
    pt = pixels.reshape(b, 3, gs, patch, gs, patch).transpose(0, 2, 4, 1, 3, 5)
    patches = pt.reshape(b, gs * gs, -1) @ w.reshape(w.shape[0], -1).T
    patches += g("vision_model.embeddings.patch_embedding.bias")
    pos = g("vision_model.embeddings.position_embedding.weight")
    grid = pos[1:].reshape(grid0, grid0, -1)
    if gs != grid0:
        m = aa_resize_matrix(grid0, gs)
        grid = np.einsum("yY,xX,YXd->yxd", m, m, grid)
    pos = np.concatenate([pos[:1], grid.reshape(gs * gs, -1)])
    cls = np.broadcast_to(g("vision_model.embeddings.class_embedding"), (b, 1, w.shape[0]))
    x = np.concatenate([cls, patches], axis=1) + pos
    return np.concatenate([np.repeat(x[:, :1], PREFIX - 1, axis=1), x], axis=1)


def encoder_layer(t, i, x, heads, eps):
    pre = f"vision_model.transformer.layers.{i}."
    g = lambda n: np.asarray(t[pre + n], np.float64)  # noqa: E731
    b, n, d = x.shape
    qkv = x @ g("self_attn.qkv_proj.weight").T + g("self_attn.qkv_proj.bias")
    q, k, v = (
        a.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1)
    )
    att = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)) @ v
    att = att.transpose(0, 2, 1, 3).reshape(b, n, d)
    att = att @ g("self_attn.out_proj.weight").T + g("self_attn.out_proj.bias")
    x = x + layer_norm(att, g("layer_norm1.weight"), g("layer_norm1.bias"), eps)
    h = x @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    h = h / (1 + np.exp(-1.702 * h))  # quick_gelu
    h = h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    return x + layer_norm(h, g("layer_norm2.weight"), g("layer_norm2.bias"), eps)


def vision_forward(t, pixels, cfg):
    """Projector output [B, tokens, M] in float64 for HF-named tensors ``t``."""
    x = embeddings(t, np.asarray(pixels, np.float64), cfg.patch_size, cfg.position_grid)
    for i in range(cfg.num_layers):
        x = encoder_layer(t, i, x, cfg.num_heads, cfg.layer_norm_eps)
    x = x[:, PREFIX:]
    b, n, d = x.shape
    gs = int(round(np.sqrt(n)))
    f = x.reshape(b, gs, gs, d)
    g = lambda n: np.asarray(t[n], np.float64)  # noqa: E731
    f = conv2d(f, g("vit_downsampler.weight"), g("vit_downsampler.bias"), cfg.projector_stride, 0)
    f = conv2d(f, g("vit_downsampler2.weight"), g("vit_downsampler2.bias"), 2, 1)
    f = f.reshape(b, -1, f.shape[-1]) @ g("vit_large_projector.weight").T
    if cfg.projector_bias:
        f = f + g("vit_large_projector.bias")
    return f
