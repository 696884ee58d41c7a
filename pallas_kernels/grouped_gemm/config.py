"""Tuning configuration for the grouped GEMM kernels, with tables for H100 and H200.

A tile is ``block_m`` rows of ONE group (rows are taken from the group's own start, not from a
``block_m``-aligned grid, so a small group never straddles two tiles and its expert weights are
streamed once per tile) times ``block_n`` output columns. The K loop runs in 128-wide steps
(one FP8 scale block; 64 for bf16 so each SMEM row is one 128-byte swizzle line).
"""

from __future__ import annotations

import dataclasses

# Row tile of one Hopper warpgroup wgmma (M = 64 per warpgroup instruction).
_WGMMA_M = 64
SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Tile shape and pipeline depth of the Mosaic GPU grouped GEMM.

    Attributes:
      block_m: rows per tile; a multiple of 64 (one warpgroup wgmma row block), at most 128
        (register budget: the f32 accumulator is block_m * block_n / 128 registers per thread).
      block_n: output columns per tile; 64 or 128 so that one tile lies inside one 128-wide
        weight-scale block (the per-block scale is then a scalar per K step).
      max_concurrent_steps: TMA pipeline depth (K steps in flight); 2..8.
      swiglu_block_n: block_n of the fused gate/up kernel (two accumulators live at once, so
        it is usually half of block_n).
      num_compute_wgs: 1 (one warpgroup issues TMA and computes) or 2 (warp-specialized:
        two compute warpgroups and one TMA warpgroup; the CTA tile doubles along wg_dim).
      wg_dim: "n" (each compute warpgroup owns block_n columns: good when groups are small)
        or "m" (each owns block_m rows: better reuse of the x tile... and of w at large M).
      num_sms: persistent-grid size; None means the device's SM count.
    """

    block_m: int = 64
    block_n: int = 128
    max_concurrent_steps: int = 4
    swiglu_block_n: int = 64
    num_compute_wgs: int = 1
    wg_dim: str = "n"
    num_sms: int | None = None

    def __post_init__(self):
        if self.block_m % _WGMMA_M or not _WGMMA_M <= self.block_m <= 128:
            raise ValueError(f"{self.block_m=} must be 64 or 128 (a multiple of the wgmma M=64)")
        for name in ("block_n", "swiglu_block_n"):
            v = getattr(self, name)
            if v not in (64, 128):
                raise ValueError(f"{name}={v} must be 64 or 128 (inside one 128-wide scale block)")
        if not 2 <= self.max_concurrent_steps <= 8:
            raise ValueError(f"{self.max_concurrent_steps=} must be in [2, 8]")
        if self.num_compute_wgs not in (1, 2):
            raise ValueError(f"{self.num_compute_wgs=} must be 1 or 2")
        if self.wg_dim not in ("m", "n"):
            raise ValueError(f"{self.wg_dim=} must be 'm' or 'n'")
        if self.num_sms is not None and self.num_sms < 1:
            raise ValueError(f"{self.num_sms=} must be a positive SM count or None")


# Tuned tables: device kind substring -> list of (max rows M, config); the first entry whose
# M bound is >= the call's M wins. H100 from the sweeps in benchmarks/results/moe_h100*.json
# (docs/LOG.md, topic grouped_gemm), FP8 gate/up + down at Step-3 shapes, E=48:
# * M <= 1536 (T <= 512): one warpgroup; weight streaming at 2.4-2.7 TB/s.
# * M = 3072 (T = 1024): 2 compute warpgroups splitting M (CTA 128x128, 6 steps) 2.655 ms
#   vs one warpgroup 2.715, vs split-N 2.971.
# * M = 6144 and 24576: 2 compute warpgroups splitting N (CTA 64x256): gate/up 456 and 762
#   TFLOP/s vs 344 and 485 with one warpgroup and 429 and 572 split-M (4 steps).
# H200 (2026-11-22, benchmarks/results/moe_h200_tune.json, one run of
# benchmarks/gpu_h200_tune.sh): 2 compute warpgroups splitting N (CTA 64x256, 4 steps) won at
# every T swept (64, 512, 2048, 8192), e.g. gate/up at T=64 0.884 ms (3.90 TB/s) vs 0.941 with
# one warpgroup, at T=2048 1.508 ms vs 1.734 split-M; T=1024 (M=3072) was not swept.
_SMALL = TuningConfig(block_m=64, block_n=128, max_concurrent_steps=4)
_MID = TuningConfig(block_m=64, block_n=128, num_compute_wgs=2, wg_dim="m", max_concurrent_steps=6)
_LARGE = TuningConfig(block_m=64, block_n=128, num_compute_wgs=2, wg_dim="n")
TUNED: dict[str, list[tuple[int, TuningConfig]]] = {
    "H100": [(1536, _SMALL), (4096, _MID), (1 << 62, _LARGE)],
    "H200": [(1 << 62, _LARGE)],
}

DEFAULT = TuningConfig()


def tuned_config(device_kind: str, m: int) -> TuningConfig:
    """The checked-in config for a device kind (e.g. ``"NVIDIA H100 80GB HBM3"``) and M rows."""
    for key, table in TUNED.items():
        if key in device_kind:
            for bound, cfg in table:
                if m <= bound:
                    return cfg
    return DEFAULT


# Dense FP8 GEMMs (one group) of the attention half at decode sizes, H100, M = 128 rows
# (benchmarks/results/dense_fp8_h100.json, CUPTI us): q_proj [2048, 7168] 25.1 -> 21.5 and
# k_proj [256, 7168] 24.2 -> 20.8 with 64x64 tiles (more CTAs for a narrow N); wq [16384, 2048]
# 19.0 -> 15.0 with a 128x128 two-warpgroup CTA; o_proj [7168, 16384] 58.0 -> 53.9 with 128x64.
# The narrow ones stay latency-bound (88 GB/s for k_proj): fusing q/k/v into one N=2560 GEMM
# is the next step, not a tile choice.
_DENSE_NARROW = TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6)
_DENSE_2WG_M_128X128 = TuningConfig(
    block_m=64, block_n=128, num_compute_wgs=2, wg_dim="m", max_concurrent_steps=6
)
_DENSE_2WG_M_128X64 = TuningConfig(
    block_m=64, block_n=64, num_compute_wgs=2, wg_dim="m", max_concurrent_steps=6
)


# M = 256 and 512 (benchmarks/results/dense_fp8_h100_m256_cd0f7bd.json, H100 CUPTI us). At
# M = 256 the M = 128 choices held for q_proj / k_proj (64x64: 21.8 / 21.3), the fused
# qkv_proj [2560, 7168] (128x64: 25.0) and wq (128x128: 25.1), but o_proj [7168, 16384] took
# 100.6 us with 128x64 against 65.5 with 128x128: with two M tiles a CTA, the wider N tile
# halves how often the long K is walked. At M = 512 the two-warpgroup 64x256 N split (the
# grouped table's _LARGE) is the fastest for every N >= 2560 (qkv_proj 29.6, wq 42.0, o_proj
# 122.1 us), the one-warpgroup 64x128 for q_proj (26.0) and 64x64 for k_proj (21.8).
# A dense bf16 GEMM at large M (the vision tower's fc1: M = 2,712 tokens, 1,792 -> 15,360): the
# 128 x 256 CTA (two warpgroups of 128 x 128 along N) matched cuBLAS, 210 us, against 217-299 us
# for the other tiles swept (H100, benchmarks/results/vision_mlp_h100_66fd93c.json). Only that
# one shape was measured; N must be a multiple of the 256-wide CTA.
_BF16_LARGE_M = 1024
_BF16_WIDE = TuningConfig(block_m=128, block_n=128, num_compute_wgs=2, wg_dim="n")


def dense_config(device_kind: str, m: int, n: int, k: int, fp8: bool = True) -> TuningConfig:
    """Config for a dense (one-group) GEMM of m rows and an [n, k] weight: for FP8 the
    measured decode-size choices above for M <= 512 (the same on every Hopper: only H100 was
    swept), else the grouped table; for bf16 (``fp8=False``) the 128 x 256 tile at
    M >= 1,024 where N allows it, else the grouped table."""
    if not fp8:
        wide = m >= _BF16_LARGE_M and n % (2 * _BF16_WIDE.block_n) == 0
        return _BF16_WIDE if wide else tuned_config(device_kind, m)
    if m > 512:
        return tuned_config(device_kind, m)
    if m > 256:
        return _DENSE_NARROW if n <= 256 else _SMALL if n <= 2048 else _LARGE
    if n <= 2048:
        return _DENSE_NARROW
    if k <= 4096:
        return _DENSE_2WG_M_128X128
    return _DENSE_2WG_M_128X64 if m <= 128 or n <= 4096 else _DENSE_2WG_M_128X128
