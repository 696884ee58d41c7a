"""The compiled AFD step's static plan: which (layer, micro-batch) each role works on at each
tick (`pipeline_schedule`), and how every attention/FFN pair talks once per tick
(`exchange_rounds`)."""

from __future__ import annotations

import numpy as np


def exchange_rounds(num_a: int, num_f: int) -> list[list[tuple[int, int]]]:
    """Matchings ``[(a, f), ...]`` covering every attention/FFN pair exactly once."""
    if num_a <= num_f:
        return [[(a, (a + r) % num_f) for a in range(num_a)] for r in range(num_f)]
    return [[((f + r) % num_a, f) for f in range(num_f)] for r in range(num_a)]


def pipeline_schedule(num_layers: int, num_mb: int) -> np.ndarray:
    """Greedy static schedule ``[ticks, 6]`` int32 rows ``(a_ok, a_layer, a_mb, f_ok,
    f_layer, f_mb)``; an idle stage has ok=0 and mb=num_mb (the trash slot).

    Attention takes items in (layer, micro-batch) order once the item's previous-layer FFN
    result has arrived (finished at an earlier tick); the FFN takes items in arrival order.
    """
    items = [(layer, m) for layer in range(num_layers) for m in range(num_mb)]
    attn_done, ffn_done, rows = {}, {}, []
    next_a, ffn_queue, tick = 0, [], 0
    while len(ffn_done) < len(items):
        row = [0, 0, num_mb, 0, 0, num_mb]
        if next_a < len(items):
            layer, m = items[next_a]
            if layer == 0 or ffn_done.get((layer - 1, m), tick) < tick:
                row[:3] = [1, layer, m]
                attn_done[items[next_a]] = tick
                next_a += 1
        ready = [it for it in ffn_queue if attn_done[it] < tick]
        if ready:
            row[3:] = [1, *ready[0]]
            ffn_done[ready[0]] = tick
            ffn_queue.remove(ready[0])
        if row[0]:
            ffn_queue.append(items[next_a - 1])
        rows.append(row)
        tick += 1
    return np.array(rows, np.int32)
