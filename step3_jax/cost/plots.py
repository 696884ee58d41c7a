"""Matplotlib figures for the cost model (Agg backend: no display needed).

Each function builds one figure, saves it as PNG when ``path`` is given, and returns the
Figure so notebooks can show it and tests can count its lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless CI and colab both work
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from step3_jax.cost import analytic  # noqa: E402
from step3_jax.cost.hardware import PAPER_HARDWARE, HardwareSpec  # noqa: E402
from step3_jax.cost.simulator import PipelineResult  # noqa: E402
from step3_jax.cost.specs import PAPER_LABELS, get_model, model_names  # noqa: E402


def _save(fig, path: str | Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def roofline(
    hardware: Sequence[HardwareSpec] = PAPER_HARDWARE,
    models: Sequence[str] | None = None,
    ctx: int = 8192,
    path: str | Path | None = None,
):
    """Attainable FLOP/s vs arithmetic intensity: one roofline per accelerator (solid) and
    one vertical line per model at its attention intensity (dashed).
    Lines: len(hardware) + len(models)."""
    models = list(models or model_names())
    fig, ax = plt.subplots(figsize=(8, 5))
    x = np.logspace(0, 3.5, 200)
    for hw in hardware:
        ax.plot(
            x,
            np.minimum(hw.peak_flops, x * hw.mem_bw),
            lw=2,
            label=f"{hw.name} (ridge {hw.roofline:.0f})",
        )
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(models):
        ai = analytic.arithmetic_intensity(get_model(name), ctx)
        ax.axvline(ai, ls="--", lw=1, color=cmap(i % 10))
        label = f"{PAPER_LABELS.get(name, name)} ({ai:.0f})"
        # x in data units, y in axes fraction: staggered labels stay inside the frame.
        ax.text(
            ai * 1.04,
            0.95 - 0.055 * i,
            label,
            fontsize=7,
            color=cmap(i % 10),
            transform=ax.get_xaxis_transform(),
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (FLOP per KV byte)",
        ylabel="attainable FLOP/s (8-bit path)",
        title=f"Attention intensity vs hardware rooflines ({ctx // 1024}K context)",
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def cost_vs_context(
    hardware: Sequence[HardwareSpec] = PAPER_HARDWARE,
    models: Sequence[str] | None = None,
    contexts: Sequence[int] = (2048, 4096, 8192, 16384, 32768, 65536, 131072),
    path: str | Path | None = None,
):
    """AFD cost (cheapest attention + cheapest FFN hardware) per 1M tokens vs context.
    Lines: len(models)."""
    models = list(models or model_names())
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in models:
        spec = get_model(name)
        y = [analytic.afd_cost(spec, hardware, c).total * 1e6 for c in contexts]
        ax.plot(
            contexts,
            y,
            marker="o",
            ms=3,
            lw=2 if name == "Step-3" else 1,
            label=PAPER_LABELS.get(name, name),
        )
    hw_names = "/".join(h.name for h in hardware)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context length (tokens)",
        ylabel="USD per 1M decoded tokens (AFD)",
        title=f"Theoretical decode cost, best of {hw_names} per side",
    )
    ax.set_xticks(list(contexts), [f"{c // 1024}K" for c in contexts])
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


_COLORS = {"A": "tab:blue", "A->F": "tab:orange", "F": "tab:green", "F->A": "gold"}


def afd_timeline(result: PipelineResult, layers: int = 2, path: str | Path | None = None):
    """Gantt chart of the first ``layers`` layers of a steady-state step: one row per resource,
    one bar per (micro-batch, layer) stage, labelled D<mb+1> (primes mark later layers)."""
    ev = [e for e in result.events if e[2] < layers]
    if not ev:
        raise ValueError(f"no events in the first {layers} layers")
    t0 = min(e[3] for e in ev)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    rows = ["A", "A->F", "F", "F->A"]
    for name, mb, layer, start, end in ev:
        y = rows.index(name)
        ax.broken_barh(
            [((start - t0) * 1e6, (end - start) * 1e6)],
            (y - 0.4, 0.8),
            facecolors=_COLORS[name],
            edgecolor="k",
            lw=0.5,
        )
        ax.text(
            ((start + end) / 2 - t0) * 1e6,
            y,
            f"D{mb + 1}" + "'" * layer,
            ha="center",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set(
        xlabel="time (us)",
        title=f"AFD pipeline, {result.micro_batches} micro-batches, "
        f"TPOT {result.tpot_s * 1e3:.1f} ms",
    )
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def close(fig) -> None:
    """Frees a figure (scripts making many figures should call this)."""
    plt.close(fig)
