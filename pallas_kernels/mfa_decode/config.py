"""Tuning configuration for the Mosaic GPU MFA decode-attention kernel, with tuned tables.

One CTA handles one (query token t, sequence b, split j). It has three warpgroups: a memory
warpgroup that streams K/V tiles of ``block_s`` tokens into a ring of ``num_stages`` shared-memory
slots with TMA, and two compute warpgroups that both compute the full [64 heads x block_s] score
tile (cheap: FP8/bf16 wgmma) but each own one half (128 columns) of the head dim for P.V. That
split keeps each accumulator at 64 x 128 f32 (64 registers per thread) and needs no cross-
warpgroup combine at the end.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from step3_jax.kernels.mfa_decode import splitk

# Hopper has 227 KiB of shared memory per block (opt-in maximum).
SMEM_LIMIT_BYTES = 227 * 1024
# Alignment padding between allocations and the barriers (measured: ~2.6 KiB on jax 0.10.2).
SMEM_SLACK_BYTES = 4 * 1024
# The split-K rule before the cost model (``min_tokens_num_splits``): every split kept at least
# this many KV tokens. Kept to read the sweeps taken under it (98b0a31).
MIN_TOKENS_PER_SPLIT = 512


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Static kernel parameters (hashable: used as a jit static argument)."""

    # KV tokens per pipeline step: N of the QK wgmma and K of the P.V wgmma. The WGMMA register
    # layout needs a multiple of 64 rows for the V tile, so 64 or 128.
    block_s: int = 64
    # Depth of the TMA ring (K, V and their scales per slot). >= 2 to overlap copy and math.
    num_stages: int = 4
    # Split-K over the sequence: None picks enough splits to fill the GPU (see choose_num_splits).
    num_splits: int | None = None
    # FP8 cache: register layout used to read the V tile for its e4m3 -> f16 conversion:
    # "8bit" (32-bit shared loads, 4 values a thread) or "wgmma" (16-bit loads, 2 values).
    v_load: str = "8bit"
    # What the two compute warpgroups split: "head" (each owns 128 of the 256 output columns,
    # both run QK + softmax on every block) or "seq" (alternate KV blocks, each runs QK +
    # softmax only on its own blocks; states merged in shared memory at the end). "seq" needs
    # an even num_stages so a ring slot always belongs to the same warpgroup.
    wg_split: str = "head"
    # FP8 cache: where q is quantized to e4m3 per row: "xla" (three small XLA kernels before
    # the call, ~8 us on H100) or "kernel" (warpgroup 0 reads bf16 q from GMEM and quantizes it
    # into shared memory; the tuned FP8 default: 2.3 us faster at B=128 4K on H100).
    q_quant: str = "xla"
    # q_quant="kernel": bf16 q reaches shared memory by TMA (issued first by the memory
    # warpgroup, into the memory of the not-yet-used f16 V tile) instead of per-thread GMEM
    # loads by warpgroup 0, which both compute warpgroups wait for.
    q_tma: bool = False
    # wg_split="seq" (num_stages >= 4, block_s = 64): the end-of-kernel exchange (wg 1 -> wg 0)
    # and the output staging use ring slots the finished loop no longer needs: one handshake
    # instead of four and four output TMA stores in flight at once, and no separate tiles.
    ring_epilogue: bool = False
    # FP8 cache, wg_split="seq": who converts the e4m3 V tile to the f16 P.V operand.
    # "compute" (default): each compute warpgroup, in registers, between its softmax and its
    # P.V. "memory": the (otherwise idle) memory warpgroup converts each whole [64, 256] tile
    # into one of two f16 buffers (block i -> buffer i % 2, i.e. one per compute warpgroup),
    # so the compute warpgroups run QK, softmax and one N=256 P.V wgmma only. Costs 32 KiB
    # more shared memory (a second f16 tile): at 4 stages it needs ring_epilogue.
    v_convert: str = "compute"
    # Ragged batches: instead of the (split, sequence) grid sized from the cache capacity, an
    # XLA pre-pass cuts each sequence's VISIBLE blocks into pieces of about the same size
    # (at most ``ragged_max_splits`` a sequence, about ``ragged_items_per_sm`` pieces an SM in
    # all), longest pieces first, one CTA each; their partials are merged per sequence
    # (ragged.py). Off by default until measured; num_splits is ignored when on.
    ragged: bool = False
    ragged_items_per_sm: float = 1.5
    ragged_max_splits: int = 4
    # Unsplit grid of more CTAs than SMs (B * T > SMs, num_splits = 1): hand the CTAs out
    # longest sequence first (a [B] order from a small XLA pre-pass, `ragged.longest_first`),
    # i.e. longest-processing-time-first list scheduling; each CTA still writes its own
    # sequence's final output (no partials, no merge). None: `use_longest_first` decides.
    longest_first: bool | None = None

    def __post_init__(self):
        if self.q_quant not in ("xla", "kernel"):
            raise ValueError(f"q_quant={self.q_quant!r} must be 'xla' or 'kernel'")
        if self.wg_split not in ("head", "seq"):
            raise ValueError(f"wg_split={self.wg_split!r} must be 'head' or 'seq'")
        if self.wg_split == "seq" and self.num_stages % 2:
            raise ValueError(f"wg_split='seq' needs an even num_stages, got {self.num_stages}")
        if self.q_tma and self.q_quant != "kernel":
            raise ValueError("q_tma=True needs q_quant='kernel'")
        if self.ring_epilogue and (
            self.wg_split != "seq" or self.num_stages < 4 or self.block_s != 64
        ):
            raise ValueError("ring_epilogue=True needs wg_split='seq', num_stages >= 4, block_s=64")
        if self.v_convert not in ("compute", "memory"):
            raise ValueError(f"v_convert={self.v_convert!r} must be 'compute' or 'memory'")
        if self.v_convert == "memory" and (self.wg_split != "seq" or self.block_s != 64):
            raise ValueError(
                "v_convert='memory' needs wg_split='seq' and block_s=64 (one f16 [64, 256] "
                f"buffer per compute warpgroup), got wg_split={self.wg_split!r}, "
                f"block_s={self.block_s}"
            )
        if self.v_load not in ("8bit", "wgmma"):
            raise ValueError(f"v_load={self.v_load!r} must be '8bit' or 'wgmma'")
        if self.block_s not in (64, 128):
            raise ValueError(f"block_s={self.block_s} must be 64 or 128")
        if not 2 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages} must be in [2, 8]")
        if not (0.25 <= self.ragged_items_per_sm <= 8 and 1 <= self.ragged_max_splits <= 64):
            raise ValueError(
                f"ragged_items_per_sm={self.ragged_items_per_sm} must be in [0.25, 8] and "
                f"ragged_max_splits={self.ragged_max_splits} in [1, 64]"
            )
        if self.num_splits is not None and not 1 <= self.num_splits <= 1024:
            raise ValueError(f"num_splits={self.num_splits} must be None or in [1, 1024]")

    def smem_bytes(
        self, kv_dtype, out_dtype, num_heads: int = 64, head_dim: int = 256, v_transposed=False
    ) -> int:
        """Shared memory the kernel allocates for this config (barriers ignored: < 1 KiB).
        ``v_transposed``: the FP8 P.V form (a transposed V cache; `for_transposed_v`)."""
        kv_b = jnp.dtype(kv_dtype).itemsize
        fp8 = kv_b == 1
        q = num_heads * head_dim * kv_b  # q is FP8 when the cache is (FP8 wgmma), else bf16
        ring = self.num_stages * 2 * self.block_s * head_dim * kv_b
        scales = self.num_stages * 2 * self.block_s * 4 if fp8 else 0
        # Converted V, f16: one [block_s, head_dim] tile (two halves, one per compute warpgroup)
        # or, with v_convert="memory", one whole tile per compute warpgroup. FP8 P.V converts
        # nothing: one e4m3 P tile per compute warpgroup, and the bf16 q staging (q_tma) that
        # otherwise borrows the f16 tile's memory.
        n_v16 = 2 if self.v_convert == "memory" else 1
        v16 = n_v16 * self.block_s * head_dim * 2 if fp8 else 0
        if fp8 and v_transposed:
            v16 = 2 * num_heads * self.block_s + (num_heads * head_dim * 2 if self.q_tma else 0)
        seq = self.wg_split == "seq"
        # Output staging: one 64-column tile per wg ("head") or one for wg 0 plus the f32
        # exchange tile and max/sum vectors ("seq").
        out = (1 if seq else 2) * num_heads * 64 * jnp.dtype(out_dtype).itemsize
        xchg = num_heads * 64 * 4 + 2 * num_heads * 4 if seq else 0
        if self.ring_epilogue:  # both tiles live in freed ring slots
            out, xchg = 0, 2 * num_heads * 4
        return q + ring + scales + v16 + out + xchg + num_heads * 4 * 2 + SMEM_SLACK_BYTES

    def for_transposed_v(self) -> TuningConfig:
        """This config for a transposed-V FP8 cache (P.V as an FP8 wgmma): V needs no
        conversion, so ``v_convert`` is moot ("compute" is the form without conversion
        buffers); only the "seq" split runs it (one N=256 P.V a block)."""
        if self.wg_split != "seq":
            raise ValueError(
                f"a transposed V cache (FP8 P.V) needs wg_split='seq', got {self.wg_split!r}"
            )
        return dataclasses.replace(self, v_convert="compute")

    def validate_smem(self, kv_dtype, out_dtype, v_transposed: bool = False) -> None:
        """ValueError if this config cannot run with these dtypes (shared memory, or a mode
        that only exists for an FP8 cache)."""
        if self.v_convert == "memory" and jnp.dtype(kv_dtype) != jnp.float8_e4m3fn:
            raise ValueError(
                f"v_convert='memory' needs a float8_e4m3fn cache, got {jnp.dtype(kv_dtype).name}"
            )
        if v_transposed and jnp.dtype(kv_dtype) != jnp.float8_e4m3fn:
            raise ValueError(
                "a transposed V cache is the FP8 P.V layout: it needs a float8_e4m3fn cache, "
                f"got {jnp.dtype(kv_dtype).name}"
            )
        need = self.smem_bytes(kv_dtype, out_dtype, v_transposed=v_transposed)
        if need > SMEM_LIMIT_BYTES:
            raise ValueError(
                f"{self} needs {need} bytes of shared memory for kv dtype "
                f"{jnp.dtype(kv_dtype).name}, more than the {SMEM_LIMIT_BYTES} available: "
                "lower num_stages or block_s"
            )


