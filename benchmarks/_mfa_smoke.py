"""GPU smoke check: one small case per cache dtype, pallas vs the f32 oracle (prints errors)."""

import sys
import time

import numpy as np

sys.path.insert(0, "tests/pallas_kernels")
from test_mfa_decode import make_case  # noqa: E402

from pallas_kernels.mfa_decode import mfa_decode_attention, mfa_decode_reference  # noqa: E402

for fp8 in (False, True):
    for kw in ({}, {"t": 3}, {"page_size": 128}):
        case = make_case(0, [0, 100, 512, 300], 512, fp8=fp8, **kw)
        t0 = time.time()
        try:
            out, lse = mfa_decode_attention(**case, return_lse=True, implementation="pallas")
            out = np.asarray(out, np.float32)
        except Exception as e:  # noqa: BLE001
            print("FAIL", fp8, kw, type(e).__name__, str(e)[:2000], flush=True)
            continue
        ref, rlse = mfa_decode_reference(**case, return_lse=True)
        ref = np.asarray(ref, np.float32)
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        fin = np.isfinite(np.asarray(rlse))
        dl = np.abs(np.asarray(lse) - np.asarray(rlse))[fin].max()
        print(
            f"fp8={fp8} {kw} rel={rel:.5f} max|dlse|={dl:.4f} nan={np.isnan(out).sum()} "
            f"{time.time() - t0:.1f}s",
            flush=True,
        )
