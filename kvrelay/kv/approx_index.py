"""Approximate prefix index for engines that publish no KV events.

Owns: a guess of which workers hold which blocks, made from routing decisions alone: when
a request is routed, its prompt blocks are assumed cached on the chosen worker for `ttl_s`
seconds (an engine usually keeps recent blocks that long), and the whole index holds at
most `max_entries` (worker, block) pairs, least recently inserted dropped first. Because the
TTL is the same for every entry and time comes from an injected monotonic clock, insertion
order is also expiry order, so one ordered dict serves as both the LRU and the TTL queue.

Same query interface as `kv.prefix_index.PrefixIndex` (`overlap`, `remove_worker`,
`check_integrity`). Pure Python; imports only `kv.prefix_index` (layer L1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvrelay.kv.prefix_index import WorkerId

Clock = Callable[[], float]  # monotonic seconds (time.monotonic, or a simulated clock)
DEFAULT_TTL_S = 120.0
DEFAULT_MAX_ENTRIES = 1 << 20


class ApproxPrefixIndex:
    """TTL + LRU bounded guess of cached blocks, fed by `insert` after each routing."""

    def __init__(
        self, clock: Clock, ttl_s: float = DEFAULT_TTL_S, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError(f"ttl_s must be > 0 and max_entries >= 1, got {ttl_s}, {max_entries}")
        self._clock = clock
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._expiry: OrderedDict[tuple[int, WorkerId], float] = OrderedDict()
        self._holders: dict[int, set[WorkerId]] = {}
        self._by_worker: dict[WorkerId, set[int]] = {}

    @property
    def workers(self) -> list[WorkerId]:
        return list(self._by_worker)

    def __len__(self) -> int:
        return len(self._expiry)

    def add_worker(self, worker_id: WorkerId) -> None:
        self._by_worker.setdefault(worker_id, set())

    def num_blocks(self, worker_id: WorkerId) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def insert(self, worker_id: WorkerId, block_hashes: Sequence[int]) -> None:
        """Assume `worker_id` now caches `block_hashes` (refreshing their TTL)."""
        self.expire()
        deadline = self._clock() + self._ttl_s
        held = self._by_worker.setdefault(worker_id, set())
        expiry = self._expiry
        for h in block_hashes:
            key = (h, worker_id)
            if key in expiry:
                expiry.move_to_end(key)
            else:
                held.add(h)
                self._holders.setdefault(h, set()).add(worker_id)
            expiry[key] = deadline
        while len(expiry) > self._max_entries:
            self._drop(*expiry.popitem(last=False)[0])

    def expire(self) -> int:
        """Drop entries whose TTL has passed; returns how many."""
        now = self._clock()
        expiry, n = self._expiry, 0
        while expiry:
            key, deadline = next(iter(expiry.items()))
            if deadline > now:
                break
            expiry.popitem(last=False)
            self._drop(*key)
            n += 1
        return n

    def overlap(self, block_hashes: Sequence[int]) -> dict[WorkerId, int]:
        """Leading blocks of `block_hashes` each worker is believed to hold (absent: 0)."""
        self.expire()
        if not block_hashes:
            return {}
        live = self._holders.get(block_hashes[0])
        if not live:
            return {}
        live = set(live)
        result: dict[WorkerId, int] = {}
        depth = 1
        for h in block_hashes[1:]:
            holders = self._holders.get(h)
            if holders is None or not live <= holders:
                nxt = live & holders if holders else set()
                for w in live - nxt:
                    result[w] = depth
                if not nxt:
                    return result
                live = nxt
            depth += 1
        for w in live:
            result[w] = depth
        return result

    def remove_worker(self, worker_id: WorkerId) -> None:
        for h in self._by_worker.pop(worker_id, set()):
            del self._expiry[(h, worker_id)]
            self._unhold(h, worker_id)

    def _drop(self, h: int, worker_id: WorkerId) -> None:
        self._by_worker[worker_id].discard(h)
        self._unhold(h, worker_id)

    def _unhold(self, h: int, worker_id: WorkerId) -> None:
        holders = self._holders[h]
        holders.discard(worker_id)
        if not holders:
            del self._holders[h]

    def check_integrity(self) -> None:
        """Expiry entries, holder sets and per-worker sets describe the same pairs; deadlines
        never decrease along the queue; the size bound holds."""
        assert len(self._expiry) <= self._max_entries
        pairs = {(h, w) for w, hs in self._by_worker.items() for h in hs}
        assert pairs == set(self._expiry), "per-worker sets disagree with the expiry queue"
        assert pairs == {(h, w) for h, ws in self._holders.items() for w in ws}
        assert all(self._holders.values()), "an empty holder set is stored"
        deadlines = list(self._expiry.values())
        assert deadlines == sorted(deadlines), "expiry queue out of order"
