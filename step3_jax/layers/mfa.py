"""MFA (Multi-Matrix Factorization Attention), Step-3's attention.

64 query heads come from a shared low-rank query (q_proj -> RMSNorm -> wq); all heads share ONE
key head and ONE value head of width 256, so the cache holds 2 x 256 values per token per layer.

    h [B,T,D] --q_proj 'BTD,RD->BTR'--> inter_norm --wq 'BTR,NHR->BTNH'--> q [B,T,N,H]
    h --k_proj 'BTD,HD->BTH'--> k [B,T,H];  h --v_proj--> v [B,T,H]
    q, k <- NeoX RoPE at each token's position
    o = softmax(q . K^T / sqrt(H) + causal) . V           'BTNH,BSH->BNTS', 'BNTS,BSH->BTNH'
    out = o --o_proj 'BTNH,DNH->BTD'-->

Opt-in (`MFAttention.fuse_qkv`): q_proj, k_proj, v_proj stored as ONE ``qkv_proj [R + 2H, D]``,
so q_lo, k and v come from one projection 'BTD,ND->BTN' split at R and R + H.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from step3_jax.config import check_sizes
from step3_jax.layers.linear import init_weight, project
from step3_jax.layers.norms import RMSNorm
from step3_jax.layers.rope import RopeScaling, apply_rope
from step3_jax.quant import BLOCK, QuantizedActivations
from step3_jax.quant_model import Fp8Weight, concat_rows, split_rows

_NEG_INF = -1e30  # finite "minus infinity": exp() underflows to 0 without inf - inf = NaN


def mfa_attention_xla(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S H"],
    v: Float[Array, "B S H"],
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"] | None = None,
    kv_lengths: Int[Array, " B"] | None = None,
    sm_scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """Plain-XLA MQA attention of N query heads against ONE shared K/V head.

    Key s of sequence b is visible to query t iff ``kv_positions[b, s] <= q_positions[b, t]``
    (causal; ``kv_positions`` defaults to the slot index, i.e. a cache) and, when given,
    ``s < kv_lengths[b]``. Invisible slots never contribute, even if they hold NaN: their
    scores are masked AND their V rows are zeroed (0 * NaN is NaN inside a matmul). A query
    with no visible key returns zeros. Softmax in float32; output in q.dtype.
    """
    b, s, h = k.shape
    sm_scale = h**-0.5 if sm_scale is None else sm_scale
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    visible = kv_positions[:, None, :] <= q_positions[:, :, None]  # [B, T, S]
    slot_ok = jnp.ones((b, s), bool)
    if kv_lengths is not None:
        slot_ok = jnp.arange(s)[None, :] < kv_lengths[:, None]
        visible = visible & slot_ok[:, None, :]
    k = jnp.where(slot_ok[..., None], k, 0).astype(q.dtype)
    v = jnp.where(slot_ok[..., None], v, 0).astype(q.dtype)
    scores = jnp.einsum("BTNH,BSH->BNTS", q, k, preferred_element_type=jnp.float32) * sm_scale
    scores = jnp.where(visible[:, None], scores, _NEG_INF)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    p = jnp.where(visible[:, None], p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    # Contract to [B, N, T, H] and transpose afterwards: XLA:CPU (jax 0.10.2) cannot run a
    # bf16 x bf16 -> f32 batched dot whose output is laid out BTNH ("Unsupported element type
    # for DotThunk"), which broke every bf16 call with batch >= 2 on CPU.
    out = jnp.einsum("BNTS,BSH->BNTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


class MFAttention(nnx.Module):
    """Step-3 MFA attention layer (no biases).

    Weights ([out, in] layout): ``q_proj [R, D]``, ``k_proj [H, D]``, ``v_proj [H, D]``,
    ``inter_norm [R]``, ``wq [N, H, R]``, ``o_proj [D, N, H]``. After `fuse_qkv` (opt-in) the
    first three are ONE ``qkv_proj [R + 2H, D]`` (rows of q_proj, then k_proj, then v_proj).
    """

    def __init__(
        self,
        hidden_size: int,
        share_q_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        rope_theta: float = 500000.0,
        rope_scaling: RopeScaling | None = None,
        eps: float = 1e-5,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        d, r, n, h = hidden_size, share_q_dim, num_heads, head_dim
        check_sizes("MFAttention", hidden_size=d, share_q_dim=r, num_heads=n, head_dim=h)
        if h % 2:
            raise ValueError(f"MFAttention: head_dim must be even (RoPE rotates pairs), got {h}")
        self.hidden_size, self.num_heads, self.head_dim = d, n, h
        self.rope_theta, self.dtype = rope_theta, dtype
        self.rope_scaling = rope_scaling
        self.q_proj = nnx.Param(init_weight(rngs.params(), (r, d), d, param_dtype))
        self.k_proj = nnx.Param(init_weight(rngs.params(), (h, d), d, param_dtype))
        self.v_proj = nnx.Param(init_weight(rngs.params(), (h, d), d, param_dtype))
        self.inter_norm = RMSNorm(r, eps=eps, param_dtype=param_dtype)
        self.wq = nnx.Param(init_weight(rngs.params(), (n, h, r), r, param_dtype))
        self.o_proj = nnx.Param(init_weight(rngs.params(), (d, n, h), n * h, param_dtype))

    # ------------------------------------------------------------------ fused q/k/v weight
    @property
    def fused_qkv(self) -> bool:
        """Whether q/k/v are stored as ONE ``qkv_proj`` param (see `fuse_qkv`)."""
        return hasattr(self, "qkv_proj")

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows ``(R, H, H)`` of q_proj, k_proj, v_proj (the cut points of ``qkv_proj``)."""
        return (self.inter_norm.weight.shape[0], self.head_dim, self.head_dim)

    def fuse_qkv(self) -> MFAttention:
        """Replaces q_proj, k_proj, v_proj by ONE ``qkv_proj [R + 2H, D]`` param, in place.

        Why: the three projections read the same input; one GEMM over the stored fused weight
        fills more SMs at decode sizes, and storing it costs no weight concatenation per call
        (the per-call form cost 19 us of the 281 us attention half on an H100, docs/LOG.md).
        Works for float weights and for `Fp8Weight` whose rows concatenate exactly
        (`quant_model.concat_rows`: per-channel scales, or 128x128 blocks
        with R a multiple of 128); quantize BEFORE fusing so the block scales are the separate
        weights'. Returns ``self``. Raises ValueError if already fused or on mismatched shapes.
        """
        if self.fused_qkv:
            raise ValueError("MFAttention.fuse_qkv: already fused (it has qkv_proj); fuse once")
        ws = (self.q_proj[...], self.k_proj[...], self.v_proj[...])
        for w, name, rows in zip(ws, ("q_proj", "k_proj", "v_proj"), self.qkv_sizes, strict=True):
            if len(w.shape) != 2 or w.shape[0] != rows:
                raise ValueError(
                    f"MFAttention.fuse_qkv: {name} must be [{rows}, D], got {tuple(w.shape)}"
                )
        fused = concat_rows(ws, names=("q_proj", "k_proj", "v_proj"))
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = nnx.Param(fused)
        return self

    def qkv_weights(self) -> tuple:
        """``(q_proj, k_proj, v_proj)`` values, cut back out of ``qkv_proj`` if fused (bitwise:
        `quant_model.split_rows`). For code that needs the separate weights (HF export, AFD)."""
        if not self.fused_qkv:
            return (self.q_proj[...], self.k_proj[...], self.v_proj[...])
        return split_rows(self.qkv_proj[...], self.qkv_sizes)

    # ------------------------------------------------------------------ forward
    def _projections(self, x: Float[Array, "B T D"], implementation) -> tuple[Array, Array, Array]:
        """``(q_lo [B,T,R], k [B,T,H], v [B,T,H])``: one projection over the stored fused
        ``qkv_proj`` if fused, else three."""
        kw = dict(implementation=implementation)
        if not self.fused_qkv:
            ws = (self.q_proj[...], self.k_proj[...], self.v_proj[...])
            eqns = ("BTD,RD->BTR", "BTD,HD->BTH", "BTD,HD->BTH")
            return tuple(project(x, w, e, **kw) for w, e in zip(ws, eqns, strict=True))
        r, h, _ = self.qkv_sizes
        fused = project(x, self.qkv_proj[...], "BTD,ND->BTN", **kw)
        return tuple(jnp.split(fused, [r, r + h], axis=-1))

    def qkv(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        implementation: str | None = None,
    ) -> tuple[Float[Array, "B T N H"], Float[Array, "B T H"], Float[Array, "B T H"]]:
        """Projections, inter_norm (BEFORE the up-projection) and RoPE on q and k.
        ``implementation``: the GEMM of FP8 weights (`KernelPolicy.gemm`)."""
        with jax.named_scope("qkv_proj"):
            q_lo, k, v = self._projections(x.astype(self.dtype), implementation)
        with jax.named_scope("inter_norm"):
            q_lo = self.inter_norm(q_lo)
        with jax.named_scope("wq"):
            q = project(q_lo, self.wq[...], "BTR,NHR->BTNH", implementation=implementation)
        with jax.named_scope("rope"):
            q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
            k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)
        return q, k, v

    def quantizes_o(self, o_quant: str | None) -> bool:
        """Whether the attention should hand `output` its input already FP8 (a
        `QuantizedActivations` per head per 128 columns), for `KernelPolicy.o_quant`:
        "attention" (or None, the default) with a block-FP8 o_proj, whose FP8 GEMM then reads
        it as it is, and heads a multiple of 128 wide (so the blocks are those of the
        flattened heads, where the GEMM's own quantization puts them)."""
        w = self.o_proj[...]
        block_fp8 = isinstance(w, Fp8Weight) and w.granularity == "block"
        return o_quant != "gemm" and block_fp8 and w.shape[-1] % BLOCK == 0

    def output(
        self,
        o: Float[Array, "B T N H"] | QuantizedActivations,
        implementation: str | None = None,
    ) -> Float[Array, "B T D"]:
        with jax.named_scope("o_proj"):
            return project(o, self.o_proj[...], "BTNH,DNH->BTD", implementation=implementation)

    def __call__(
        self, x: Float[Array, "B T D"], positions: Int[Array, "B T"] | None = None
    ) -> Float[Array, "B T D"]:
        """Cache-free causal self-attention over the T tokens of ``x`` (prefill/training).

        For decoding against a KV cache use `step3_jax.Step3Model` (or `qkv`, a cache write
        and `mfa_attention_xla` / `step3_jax.kernels.mfa_decode_attention`, then `output`).
        """
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != self.hidden_size:
            raise ValueError(
                f"MFAttention: x must be [B, T, hidden_size={self.hidden_size}], got {jnp.shape(x)}"
            )
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        elif jnp.shape(positions) not in ((b, t), (1, t)):
            raise ValueError(
                f"MFAttention: positions must be [B, T] = {(b, t)} (or [1, T]), got "
                f"{jnp.shape(positions)}"
            )
        q, k, v = self.qkv(x, positions)
        o = mfa_attention_xla(q, k, v, positions, kv_positions=positions)
        return self.output(o)


__all__ = ["MFAttention", "mfa_attention_xla"]
