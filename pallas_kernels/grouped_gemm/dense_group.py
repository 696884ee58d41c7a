"""One more group in a grouped GEMM launch, with dense weights of its own (a shared expert).

A `DenseGroup` rides the routed groups' persistent launch: its rows are a static range of
x placed after the routed rows, its weights ``[N_d, K_d]`` are a separate operand with their
own N and K (N_d <= N, K_d <= K). It reads columns ``[0, K_d)`` of its rows of x and writes
columns ``[0, N_d)`` of its rows of the output; columns ``[N_d, N)`` of those rows are left
unspecified. The MoE layer uses it for the always-on shared expert: its compute-bound tiles
then run while the routed tiles stream their weights (docs/LOG.md, "Grouped GEMM", the
shared expert in the routed launch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from step3_jax import quant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseGroup:
    """Weights (and FP8 block scales) of a dense group over rows ``[row0, row0 + rows)``.

    Attributes:
      weights: ``(w,)`` or ``(w_gate, w_up)``, each ``[N_d, K_d]`` ([out, in]), the routed
        weights' dtype.
      w_scales: ``()`` for bf16 weights, else one ``[N_d/128, K_d/128]`` f32 per weight.
      row0: first row of the group in x (static; a multiple of 8 for the Mosaic GPU kernel).
      rows: number of rows (static, >= 1).
    """

    weights: tuple
    w_scales: tuple
    row0: int = dataclasses.field(metadata=dict(static=True))
    rows: int = dataclasses.field(metadata=dict(static=True))

    @property
    def n(self) -> int:
        return self.weights[0].shape[0]

    @property
    def k(self) -> int:
        return self.weights[0].shape[1]

    def check(self, m: int, n: int, k: int, n_w: int, fp8: bool) -> None:
        """Raises ValueError unless the group fits a launch of x [m, k] and weights
        ``n_w`` x [G, n, k] (FP8 iff ``fp8``)."""
        if len(self.weights) != n_w:
            got = len(self.weights)
            raise ValueError(f"dense group: {n_w} weight(s) like the routed ones, got {got}")
        w0 = self.weights[0]
        for w in self.weights:
            if w.ndim != 2 or w.shape != w0.shape:
                raise ValueError(f"dense group: weights must be [N_d, K_d] alike, got {w.shape}")
            if (w.dtype == quant.FP8_DTYPE) != fp8:
                raise ValueError(f"dense group: weights {w.dtype} with routed FP8={fp8}")
        if not (1 <= self.n <= n and 1 <= self.k <= k):
            raise ValueError(f"dense group: weights [N_d, K_d] = {w0.shape} must fit N={n}, K={k}")
        if not (0 <= self.row0 and self.rows >= 1 and self.row0 + self.rows <= m):
            raise ValueError(
                f"dense group: rows [{self.row0}, {self.row0 + self.rows}) must lie in x's {m}"
            )
        want = (-(-self.n // quant.BLOCK), -(-self.k // quant.BLOCK))
        scales = self.w_scales
        bad = lambda s: tuple(s.shape) != want or s.dtype != jnp.float32  # noqa: E731
        if fp8 and (len(scales) != n_w or any(bad(s) for s in scales)):
            got = [f"{s.dtype} {tuple(s.shape)}" for s in scales]
            raise ValueError(f"dense group: w_scales must be {n_w} x f32 {want}, got {got}")
        if not fp8 and scales:
            raise ValueError("dense group: w_scales only with float8_e4m3fn weights")
