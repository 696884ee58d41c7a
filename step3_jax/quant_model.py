"""FP8 weights in the model: the `Fp8Weight` pytree, precision modes and `quantize_model`.

An `Fp8Weight` replaces the value of an ``nnx.Param`` holding a linear weight. Layers never look
inside it: they call `step3_jax.layers.linear.project(x, w, eqn)`, which hands the contraction to
`Fp8Weight.project` (the `ProjectableWeight` protocol). The activation is quantized on the fly
(per token, per 128-wide group of the contraction, `step3_jax.quant.quantize_activations`) and
contracted with the FP8 weight in plain XLA. This module is the reference and the fallback for
the Pallas kernels.

Layout of an `Fp8Weight` (byte-exact; formats in `step3_jax.quant`):

* ``values``: float8_e4m3fn, the weight's LOGICAL shape as the layer stores it, e.g. ``q_proj
  [R, D]``, ``wq [N, H, R]``, ``o_proj [D, N, H]``, experts ``[E, F, D]``. The last
  ``num_contract`` axes are contracted (K-major, as Hopper FP8 tensor cores need); the leading
  ``scales.ndim - 2`` axes are batch axes (the expert axis); the axes between are output axes.
  Row-major, one byte per value: the bytes are those of the 2-D view ``[*batch, N, K]`` with
  ``N = prod(output axes)`` and ``K = prod(contracted axes)``, i.e. exactly the HF block-FP8
  checkpoint's ``weight`` tensor (``wq.weight [16384, 2048]`` is ``values [64, 256, 2048]``).
* ``scales``: float32. ``granularity="block"``: ``[*batch, ceil(N/128), ceil(K/128)]``, one
  scale per 128x128 block of the 2-D view (the checkpoint's ``weight_scale_inv``, used as is);
  ``granularity="channel"``: ``[*batch, N, 1]``. Dequantized = float32(values) * scale.

Precision modes (`PRECISIONS`): ``"bf16"``; ``"fp8"``: FP8 weights and activations in every
GEMM except the router (the MoE gate stays bf16, as in the released checkpoint); ``"fp8+kv8"``:
also the FP8 KV cache (`Precision.cache_dtype`, pass it to ``generate(cache_dtype=...)`` or
``KVCache.create``). Never quantized: norms, the embedding (a gather, not a GEMM), the router,
and the lm_head by default (one matrix, ~0.3% of Step-3's weight bytes, and the logits are what
sampling sees; ``quantize_lm_head=True`` changes that).

The weight holds only data; WHICH GEMM runs is the caller's ``implementation=`` (the model
passes its `step3_jax.policy.KernelPolicy.gemm`). Two XLA forms, numerically the same
contraction of the dequantized operands, accumulated in float32:

* ``"xla"``: dequantize weight and activation to the compute dtype and run one
  ordinary dot. With a bf16 compute dtype each dequantized operand carries one extra bf16
  rounding (relative 2**-9). Per-channel weights skip the weight-side multiply: the dot reads
  a pure fp8 -> bf16 convert and the f32 result is scaled per output channel.
* ``"xla_fp8"``: FP8 x FP8 ``dot_general`` per 128-wide K block with float32 results, scaled
  by ``x_scale[m, kb] * w_scale[n, kb]`` and summed over blocks: exact scale application, but it
  materializes ``[KB, M, N]`` float32 partial sums.

Both XLA forms use JAX's DEFAULT dot precision. With a bfloat16 compute dtype that is exact
operand-wise; with float32 on an A100/H100 it means TF32 operands (relative rounding 2**-11),
enough to move ~1% of the next layer's activations across an e4m3 rounding boundary. Use
``jax.default_matmul_precision("highest")`` where float32 numerics matter (the NumPy-reference
tests do).

Fused rows: weights that share their input (an MFAttention's q_proj, k_proj, v_proj) can be
stored as ONE ``[sum N_i, K]`` weight (`concat_rows`, `split_rows`; `fuse_qkv`, and
`quantize_model` by default where the rows concatenate exactly): one GEMM instead of three.
The concatenation is exact for per-channel scales and for 128x128 block scales whose parts
are 128-row aligned.

And the kernel, ``"pallas"``: FP8 x FP8 with the 128x128 block scales applied per K block
inside the Mosaic GPU grouped GEMM (`step3_jax.kernels.grouped_gemm`, one group = a dense GEMM),
streaming the FP8 weight once and never materializing a dequantized copy. It needs a Hopper
GPU, block scales, no batch axes, N and K multiples of 128 and an equation of the form
``x[rest, contract] , w[out, contract] -> [rest, out]`` (`pallas_gemm_unsupported` says why
not). ``implementation=None`` takes it where it applies and the ``"xla"`` form elsewhere
(the numerics contract is the same: activations quantized per token per 128, f32
accumulation, a bf16 result).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Float

from step3_jax import quant
from step3_jax.config import check_sizes
from step3_jax.kernels import dispatch
from step3_jax.kernels.grouped_gemm import supported as grouped_gemm_supported
from step3_jax.kernels.grouped_gemm.api import grouped
from step3_jax.kernels.grouped_gemm.config import dense_config
from step3_jax.policy import GEMM_IMPLEMENTATIONS

PRECISIONS = ("bf16", "fp8", "fp8+kv8")
GRANULARITIES = ("block", "channel")


def _is_arraylike(a) -> bool:
    # Pytree transformations rebuild the dataclass with non-array leaves (None, sentinels,
    # PartitionSpecs); only validate real arrays, tracers and ShapeDtypeStructs.
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _view_2d(shape: tuple[int, ...], num_batch: int, num_contract: int) -> tuple[int, int]:
    """``(N, K)`` of the 2-D view ``[*batch, N, K]`` of a weight of logical ``shape``."""
    return (
        math.prod(shape[num_batch : len(shape) - num_contract]),
        math.prod(shape[len(shape) - num_contract :]),
    )


def _expected_scales(shape, num_batch, num_contract, granularity, block=quant.BLOCK):
    n, k = _view_2d(tuple(shape), num_batch, num_contract)
    batch = tuple(shape[:num_batch])
    if granularity == "channel":
        return (*batch, n, 1)
    return (*batch, -(-n // block), -(-k // block))


@struct.dataclass
class Fp8Weight:
    """An FP8 linear weight: ``values`` (e4m3, logical shape) and float32 ``scales``.

    Construct it directly from checkpoint tensors (no bf16 round trip)::

        Fp8Weight(values, scales)                    # q_proj [R, D], scales [R/128, D/128]
        Fp8Weight(values, scales, num_contract=2)    # o_proj [D, N, H], scales [D/128, NH/128]

    or quantize a float weight with `Fp8Weight.quantize`. ``num_contract`` (trailing contracted
    axes; default 1) and the batch-axis count ``scales.ndim - 2`` define the 2-D view the block
    scales cover (see the module docstring). Raises ValueError on a wrong dtype or shape.
    """

    values: Array  # [*batch, *out, *contract] float8_e4m3fn
    scales: Array  # block: [*batch, ceil(N/128), ceil(K/128)] f32; channel: [*batch, N, 1]
    num_contract: int = struct.field(pytree_node=False, default=1)
    granularity: str = struct.field(pytree_node=False, default="block")

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if not (_is_arraylike(self.values) and _is_arraylike(self.scales)):
            return
        vshape, sshape = tuple(self.values.shape), tuple(self.scales.shape)
        if jnp.dtype(self.values.dtype) != jnp.dtype(quant.FP8_DTYPE):
            raise ValueError(f"Fp8Weight.values must be float8_e4m3fn, got {self.values.dtype}")
        if jnp.dtype(self.scales.dtype) != jnp.dtype(jnp.float32):
            raise ValueError(f"Fp8Weight.scales must be float32, got {self.scales.dtype}")
        num_batch = len(sshape) - 2
        if num_batch < 0 or not 1 <= self.num_contract <= len(vshape) - num_batch - 1:
            raise ValueError(
                f"Fp8Weight: values {vshape} with scales {sshape} and num_contract="
                f"{self.num_contract} leave no output axis (need scales.ndim - 2 batch axes "
                "+ >= 1 output axis + num_contract contracted axes)"
            )
        want = _expected_scales(vshape, num_batch, self.num_contract, self.granularity)
        if sshape != want:
            raise ValueError(
                f"Fp8Weight: {self.granularity} scales for values {vshape} (num_contract="
                f"{self.num_contract}) must have shape {want}, got {sshape}"
            )

    # ------------------------------------------------------------------ array-like surface
    @property
    def shape(self) -> tuple[int, ...]:
        """The logical weight shape (what the bf16 weight it replaces had)."""
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def num_batch(self) -> int:
        return self.scales.ndim - 2

    @property
    def nbytes(self) -> int:
        """Bytes of values + scales (what a GEMM streams from memory)."""
        return int(self.values.size * 1 + self.scales.size * 4)

    def __getitem__(self, index):
        # Layers read params as ``param[...]``; an Fp8Weight is consumed whole.
        if index is Ellipsis:
            return self
        raise TypeError("Fp8Weight only supports w[...]; use .values / .dequantize() to index")

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(
        cls,
        w: Float[Array, "..."],
        *,
        num_contract: int = 1,
        num_batch: int = 0,
        granularity: str = "block",
    ) -> Fp8Weight:
        """Quantizes a float weight of logical shape ``[*batch, *out, *contract]``."""
        w = jnp.asarray(w)
        if w.ndim < num_batch + num_contract + 1:
            raise ValueError(
                f"weight of shape {w.shape} has too few axes for num_batch={num_batch}, "
                f"num_contract={num_contract}"
            )
        n, k = _view_2d(w.shape, num_batch, num_contract)
        w2 = w.reshape(*w.shape[:num_batch], n, k)
        if granularity == "block":
            q, s = quant.quantize_weight_blocks(w2)
        elif granularity == "channel":
            q, s = quant.quantize_weight_channels(w2)
        else:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        return cls(q.reshape(w.shape), s, num_contract, granularity)

    def scales_nk(self) -> Float[Array, "... N KB"]:
        """Per (output row, 128-wide K block) scale of the 2-D view: ``[*batch, N, KB]``."""
        n, k = _view_2d(self.shape, self.num_batch, self.num_contract)
        kb = -(-k // quant.BLOCK)
        if self.granularity == "channel":
            return jnp.broadcast_to(self.scales, (*self.scales.shape[:-1], kb))
        return jnp.repeat(self.scales, quant.BLOCK, axis=-2)[..., :n, :]

    def dequantize(self, dtype=jnp.float32) -> Array:
        """The float weight in its logical shape: float32(values) * scale, cast to ``dtype``."""
        n, k = _view_2d(self.shape, self.num_batch, self.num_contract)
        s = jnp.repeat(self.scales_nk(), quant.BLOCK, axis=-1)[..., :k]
        v2 = self.values.reshape(*self.shape[: self.num_batch], n, k)
        return (v2.astype(jnp.float32) * s).reshape(self.shape).astype(dtype)

    def project(self, x: Array, eqn: str, out_dtype, implementation: str | None = None) -> Array:
        """``einsum(eqn, x, w)`` with x quantized per token per 128-group; f32 accumulation.
        ``implementation``: "pallas" | "xla" | "xla_fp8" | None (module docstring)."""
        if implementation not in GEMM_IMPLEMENTATIONS:
            raise ValueError(
                f"Fp8Weight.project: implementation must be one of {GEMM_IMPLEMENTATIONS}, "
                f"got {implementation!r}"
            )
        spec = _parse_eqn(eqn, x.ndim, self)
        # Already-FP8 activations (per token per 128, the kernel's own format): the kernel
        # reads them as they are on bf16 activations; every XLA form takes their dequantized
        # value (and quantizes it again). With several contracted axes (o_proj's heads x 256)
        # the format's blocks along the last axis are the flattened K's blocks iff that axis
        # is a multiple of 128.
        pre_quantized = isinstance(x, quant.QuantizedActivations)
        blocks_align = self.num_contract == 1 or x.shape[-1] % quant.BLOCK == 0
        if pre_quantized and (not blocks_align or x.dtype != jnp.bfloat16):
            x, pre_quantized = x.dequantize(), False
        if implementation == "xla_fp8":
            x = x.dequantize() if pre_quantized else x
            return _project_fp8_blocks(x, self, spec).astype(out_dtype)
        rows = x.values if pre_quantized else x
        reason = None if implementation == "xla" else pallas_gemm_unsupported(rows, self, spec)
        if dispatch.choose("fp8_linear", implementation, reason) == "pallas":
            return _project_pallas(x, self, spec).astype(out_dtype)
        x = x.dequantize() if pre_quantized else x
        xd = _fake_quant_contract(x, spec)
        if self.granularity == "channel":
            # Per-channel scales factor out of the contraction: the weight operand is a pure
            # fp8 -> compute-dtype convert (exact), which XLA can fuse into the GEMM's operand
            # read, and the scale multiplies the f32 result.
            w_rest = spec.w[: len(spec.w) - self.num_contract]
            ws = self.scales.reshape(self.shape[: len(w_rest)])
            acc = jnp.einsum(
                spec.explicit,
                xd,
                self.values.astype(x.dtype),
                preferred_element_type=jnp.float32,
            )
            return jnp.einsum(f"{spec.out},{w_rest}->{spec.out}", acc, ws).astype(out_dtype)
        wd = self.dequantize(x.dtype)
        return jnp.einsum(spec.explicit, xd, wd, preferred_element_type=jnp.float32).astype(
            out_dtype
        )


# ---------------------------------------------------------------------- einsum plumbing
@dataclasses.dataclass(frozen=True)
class _Spec:
    explicit: str  # the equation with "..." replaced by lowercase letters
    x: str
    w: str
    out: str
    contract: str  # letters in x and w but not out: the weight's trailing num_contract axes
    x_rest: str  # x's other letters, in x order


# Letters for "..." axes, then the two K sub-axes of the blocked form (K block, within block).
_ELLIPSIS_LETTERS = "abcdefghijklmnopqrstuvwx"
_KB, _KI = "y", "z"


def _parse_eqn(eqn: str, x_ndim: int, w: Fp8Weight) -> _Spec:
    """Checks ``eqn`` against the weight's layout: contracted letters are w's trailing axes."""
    lhs, out = eqn.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    if "..." in ws:
        raise ValueError(f"Fp8Weight.project: the weight side of {eqn!r} cannot use '...'")
    if "..." in xs:
        ell = _ELLIPSIS_LETTERS[: x_ndim - (len(xs) - 3)]
        xs, out = xs.replace("...", ell), out.replace("...", ell)
    contract = "".join(c for c in ws if c in xs and c not in out)
    ok = (
        len(xs) == x_ndim
        and len(ws) == w.ndim
        and len(contract) == w.num_contract
        and ws.endswith(contract)
        and all(c in out for c in ws if c not in contract)
    )
    if not ok:
        raise ValueError(
            f"Fp8Weight.project: equation {eqn!r} does not match a weight of shape {w.shape} "
            f"whose last {w.num_contract} axes are contracted, with an activation of rank "
            f"{x_ndim}"
        )
    x_rest = "".join(c for c in xs if c not in contract)
    return _Spec(f"{xs},{ws}->{out}", xs, ws, out, contract, x_rest)


def _transpose_to(a: Array, have: str, want: str) -> Array:
    return jnp.transpose(a, [have.index(c) for c in want])


def _quantize_x(x: Array, spec: _Spec):
    """x -> ``(q [*rest, K] e4m3, scale [*rest, KB] f32, transposed shape)``: the
    contracted axes moved last (in the weight's order) and flattened to K."""
    xt = _transpose_to(x, spec.x, spec.x_rest + spec.contract)
    lead = xt.shape[: len(spec.x_rest)]
    q, s = quant.quantize_activations(xt.reshape(*lead, -1))
    return q, s, xt.shape


def _fake_quant_contract(x: Array, spec: _Spec) -> Array:
    """x quantized per token per 128-group of its (flattened) contraction, dequantized."""
    q, s, tshape = _quantize_x(x, spec)
    xd = quant.dequantize_activations(q, s, dtype=x.dtype).reshape(tshape)
    return _transpose_to(xd, spec.x_rest + spec.contract, spec.x)


def _split_k(a: Array, k: int) -> Array:
    """``[..., K] -> [..., KB, 128]``, zero-padded (padding adds exactly 0 to every sum)."""
    kb = -(-k // quant.BLOCK)
    pad = kb * quant.BLOCK - k
    if pad:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    return a.reshape(*a.shape[:-1], kb, quant.BLOCK)


def _project_fp8_blocks(x: Array, w: Fp8Weight, spec: _Spec) -> Array:
    """FP8 x FP8 dot per 128-wide K block (f32 results), scaled, summed over blocks."""
    q, xs, _ = _quantize_x(x, spec)
    w_rest = spec.w[: len(spec.w) - w.num_contract]
    rest_shape = w.shape[: len(w_rest)]
    k = math.prod(w.shape[len(w_rest) :])
    xq = _split_k(q, k)  # [*x_rest, KB, 128]
    wq = _split_k(w.values.reshape(*rest_shape, k), k)  # [*w_rest, KB, 128]
    kb, ki = _KB, _KI
    partial = jnp.einsum(
        f"{spec.x_rest}{kb}{ki},{w_rest}{kb}{ki}->{spec.out}{kb}",
        xq,
        wq,
        preferred_element_type=jnp.float32,
    )  # [*out, KB]: one f32 partial sum per 128-wide K block
    ws = w.scales_nk().reshape(*rest_shape, -1)  # [*w_rest, KB]
    return jnp.einsum(f"{spec.out}{kb},{spec.x_rest}{kb},{w_rest}{kb}->{spec.out}", partial, xs, ws)


def pallas_gemm_unsupported(x: Array, w: Fp8Weight, spec: _Spec) -> str | None:
    """None if the ``"pallas"`` form can run this projection here, else the reason."""
    w_rest = spec.w[: len(spec.w) - w.num_contract]
    layout_ok = spec.x == spec.x_rest + spec.contract and spec.out == spec.x_rest + w_rest
    if w.granularity != "block":
        return "needs 128x128 block scales"
    if w.num_batch or not layout_ok:
        return f"needs x[rest, contract] @ w[out, contract] with no batch axes, got {spec.explicit}"
    n, k = _view_2d(w.shape, 0, w.num_contract)
    weights = (jax.ShapeDtypeStruct((1, n, k), w.values.dtype),)
    return grouped_gemm_supported(x, weights)


def _one_group_gemm(
    x, weights: tuple, n: int, k: int, bias=None, activation: str | None = None
) -> Array:
    """Rows of ``x`` (an array or `quant.QuantizedActivations`, read as they are) against one
    ``[N, K]`` weight (block-FP8 `Fp8Weight` or a bf16 array), or the (gate, up) pair whose
    SwiGLU the kernel fuses, as ONE static group of the Pallas grouped GEMM: bf16 ``[M, N]``.
    A bf16 ``x`` meeting FP8 weights is quantized per token per 128 inside; the tile table is
    a program constant (NumPy group sizes). ``bias`` / ``activation``: the kernel's one-weight
    epilogue (`step3_jax.kernels.grouped_gemm.grouped_matmul`)."""
    x_scale = None
    if isinstance(x, quant.QuantizedActivations):  # quantized already: the kernel's format
        x, x_scale = x.values, x.scales.reshape(-1, -(-k // quant.BLOCK))
    x2 = x.reshape(-1, k)
    fp8 = isinstance(weights[0], Fp8Weight)
    return grouped(
        x2,
        tuple((w.values if fp8 else w).reshape(1, n, k) for w in weights),
        np.array([x2.shape[0]], np.int32),
        x_scale=x_scale,
        w_scales=tuple(w.scales[None] for w in weights) if fp8 else (),
        implementation="pallas",
        config=dense_config(jax.devices()[0].device_kind, x2.shape[0], n, k, fp8=fp8),
        bias=bias,
        activation=activation,
    )


def _project_pallas(x: Array, w: Fp8Weight, spec: _Spec) -> Array:
    """x [*rest, *contract] @ w[N, K]^T through the Pallas grouped GEMM with one group."""
    n, k = _view_2d(w.shape, 0, w.num_contract)
    lead = x.shape[: len(spec.x_rest)]
    out = _one_group_gemm(x, (w,), n, k)
    return out.reshape(*lead, *w.shape[: w.ndim - w.num_contract])


def swiglu_hidden_fused(x: Array, w_gate, w_up, implementation: str | None = None) -> Array | None:
    """``silu(x @ w_gate^T) * (x @ w_up^T)`` [..., F] bf16 in ONE Pallas launch (the grouped
    kernel's fused gate/up with one static group: both weights streamed by one kernel, SwiGLU in
    its epilogue from the f32 accumulators), or None where that kernel does not run: weights
    that are not both 2-D block-scaled `Fp8Weight` [F, D], an XLA ``implementation``, a
    float32 model, or a device/shape the dispatch rule sends elsewhere. The caller then runs
    the two projections (`step3_jax.layers.mlp.swiglu`).

    Against the two-projection form the gate and up results are not rounded to bf16 before
    the SwiGLU: the hidden activation differs by at most ~2 bf16 ulps."""
    both = isinstance(w_gate, Fp8Weight) and isinstance(w_up, Fp8Weight)
    if not both or implementation in ("xla", "xla_fp8"):
        return None
    if w_gate.values.ndim != 2 or w_gate.shape != w_up.shape or w_up.granularity != "block":
        return None
    if isinstance(x, quant.QuantizedActivations) and x.dtype != jnp.bfloat16:
        return None
    spec = _parse_eqn("...D,FD->...F", x.ndim, w_gate)
    rows = x.values if isinstance(x, quant.QuantizedActivations) else x
    reason = pallas_gemm_unsupported(rows, w_gate, spec)
    if dispatch.choose("fp8_linear", implementation, reason) != "pallas":
        return None
    (f, d), lead = w_gate.shape, x.shape[:-1]
    return _one_group_gemm(x, (w_gate, w_up), f, d).reshape(*lead, f)


def _fused_linear_unsupported(x: Array, w) -> str | None:
    """None if `linear_activation_fused`'s Pallas launch can run ``x @ w^T`` here, else why."""
    if isinstance(w, Fp8Weight):
        if w.values.ndim != 2 or w.granularity != "block":
            return "needs a 2-D block-scaled FP8 weight [N, K]"
        if x.dtype != jnp.bfloat16:
            return f"needs bf16 activations with an FP8 weight, got {x.dtype}"
        return pallas_gemm_unsupported(x, w, _parse_eqn("...K,NK->...N", x.ndim, w))
    if getattr(w, "ndim", 0) != 2:
        return "needs a 2-D weight [N, K] (a bf16 array or a block-FP8 Fp8Weight)"
    if not x.dtype == w.dtype == jnp.bfloat16:
        return f"needs bf16 activations and weight, got x {x.dtype} and w {w.dtype}"
    return grouped_gemm_supported(x, (jax.ShapeDtypeStruct((1, *w.shape), w.dtype),))


def linear_activation_fused(
    x: Array,
    w,
    bias,
    activation: str,
    implementation: str | None = None,
    gemm: str | None = None,
) -> Array | None:
    """``activation(x @ w^T + bias)`` [..., N] in ONE Pallas launch (the grouped kernel with
    one static group; bias and activation in its epilogue on the f32 accumulator, one bf16
    rounding), or None where the caller should run the linear and the activation itself.

    ``implementation`` (`KernelPolicy.vision_mlp`) follows the kernels' one dispatch rule:
    "xla" never fuses; "pallas" fuses or raises with the reason; None fuses where the kernel
    runs (a bf16 array or 2-D block-FP8 `Fp8Weight` ``w`` [N, K], bf16 ``x``, Hopper, N and K
    multiples of 128). A block-FP8 weight also follows ``gemm`` (`KernelPolicy.gemm`): its
    XLA forms keep it out of the kernel. ``bias``: [N] or None (an `nnx.Param` is read).

    Why: a GEMM followed by an elementwise activation writes its output and reads it back
    once more. The vision tower's fc1 + quick_gelu at 728 px ([2,712, 15,360] bf16) spent
    58 us a layer in that pass on an H100 (`benchmarks/bench_vision_mlp.py`)."""
    if implementation == "xla" or (isinstance(w, Fp8Weight) and gemm in ("xla", "xla_fp8")):
        return None
    n, k = w.shape[-2:] if getattr(w, "ndim", 0) >= 2 else (None, None)
    if k is not None and x.shape[-1] != k:
        raise ValueError(
            f"x must be [..., K={k}] for a weight of shape {tuple(w.shape)}, got {x.shape}"
        )
    reason = _fused_linear_unsupported(x, w)
    if dispatch.choose("fused_linear", implementation, reason) != "pallas":
        return None
    b = None if bias is None else jnp.asarray(bias[...])
    out = _one_group_gemm(x, (w,), n, k, bias=b, activation=activation)
    return out.reshape(*x.shape[:-1], n)


def _row_offsets(sizes) -> list[int]:
    """Start row of each part and the total: ``[0, n_0, n_0 + n_1, ..., sum n_i]``; each
    size an integer >= 1 (``(300, -44)`` cut a 256-row weight into 300 rows and none)."""
    check_sizes("row sizes", **{f"sizes[{i}]": n for i, n in enumerate(sizes)})
    out = [0]
    for n in sizes:
        out.append(out[-1] + int(n))
    return out


def _check_fp8_rows(weights, names) -> None:
    """Raises unless the `Fp8Weight` parts concatenate along rows EXACTLY (see `concat_rows`)."""
    w0 = weights[0]
    for w, name in zip(weights, names, strict=True):
        same = (w.granularity, w.num_contract) == (w0.granularity, 1)
        if w.ndim != 2 or w.num_batch or not same:
            raise ValueError(
                f"concat_rows: {name} must be a 2-D Fp8Weight [N, K] (num_contract=1, no batch "
                f"axis) with the granularity of {names[0]} ({w0.granularity}); "
                f"got shape {w.shape}, {w.granularity}, num_contract={w.num_contract}"
            )
    if w0.granularity == "block":
        for w, name in zip(weights[:-1], names[:-1], strict=True):
            if w.shape[0] % quant.BLOCK:
                raise ValueError(
                    f"concat_rows: {name} has {w.shape[0]} rows, not a multiple of "
                    f"{quant.BLOCK}: its last 128-row scale block would cover rows of the next "
                    "weight, so block-FP8 rows do not concatenate exactly (quantize with "
                    'granularity="channel", or keep the weights separate)'
                )


def concat_rows(
    weights: Sequence[Float[Array, "_ K"] | Fp8Weight], names: Sequence[str] | None = None
) -> Float[Array, "M K"] | Fp8Weight:
    """ONE ``[sum N_i, K]`` weight from 2-D weights ``[N_i, K]`` that share their input.

    Plain arrays (all of one dtype) are concatenated; `Fp8Weight` parts (all of one
    granularity) concatenate their ``values`` and ``scales`` along rows, which is
    EXACT (the fused weight dequantizes to the concatenation of the parts' dequantized values,
    and splits back bitwise with `split_rows`) when the scales are per channel, or when they
    are 128x128 blocks and every part but the last has a multiple of 128 rows (no scale block
    straddles two parts). Anything else raises ValueError naming the offending part.
    """
    names = tuple(names or (f"weights[{i}]" for i in range(len(weights))))
    if len(weights) < 2 or len(names) != len(weights):
        raise ValueError(f"concat_rows needs >= 2 weights (one name each), got {len(weights)}")
    fp8 = [isinstance(w, Fp8Weight) for w in weights]
    for w, name in zip(weights, names, strict=True):
        if len(w.shape) != 2 or w.shape[1] != weights[0].shape[1]:
            raise ValueError(
                f"concat_rows: {name} has shape {tuple(w.shape)}; every weight must be "
                f"[N_i, K] with the K={weights[0].shape[1]} of {names[0]} (same input width)"
            )
    if any(fp8) and not all(fp8):
        raise ValueError(
            f"concat_rows: {names} mix Fp8Weight and plain arrays ({fp8}); quantize all or none"
        )
    if not any(fp8):
        dtypes = {jnp.dtype(w.dtype) for w in weights}
        if len(dtypes) != 1:
            raise ValueError(
                f"concat_rows: {names} have different dtypes {sorted(map(str, dtypes))}"
            )
        return jnp.concatenate([jnp.asarray(w) for w in weights])
    _check_fp8_rows(weights, names)
    w0 = weights[0]
    values = jnp.concatenate([w.values for w in weights])
    scales = jnp.concatenate([w.scales for w in weights])
    return Fp8Weight(values, scales, 1, w0.granularity)


def _scale_rows(w) -> int:
    """Weight rows per scale row: 128 for block scales, 1 per channel or for a plain array."""
    return quant.BLOCK if isinstance(w, Fp8Weight) and w.granularity == "block" else 1


def rows_split_exactly(w: Float[Array, "M K"] | Fp8Weight, sizes: Sequence[int]) -> bool:
    """Whether `split_rows` can cut ``w`` into ``sizes``: no cut inside a scale block."""
    return not any(o % _scale_rows(w) for o in _row_offsets(sizes)[1:-1])


def split_rows(w: Float[Array, "M K"] | Fp8Weight, sizes: Sequence[int]) -> tuple:
    """The inverse of `concat_rows`: ``w [sum(sizes), K]`` cut into ``[sizes[i], K]`` parts
    (bitwise; an `Fp8Weight` is cut along its values and its scale rows)."""
    offs = _row_offsets(sizes)
    if len(w.shape) != 2 or w.shape[0] != offs[-1]:
        raise ValueError(
            f"split_rows: weight of shape {tuple(w.shape)} cannot be cut into rows {tuple(sizes)}"
            f" (need a 2-D weight with {offs[-1]} rows)"
        )
    if not isinstance(w, Fp8Weight):
        return tuple(w[a:b] for a, b in zip(offs[:-1], offs[1:], strict=True))
    if w.num_contract != 1 or w.num_batch:
        raise ValueError(f"split_rows: Fp8Weight needs num_contract=1 and no batch axis, got {w}")
    blk = _scale_rows(w)
    if not rows_split_exactly(w, sizes):
        raise ValueError(
            f"split_rows: cuts at rows {offs[1:-1]} are not multiples of {blk}: a block-FP8 "
            "scale block would be shared by two parts"
        )
    parts = []
    for a, b in zip(offs[:-1], offs[1:], strict=True):
        s = w.scales[a // blk : -(-b // blk)]
        parts.append(Fp8Weight(w.values[a:b], s, 1, w.granularity))
    return tuple(parts)


def split_fp8(w) -> tuple[Array, Array | None]:
    """``(values, block scales)`` of an `Fp8Weight`, ``(w, None)`` for a plain array."""
    if isinstance(w, Fp8Weight):
        if w.granularity != "block":
            raise ValueError("kernels take 128x128 block scales; got a per-channel Fp8Weight")
        return w.values, w.scales
    return w, None


# ---------------------------------------------------------------------- precision modes
@dataclasses.dataclass(frozen=True)
class Precision:
    """A precision mode: ``"bf16"``, ``"fp8"`` or ``"fp8+kv8"`` (see the module docstring)."""

    name: str

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.name!r}")

    @property
    def fp8_weights(self) -> bool:
        return self.name != "bf16"

    @property
    def cache_dtype(self):
        """KV-cache dtype of this mode (None: the model's compute dtype)."""
        return quant.FP8_DTYPE if self.name == "fp8+kv8" else None


# (module class name, attribute) -> (num_batch, num_contract) of its linear weights.
# ``qkv_proj`` is the fused q/k/v weight of an `MFAttention` after `fuse_qkv`: it is
# quantized part by part (`_quantize_fused_qkv`), never as one matrix.
_LINEARS = {
    ("MFAttention", "q_proj"): (0, 1),
    ("MFAttention", "k_proj"): (0, 1),
    ("MFAttention", "v_proj"): (0, 1),
    ("MFAttention", "qkv_proj"): (0, 1),
    ("MFAttention", "wq"): (0, 1),
    ("MFAttention", "o_proj"): (0, 2),
    ("SwiGLU", "gate_proj"): (0, 1),
    ("SwiGLU", "up_proj"): (0, 1),
    ("SwiGLU", "down_proj"): (0, 1),
    ("MoE", "gate_proj"): (1, 1),
    ("MoE", "up_proj"): (1, 1),
    ("MoE", "down_proj"): (1, 1),
}


def _quantize_fused_qkv(attn, **kw) -> Fp8Weight:
    """A float fused ``qkv_proj`` quantized as its q/k/v parts, then concatenated: the same
    FP8 values and scales as quantizing the separate weights (block scales never straddle
    two parts; `concat_rows` raises where they would)."""
    parts = split_rows(attn.qkv_proj[...], attn.qkv_sizes)
    parts = [Fp8Weight.quantize(w, **kw) for w in parts]
    return concat_rows(parts, names=("q_proj", "k_proj", "v_proj"))


def _attention_modules(model: nnx.Module) -> list:
    return [n for _, n in nnx.iter_graph(model) if type(n).__name__ == "MFAttention"]


def fuse_qkv(model: nnx.Module, *, strict: bool = True) -> nnx.Module:
    """Calls `MFAttention.fuse_qkv` on every (unfused) MFAttention of ``model``, in place.

    ``q_proj [R, D]``, ``k_proj [H, D]``, ``v_proj [H, D]`` become ONE ``qkv_proj [R + 2H, D]``
    param (float or `Fp8Weight`), so ``qkv`` runs one projection with no per-call concatenation.
    With ``strict=False`` attention layers whose weights do not concatenate exactly (block-FP8
    with R not a multiple of 128) are left unfused instead of raising. Returns ``model``;
    raises ValueError if ``model`` holds no MFAttention.
    """
    return _fuse_all_qkv(model, strict)


def _fuse_all_qkv(model: nnx.Module, strict: bool) -> nnx.Module:
    # Separate from `fuse_qkv` because `quantize_model`'s keyword of that name shadows it.
    attns = _attention_modules(model)
    if not attns:
        raise ValueError(f"fuse_qkv found no MFAttention in {type(model).__name__}")
    for a in attns:
        if a.fused_qkv:
            continue
        try:
            a.fuse_qkv()
        except ValueError:
            if strict:
                raise
    return model


def quantize_model(
    model: nnx.Module,
    precision: str | Precision = "fp8",
    *,
    granularity: str = "block",
    quantize_lm_head: bool = False,
    fuse_qkv: bool | None = None,
) -> nnx.Module:
    """Replaces (in place) every linear weight except the router with an `Fp8Weight`.

    ``"bf16"`` leaves the model unchanged. Returns ``model``. Weights that already are
    `Fp8Weight` (e.g. loaded from a block-FP8 checkpoint) are kept. For ``"fp8+kv8"`` create
    the cache with ``Precision("fp8+kv8").cache_dtype``.

    ``fuse_qkv``: after quantizing (so the scales are those of the separate weights), store
    each MFAttention's q/k/v weights as ONE ``qkv_proj`` (`fuse_qkv`): one GEMM instead of
    three (at decode sizes the narrow k/v GEMMs are latency-bound: k_proj [256, 7168] streamed
    at 88 GB/s on an H100, docs/LOG.md). None (default): fuse where the rows concatenate
    exactly (block scales: q/k widths multiples of 128, as in Step-3), else leave them
    separate; True: fuse or raise; False: never fuse. An already fused
    model stays fused (its float ``qkv_proj`` is quantized part by part).
    """
    prec = precision if isinstance(precision, Precision) else Precision(precision)
    if not prec.fp8_weights:
        return _fuse_all_qkv(model, strict=True) if fuse_qkv else model
    kw = dict(granularity=granularity)
    count = 0
    for _, node in nnx.iter_graph(model):
        for (cls_name, attr), (nb, nc) in _LINEARS.items():
            if type(node).__name__ != cls_name or not hasattr(node, attr):
                continue
            param = getattr(node, attr)
            if isinstance(param[...], Fp8Weight):
                pass
            elif attr == "qkv_proj":
                param.set_value(_quantize_fused_qkv(node, **kw))
            else:
                param.set_value(Fp8Weight.quantize(param[...], num_batch=nb, num_contract=nc, **kw))
            count += 1
    if quantize_lm_head and hasattr(model, "lm_head"):
        model.lm_head.set_value(Fp8Weight.quantize(model.lm_head[...], **kw))
    if count == 0:
        raise ValueError("quantize_model found no MFAttention/SwiGLU/MoE linear weights")
    if fuse_qkv or (fuse_qkv is None and _attention_modules(model)):
        _fuse_all_qkv(model, strict=bool(fuse_qkv))
    return model


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of all parameters (FP8 values + scales for quantized weights)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves))


__all__ = [
    "GRANULARITIES",
    "PRECISIONS",
    "Fp8Weight",
    "Precision",
    "concat_rows",
    "fuse_qkv",
    "quantize_model",
    "split_fp8",
    "split_rows",
    "weight_bytes",
]