# Tuned on the project's GPU machines (sweep and commands: docs/LOG.md, topic mfa_decode).
# H100, B=128, 4K context, FP8 cache (us, whole call incl. the 8 us XLA q quantization):
#   head split, 4 stages: 124.1 | seq split, 4 stages: 109.3 (8-bit V loads) / 110.0 (16-bit)
#   | seq split, 2 stages: 116.6. bf16 cache: head 182.3 vs seq 184.2 (both ~97% of copy BW).
# H200 (2026-11-22, benchmarks/results/mfa_decode_h200_tune.json, same run): the H100 choices
# win there too: FP8 q_tma + ring epilogue 88.1 us at B=128 4K vs 90.5 without (3.14 vs 3.06
# TB/s; copy 4.29 TB/s), bf16 head split 123.7 us vs seq 126.1 (4.38 TB/s, ~102% of copy).
# The FP8 kernel is not memory-bound on H200: it reads half the bytes of bf16 in 71% of the
# time (the per-token SM work, not HBM, sets its pace; docs/LOG.md).
# q quantized inside the kernel (2026-11-22, H100, B=128 4K, same run): 106.8 us vs 109.1 us
# with the three XLA q-quantization kernels (benchmarks/results/mfa_decode_H100_qkernel.json);
# its GPU suite (TestPallasGPUQInKernel) passes.
# q staged by TMA + the ring epilogue (2026-11-22, third session, H100, same run): B=128 4K
# 102.1 us (2.71 TB/s, 89.4% of copy) vs 107.3 without either (q_tma alone 103.0, ring
# epilogue alone 107.1); 32 x 32K and 64 x 8K unchanged (~200 and ~111 us): the two trim the
# fixed per-CTA cost, which matters at short contexts
# (benchmarks/results/mfa_decode_H100_ring_epilogue.json).
# V converted to f16 by the memory warpgroup (v_convert="memory"; 2026-11-22, commit 42aea3d,
# benchmarks/gpu_vconvert_check.sh, one run per device, benchmarks/results/
# mfa_decode_{H100,H200}_vconvert.json): H200 B=128 4K 88.9 -> 82.2 us (3.12 -> 3.37 TB/s),
# 32 x 32K 170.8 -> 164.2 us; H100 102.1 -> 101.3 us and 199.5 -> 196.3 us (within noise at
# 4K, +1.6% at 32K). ptxas: the compute-converts form spills 56 bytes, this one none. The
# GPU suite passes with it on both devices.
_FP8 = TuningConfig(
    block_s=64,
    num_stages=4,
    v_load="8bit",
    wg_split="seq",
    q_quant="kernel",
    q_tma=True,
    ring_epilogue=True,
    v_convert="memory",
)
_BF16 = TuningConfig(block_s=64, num_stages=2, wg_split="head")
TUNED: dict[str, dict[str, TuningConfig]] = {
    "H100": {"float8_e4m3fn": _FP8, "bfloat16": _BF16},
    "H200": {"float8_e4m3fn": _FP8, "bfloat16": _BF16},
}
DEFAULT = {"float8_e4m3fn": _FP8, "bfloat16": _BF16}


