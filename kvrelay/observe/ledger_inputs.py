"""Bounded records the hit-rate ledger reads: blocks the cluster has computed (F1), the
workload label values, and each worker's measured prefill cost per token.

Owns: `SeenBlocks` (an LRU set of block hashes sized in blocks), `WorkloadLabels` (bounded
cardinality for the `workload` label) and `PrefillCostModel` (EWMA of prefill seconds per
uncached token). Pure and deterministic; imports nothing from kvrelay.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_WORKLOAD = "default"
OTHER_WORKLOAD = "other"
DEFAULT_MAX_WORKLOADS = 16
DEFAULT_SEEN_CAPACITY_BLOCKS = 1 << 20  # ~16M tokens at 16 tokens a block
_WORKLOAD_CHARS = re.compile(r"[^a-z0-9_.\-]")


class SeenBlocks:
    """Bounded LRU set of block hashes the cluster has computed: F1's 'seen before' record.
    A match refreshes the blocks, so hot prefixes stay while one-off tails age out."""

    def __init__(self, capacity_blocks: int = DEFAULT_SEEN_CAPACITY_BLOCKS) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._lru

    def add(self, block_hashes: Iterable[int]) -> None:
        lru = self._lru
        for h in block_hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)

    def match_prefix(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of `block_hashes` seen before (hashes are chained: a block is
        seen only if its whole prefix was), refreshing them."""
        lru = self._lru
        n = 0
        for h in block_hashes:
            if h not in lru:
                break
            lru.move_to_end(h)
            n += 1
        return n


class WorkloadLabels:
    """Bounds the `workload` label: lower-cased, [a-z0-9_.-] only, at most 32 characters,
    and at most `max_values` distinct values; later newcomers are reported as 'other'."""

    def __init__(self, max_values: int = DEFAULT_MAX_WORKLOADS) -> None:
        self.max_values = max_values
        self._known: set[str] = {DEFAULT_WORKLOAD}

    def label(self, raw: str | None) -> str:
        if not raw:
            return DEFAULT_WORKLOAD
        value = _WORKLOAD_CHARS.sub("_", raw.strip().lower())[:32] or DEFAULT_WORKLOAD
        if value in self._known:
            return value
        if len(self._known) >= self.max_values:
            return OTHER_WORKLOAD
        self._known.add(value)
        return value


class PrefillCostModel:
    """Per-worker EWMA of measured prefill seconds per uncached prompt token.

    Samples with fewer than `min_tokens` uncached tokens are skipped: their time is mostly
    fixed per-step overhead and would inflate the per-token cost of a cache hit.
    """

    def __init__(self, alpha: float = 0.2, min_tokens: int = 64) -> None:
        self.alpha = alpha
        self.min_tokens = min_tokens
        self._s_per_token: dict[str, float] = {}

    def observe(self, worker_id: str, prefill_s: float, num_uncached_tokens: int) -> None:
        if num_uncached_tokens < self.min_tokens or prefill_s <= 0:
            return
        sample = prefill_s / num_uncached_tokens
        old = self._s_per_token.get(worker_id)
        self._s_per_token[worker_id] = sample if old is None else old + self.alpha * (sample - old)

    def seconds_per_token(self, worker_id: str) -> float | None:
        return self._s_per_token.get(worker_id)

    def saved_s(self, worker_id: str, num_hit_tokens: int) -> float:
        """Prefill seconds `num_hit_tokens` cache hits saved on `worker_id` (0 if unknown)."""
        return num_hit_tokens * self._s_per_token.get(worker_id, 0.0)

    def forget(self, worker_id: str) -> None:
        self._s_per_token.pop(worker_id, None)
