"""Accelerator specs for the decode cost model.

The paper's four (Table 4 of arXiv 2507.19427: H800, H20, A800, Ascend 910B) carry its prices
and peak numbers exactly. H100, H200 and B200 are ours: dense (not 2:4-sparse) datasheet peaks
for the SXM parts, and an hourly price that is only an illustrative on-demand cloud figure
(they move month to month; pass your own with `dataclasses.replace(spec, price_per_hour=...)`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One accelerator.

    Attributes:
      name: label.
      price_per_hour: USD per card-hour.
      bf16_flops: dense BF16/FP16 tensor-core peak, FLOP/s.
      fp8_flops: dense FP8 peak, FLOP/s; None when the part has no FP8 (then the paper runs
        INT8 weights and KV, same bytes, with BF16 compute).
      mem_bw: HBM bandwidth, B/s.
      net_bw: scale-out network bandwidth per card, B/s (the paper: 8 x 400 Gb/s NICs per
        8-card server counted as 400e9 B/s for H800/H20, 200e9 for A800/910B; see
        `min_sparsity` for how that number enters).
      mem_bytes: HBM capacity per card.
      net_latency_s: one-way network latency per message (simulator only).
    """

    name: str
    price_per_hour: float
    bf16_flops: float
    fp8_flops: float | None
    mem_bw: float
    net_bw: float
    mem_bytes: float = 80e9
    net_latency_s: float = 10e-6

    def __post_init__(self):
        for f in ("price_per_hour", "bf16_flops", "mem_bw", "net_bw", "mem_bytes"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareSpec.{f} must be > 0, got {getattr(self, f)}")
        if self.fp8_flops is not None and not self.fp8_flops > 0:
            raise ValueError(f"HardwareSpec.fp8_flops must be > 0 or None, got {self.fp8_flops}")
        if self.net_latency_s < 0:
            raise ValueError(f"HardwareSpec.net_latency_s must be >= 0, got {self.net_latency_s}")

    @property
    def peak_flops(self) -> float:
        """The 8-bit path's compute peak: FP8 if present, else BF16 (INT8 weights, BF16 math)."""
        return self.fp8_flops if self.fp8_flops is not None else self.bf16_flops

    @property
    def roofline(self) -> float:
        """Ridge point, FLOP per byte: peak_flops / mem_bw (H800 591, H20 74)."""
        return self.peak_flops / self.mem_bw

    @property
    def usd_per_flop(self) -> float:
        """Unit compute cost, the paper's U_FLOP: price / 3600 / peak_flops."""
        return self.price_per_hour / 3600.0 / self.peak_flops

    @property
    def usd_per_byte(self) -> float:
        """Unit memory-access cost, the paper's U_byte: price / 3600 / mem_bw."""
        return self.price_per_hour / 3600.0 / self.mem_bw


H800 = HardwareSpec("H800", 2.0, 9.89e14, 1.98e15, 3.35e12, 400e9, 80e9)
H20 = HardwareSpec("H20", 0.8, 1.48e14, 2.96e14, 4.00e12, 400e9, 96e9)
A800 = HardwareSpec("A800", 0.75, 3.12e14, None, 2.00e12, 200e9, 80e9)
ASCEND_910B = HardwareSpec("910B", 0.67, 2.80e14, None, 1.60e12, 200e9, 64e9)
# (ours) datasheet dense peaks; prices illustrative only.
H100 = HardwareSpec("H100", 2.5, 9.89e14, 1.979e15, 3.35e12, 400e9, 80e9)
H200 = HardwareSpec("H200", 3.0, 9.89e14, 1.979e15, 4.8e12, 400e9, 141e9)
B200 = HardwareSpec("B200", 5.0, 2.25e15, 4.5e15, 8.0e12, 400e9, 180e9)

PAPER_HARDWARE: tuple[HardwareSpec, ...] = (H800, H20, A800, ASCEND_910B)
HARDWARE: dict[str, HardwareSpec] = {
    h.name: h for h in (H800, H20, A800, ASCEND_910B, H100, H200, B200)
}


def get_hardware(name: str) -> HardwareSpec:
    """A preset by name, case-insensitive ("910b" and "ascend-910b" both work)."""
    key = name.lower().removeprefix("ascend").strip(" -_")
    for hw_name, hw in HARDWARE.items():
        if hw_name.lower() == key:
            return hw
    raise ValueError(f"unknown hardware {name!r}; known: {tuple(HARDWARE)}")
