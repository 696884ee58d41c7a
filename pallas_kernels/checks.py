"""Input checks shared by the kernel APIs.

Shapes, dtypes and Python-int arguments are checked on every call (free: static). Checks on
array VALUES (page ids in range, lengths in range) read device memory, so the APIs run them
only where `concrete` says the values are known here: eager calls and NumPy inputs. Under
``jit``/``shard_map``/``scan`` (the decode loop, the engine, the AFD step) the arrays are
tracers and nothing is read back: no host sync on a hot path.
"""

from __future__ import annotations

import jax
import numpy as np


def concrete(*xs) -> bool:
    """True when every ``x`` (None allowed) has values readable on this host now: not a
    tracer, and not spread over devices of other processes."""
    return all(
        x is None
        or (
            not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))
            and getattr(x, "is_fully_addressable", True)
        )
        for x in xs
    )


def as_array(x):
    """``x`` unchanged if it is an array (anything with a shape), else as a NumPy array (a
    Python list of lengths or group sizes; host values, so read without a device sync)."""
    return x if x is None or hasattr(x, "shape") else np.asarray(x)