def device_family(device_kind: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; None for anything not in the tables."""
    kind = device_kind.upper()
    for fam in TUNED:
        if fam in kind:
            return fam
    return None


def get_config(device_kind: str, kv_dtype) -> TuningConfig:
    """The tuned config for a device kind string and a KV dtype (defaults if unknown)."""
    name = jnp.dtype(kv_dtype).name
    fam = device_family(device_kind)
    table = TUNED.get(fam, DEFAULT) if fam else DEFAULT
    return table.get(name, DEFAULT.get(name, TuningConfig()))


# Split-K cost constants (``splitk.SplitCosts``, us) per device family, FITTED ONLY: a family
# listed here gets the cost-model split rule (``choose_num_splits`` with its costs); every other
# device keeps ``min_tokens_num_splits``, the rule the 98b0a31 sweep measured. Empty until the
# forced-split sweep (docs/LOG.md, "MFA decode kernel") runs on a GPU; enter the constants
# ``python3 -m step3_jax.kernels.mfa_decode.splitk mfa_decode_<device>.json --sms 132`` prints.
# H100: fitted (`splitk.fit_costs`) on the forced-split rows of
# benchmarks/results/mfa_decode_H100_splitk_partial_1841117.json (B = 1, 2, 4, 8 at 1K; B = 1, 2
# at 4K; the call ran out of time before 8K and 32K). At every complete shape the model's pick
# is the measured best and beats XLA: B=1 1K J=16 11.7 us (rule: J=2 18.3, XLA 13.1); B=1 4K
# J=64 14.6 (rule: J=8 19.4, XLA 16.5); B=8 1K J=8 14.1 (XLA 22.3). H200: not fitted yet.
SPLIT_COSTS: dict[str, splitk.SplitCosts] = {
    "H100": splitk.SplitCosts(fixed=8.43, combine=2.22, combine_per_split=0.030, block=1.018),
}


def split_costs(device_kind: str) -> splitk.SplitCosts | None:
    """The fitted split-K cost constants of a device kind string, or None (not fitted)."""
    fam = device_family(device_kind)
    return SPLIT_COSTS.get(fam) if fam else None


# The ragged work list (`TuningConfig.ragged`) on the GPU, FP8 cache, H100 (CUPTI us, commit
# cd0f7bd, benchmarks/results/mfa_decode_H100_ragged_cd0f7bd.json), tuned grid -> work list:
# 32K, lengths U[S/2, S]: B=128 658 -> 589, B=256 1,297 -> 1,134 (84-86% -> 94-98% of copy over
# the KV read); 32K full: 723 -> 751, 1,444 -> 1,471 (+2-4%). At 4K it loses everywhere (B=128
# ragged 99 -> 120, B=256 180 -> 189): its pre-pass and merge cost ~15 us a call, more than
# the balance gains on short sequences. Serving batches are ragged, so it is on from 16K with
# many sequences (few split better on the split-K grid, which the work list replaces). Only the
# H100 was measured (the H200's FP8 kernel is SM-bound: its trade may differ), and nothing
# between 4K and 32K: 16K is where the ~15 us fixed cost falls under ~5% of a full call.
RAGGED_MIN_LEN = 16384
RAGGED_MIN_SEQS = 128
RAGGED_FAMILIES = ("H100",)


def use_ragged_work_list(device_kind: str, kv_dtype, num_seqs: int, max_len: int) -> bool:
    """Whether the tuned config turns the ragged work list on for ``num_seqs`` sequences
    against a cache of ``max_len`` tokens: FP8 caches (the bf16 form is unmeasured) on a
    measured device family (`RAGGED_FAMILIES`), from ``RAGGED_MIN_LEN`` tokens and
    ``RAGGED_MIN_SEQS`` sequences. ``max_len`` is the cache's capacity, not the sequences'
    lengths (static; the lengths are device data): a cache sized >= 16K that holds short
    sequences pays the work list's ~15 us without its gain."""
    fp8 = jnp.dtype(kv_dtype) == jnp.dtype(jnp.float8_e4m3fn)
    measured = device_family(device_kind) in RAGGED_FAMILIES
    return fp8 and measured and num_seqs >= RAGGED_MIN_SEQS and max_len >= RAGGED_MIN_LEN


def use_longest_first(num_ctas: int, num_splits: int, num_sms: int, ragged: bool) -> bool:
    """Whether an unsplit grid hands its CTAs out longest sequence first: only with more
    CTAs than SMs (one wave needs no order: every CTA starts at once), no split and no work
    list (both balance by cutting sequences instead). In order of arrival, B = 256 sequences of
    lengths uniform in [2K, 4K] on 132 SMs end when the last SM does: ~sum / SMs + half the
    longest, ~74% of the balanced time (the attention role's MFA ran at 73% of copy there);
    longest first pairs long with short sequences per SM (list-scheduling bound 4/3 of the
    optimum, ~94% for that batch)."""
    return not ragged and num_splits == 1 and num_ctas > num_sms


def choose_num_splits(
    num_ctas: int, max_len: int, block_s: int, num_sms: int, costs: splitk.SplitCosts | None = None
) -> int:
    """Split-K factor from the shape. With fitted ``costs``: the lowest modelled call time
    (``splitk.predict_us``: fixed cost, the combine, waves x blocks a CTA) over J = 1 .. one
    block a split, restricted to ONE wave (B * T * J <= num_sms: the model charges no per-CTA
    start-up, and the first sweep lost ~35% at B=64 and B=32 to a second partial wave). Without
    (``None``): the measured ``min_tokens_num_splits``."""
    if costs is None:
        return min_tokens_num_splits(num_ctas, max_len, block_s, num_sms)
    one_wave = max(1, num_sms // max(num_ctas, 1))
    return splitk.choose_num_splits(
        num_ctas, max_len, block_s, num_sms, costs, candidates=range(1, one_wave + 1)
    )


def min_tokens_num_splits(num_ctas: int, max_len: int, block_s: int, num_sms: int) -> int:
    """The measured rule (the 98b0a31 sweep ran under it; the default until ``SPLIT_COSTS``
    holds a device's fitted constants): as many CTAs as fit in
    ONE wave on ``num_sms`` SMs, each split keeping at least MIN_TOKENS_PER_SPLIT tokens, no
    split once B * T covers 3/4 of the SMs; the factor rounds DOWN (no second partial wave).
    """
    if num_ctas >= num_sms * 3 // 4:
        return 1
    by_fill = max(1, num_sms // num_ctas)
    by_len = max(1, max_len // max(MIN_TOKENS_PER_SPLIT, block_s))
    return max(1, min(by_fill, by_len))
