"""Split-K from the shape: a per-call cost model of the MFA decode kernel.

``config.choose_num_splits`` (what ``api.py`` uses when a config leaves ``num_splits=None``)
minimises this model with the per-device constants of ``config.SPLIT_COSTS``. The defaults
below are UNFITTED guesses; fit them to the small-batch sweep (``bench_mfa_decode.py --splits
...``, rows of forced split factors) with ``fit_costs`` / this module's CLI. The rule it
replaced kept every split >= 512 tokens: at B <= 8 and S <= 66K that is exactly 8 blocks of
64 tokens per CTA, a serial chain of ~8 x 1.45 us that made most of the ~17 us B=1 floor
(docs/LOG.md, "MFA decode: small batch").

Model of one call with T = 1, ``J`` splits, ``B * J`` CTAs on ``num_sms`` SMs::

    t(J) = fixed + [J > 1] * (combine + combine_per_split * B * J)
           + waves(J) * ceil(ceil(S / block_s) / J) * block

``fixed``: launch, barrier set-up, q load and quantization, pipeline fill and the epilogue;
``combine``: the XLA split-K merge (its own kernels: max, exp-weighted sum over J, normalise)
and the f32 partials; ``block``: one 64-token K/V block through one CTA (QK, softmax, V
conversion, P.V); ``waves``: ``ceil(B * J / num_sms)``. The bandwidth floor (bytes / copy
rate) does not depend on J, so it does not change the choice and is left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class SplitCosts:
    """Cost constants in microseconds. Defaults: H100 guesses that reproduce the 98b0a31 sweep
    at B=1 (17.5 us at 1K with J=2, 22.7 us at 32K with J=64); refit from a forced-split
    sweep with :func:`fit_costs` before use."""

    fixed: float = 4.5
    combine: float = 1.5
    combine_per_split: float = 0.08  # per split per sequence: partials written and read
    block: float = 1.45  # one 64-token block through one CTA (H100, loaded: LOG third session)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"SplitCosts.{f.name}={v} must be finite and >= 0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def predict_us(
    splits: int, batch_t: int, max_len: int, block_s: int, num_sms: int, costs: SplitCosts
) -> float:
    """Modelled time (us) of one call: ``batch_t`` = B * T CTAs before splitting."""
    if min(splits, batch_t, max_len, block_s, num_sms) < 1:
        raise ValueError(
            f"{splits=}, {batch_t=}, {max_len=}, {block_s=}, {num_sms=} must all be >= 1"
        )
    blocks = _cdiv(_cdiv(max_len, block_s), splits)
    waves = _cdiv(batch_t * splits, num_sms)
    merge = costs.combine + costs.combine_per_split * batch_t * splits if splits > 1 else 0.0
    return costs.fixed + merge + waves * blocks * costs.block


def choose_num_splits(
    batch_t: int,
    max_len: int,
    block_s: int,
    num_sms: int,
    costs: SplitCosts | None = None,
    candidates: Iterable[int] | None = None,
) -> int:
    """The split factor with the lowest modelled time among ``candidates`` (default 1 .. one
    block per split; factors above that are dropped); ties go to fewer splits (less partial
    traffic, no combine)."""
    costs = costs or SplitCosts()
    n_blocks = _cdiv(max_len, block_s)
    pool = sorted({int(j) for j in (candidates or range(1, min(n_blocks, 1024) + 1))})
    pool = [j for j in pool if 1 <= j <= n_blocks] or [1]
    best, best_t = pool[0], predict_us(pool[0], batch_t, max_len, block_s, num_sms, costs)
    for j in pool[1:]:
        t = predict_us(j, batch_t, max_len, block_s, num_sms, costs)
        if t < best_t - 1e-9:
            best, best_t = j, t
    return best


def _features(splits, batch_t, max_len, block_s, num_sms) -> list[float]:
    blocks = _cdiv(_cdiv(max_len, block_s), splits)
    waves = _cdiv(batch_t * splits, num_sms)
    multi = float(splits > 1)
    return [1.0, multi, multi * batch_t * splits, waves * blocks]


def fit_costs(rows: Iterable[dict], num_sms: int, block_s: int = 64) -> SplitCosts:
    """Least-squares fit of :class:`SplitCosts` to benchmark rows (``bench_mfa_decode.py``
    JSON rows with ``shape`` {B, ctx}, ``splits`` and ``time_us``; error rows skipped).
    Negative estimates are clipped to 0. Needs >= 4 rows spanning J = 1 and J > 1."""
    feats, times = [], []
    for r in rows:
        if "error" in r or "splits" not in r or "time_us" not in r:
            continue
        b, s = r["shape"]["B"], r["shape"]["ctx"]
        feats.append(_features(int(r["splits"]), int(b), int(s), block_s, num_sms))
        times.append(float(r["time_us"]))
    x, y = np.asarray(feats), np.asarray(times)
    if len(y) < 4 or np.linalg.matrix_rank(x) < 4:
        raise ValueError(
            f"fit_costs needs >= 4 timed rows with J = 1 and J > 1 and several shapes, got "
            f"{len(y)} rows of rank {np.linalg.matrix_rank(x) if len(y) else 0}"
        )
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    fixed, combine, per_split, block = (max(0.0, float(c)) for c in coef)
    return SplitCosts(fixed=fixed, combine=combine, combine_per_split=per_split, block=block)


def sweep_report(rows: list[dict], num_sms: int, impl: str = "pallas_fp8", xla: str = "xla_fp8"):
    """Per (B, S) of a ``bench_mfa_decode.py --splits`` run: the XLA time, the current rule's
    split and time (the ``impl`` row), the fastest forced split, and the split the fitted model
    picks among the swept factors with its measured time. Returns
    ``(costs, [dict per shape])``; ``model_us <= xla_us`` everywhere is the issue's target."""
    ok = [r for r in rows if "error" not in r and "time_us" in r]
    mine = [r for r in ok if r["name"] == impl or r["name"].startswith(impl + "[splits=")]
    costs = fit_costs(mine, num_sms)
    out = []
    for b, s in sorted({(r["shape"]["B"], r["shape"]["ctx"]) for r in mine}):
        at = [r for r in mine if (r["shape"]["B"], r["shape"]["ctx"]) == (b, s)]
        forced = {int(r["splits"]): r["time_us"] for r in at if "[splits=" in r["name"]}
        auto = next((r for r in at if r["name"] == impl), None)
        ref = [r["time_us"] for r in ok if r["name"] == xla and r["shape"] == at[0]["shape"]]
        j = choose_num_splits(b, s, 64, num_sms, costs, candidates=forced or None)
        best = min(forced, key=forced.get) if forced else None
        out.append({
            "B": b, "ctx": s, "xla_us": ref[0] if ref else None,
            "auto_splits": auto and auto.get("splits"), "auto_us": auto and auto["time_us"],
            "best_splits": best, "best_us": forced.get(best),
            "model_splits": j, "model_us": forced.get(j),
        })  # fmt: skip
    return costs, out


if __name__ == "__main__":  # python3 -m step3_jax.kernels.mfa_decode.splitk RESULTS.json...
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Fit SplitCosts to bench_mfa_decode --splits runs")
    ap.add_argument("results", nargs="+", help="mfa_decode_<device>.json files (rows pooled)")
    ap.add_argument("--sms", type=int, default=132, help="SM count (H100 / H200 SXM: 132)")
    ap.add_argument("--impl", default="pallas_fp8")
    ap.add_argument("--xla", default="xla_fp8")
    cli = ap.parse_args()
    pooled = []
    for path in cli.results:
        with open(path) as f:
            pooled += json.load(f)["rows"]
    fitted, table = sweep_report(pooled, cli.sms, cli.impl, cli.xla)
    print(json.dumps({"costs": dataclasses.asdict(fitted), "shapes": table}, indent=1))
