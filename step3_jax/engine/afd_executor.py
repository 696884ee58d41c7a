"""`AfdEngineExecutor`: the compiled AFD step (`step3_jax.sharding.AfdExecutor`) behind the
`Engine`, driven exactly like the single-device `ModelExecutor` (same interface, see
`step3_jax.engine.executors`).

What differs from the paged single-device executor:

* **No paging.** The AFD arena holds a contiguous ``[S]`` KV region per batch row, so engine
  slot b is AFD batch row b and a slot's memory is always there: admission is bounded by the
  slot count and ``max_len`` only (`PoolExhausted` never happens).
* **Every call runs the whole batch.** The AFD step has one shape per T; a prefill chunk is a
  ``[B, C]`` call in which the rows not being prefilled carry dummy tokens. Their K/V lands in
  slots ``[fill, fill + C)`` past each row's valid tokens, which the row's next write (decode
  or chunk) overwrites before any read: attention only reads positions up to the query's. So
  the arena needs ``C`` slots of slack: engine ``max_len = afd.max_len - prefill_chunk``.
  Likewise a decode step writes a dummy token at ``fill`` for idle rows.
* **Two programs**: the step at T=1 (decode) and at T=C (prefill), each compiled once.
"""

from __future__ import annotations

import numpy as np


class AfdEngineExecutor:
    def __init__(self, afd_executor, *, prefill_chunk: int = 16):
        self.ex = afd_executor
        self.max_batch = self.prefill_rows = int(afd_executor.batch)
        self.prefill_chunk = int(prefill_chunk)
        self.max_len = int(afd_executor.afd.max_len) - self.prefill_chunk
        if self.prefill_chunk < 1 or self.max_len < 1:
            raise ValueError(
                f"prefill_chunk={prefill_chunk} must be >= 1 and leave room in the arena's "
                f"max_len={afd_executor.afd.max_len} (engine max_len = arena - chunk)"
            )
        self.vocab_size = afd_executor.config.vocab_size
        self.fill = np.zeros(self.max_batch, np.int32)  # valid K/V tokens per row
        self.used = np.zeros(self.max_batch, bool)

    def check_fits(self, num_tokens: int) -> None:
        if num_tokens > self.max_len:
            raise ValueError(
                f"exceeds the engine's max_len={self.max_len} (AFD arena max_len "
                f"{self.ex.afd.max_len} - prefill chunk {self.prefill_chunk})"
            )

    def admit(self, slot: int, num_tokens: int) -> None:
        if self.used[slot]:
            raise ValueError(f"slot {slot} is already in use")
        self.check_fits(num_tokens)
        self.used[slot], self.fill[slot] = True, 0

    def release(self, slot: int) -> None:
        self.used[slot], self.fill[slot] = False, 0

    def decode(self, tokens, positions, active):
        active = np.asarray(active)
        pos = np.where(active, positions, self.fill).astype(np.int32)
        logits = self.ex.step(
            np.asarray(tokens, np.int32)[:, None], pos[:, None], np.zeros(self.max_batch, np.int32)
        )
        self.fill = np.where(active, pos + 1, self.fill).astype(np.int32)
        return logits

    def prefill(self, slots, tokens, starts, last):
        slots, c = np.asarray(slots), np.shape(tokens)[1]
        real = slots >= 0
        rows = slots[real]
        full = np.zeros((self.max_batch, c), np.int32)
        start = self.fill.copy()
        select = np.zeros(self.max_batch, np.int32)
        full[rows] = np.asarray(tokens)[real]
        start[rows] = np.asarray(starts)[real]
        select[rows] = np.asarray(last)[real]
        positions = start[:, None] + np.arange(c, dtype=np.int32)
        logits = self.ex.step(full, positions, select)
        self.fill[rows] = start[rows] + select[rows] + 1
        return logits[np.maximum(slots, 0)]

    def compile_count(self) -> int:
        return self.ex._program._cache_size()


__all__ = ["AfdEngineExecutor"]
