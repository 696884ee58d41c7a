"""One dispatch rule for every kernel package (``implementation=`` everywhere).

* ``"xla"``: the portable XLA path, always.
* ``"pallas"``: the Pallas kernel; a ValueError naming the reason if it cannot run here.
* ``None``: the Pallas kernel where it can run, else XLA. Falling back is silent where no
  Hopper GPU is present (the CPU and other GPUs are expected to run XLA) and a one-time
  warning on a Hopper GPU (the kernel was expected and a shape or dtype kept it out).

Each kernel package answers "supported here, for this call?" publicly with a function that
returns None or the reason (`step3_jax.kernels.mfa_decode.supported`,
`step3_jax.kernels.grouped_gemm.supported`); callers never probe devices themselves.
"""

from __future__ import annotations

import functools
import warnings

import jax

IMPLEMENTATIONS = ("pallas", "xla", None)
HOPPER_FAMILIES = ("H100", "H200", "H800", "H20", "GH200")


@functools.cache
def hopper_device() -> str | None:
    """The default device's kind if it is a Hopper GPU (compute capability 9.x), else None."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu":
        return None
    if str(getattr(dev, "compute_capability", "")).startswith("9"):
        return dev.device_kind
    kind = dev.device_kind.upper()
    return dev.device_kind if any(f in kind for f in HOPPER_FAMILIES) else None


def check_implementation(op: str, implementation) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )


_warned: set[tuple[str, str]] = set()


def choose(op: str, implementation: str | None, reason: str | None) -> str:
    """``"pallas"`` or ``"xla"`` for ``op`` by the rule above; ``reason`` is the package's
    `supported` answer (None: the kernel can run this call here)."""
    check_implementation(op, implementation)
    if implementation == "xla":
        return "xla"
    if implementation == "pallas":
        if reason is not None:
            raise ValueError(f"{op}: implementation='pallas' cannot run here: {reason}")
        return "pallas"
    if reason is None:
        return "pallas"
    if hopper_device() is not None and (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"{op}: the Pallas kernel does not apply ({reason}); using XLA", stacklevel=3)
    return "xla"
