"""Prefix index: which workers hold which KV blocks, by tier, fed by KV events.

Owns: the cluster-wide map block hash -> holding workers, each worker's cached hashes per
tier, per-worker event sequencing (gap detection, duplicate suppression, dump healing) and
`overlap`, the routing hot path. Pure Python and deterministic; imports only `kv.events`
and `kv.hashing` (layer L1) — never the engine, the router or anything that does I/O.

Representation. Every registered worker owns one bit; `_holders[h]` is the bit mask of the
workers that hold block `h` in at least one tier. Block hashes are chained, so a hash names
its whole prefix and `overlap` is a walk down the prompt's hashes AND-ing masks until no
worker is left. Masks instead of sets: a dict of small ints is several times smaller than
a dict of sets at a million entries, and `live & mask` is one machine-word operation.

Sequencing (per worker, `last` = highest applied event id):

* event id 0 without `AllBlocksCleared` is an engine's first batch (a fresh start or a
  restart): reset the worker, apply it, forget any dump in progress. (A restart is better
  signalled by the caller with remove_worker + add_worker when the instance id changes;
  this rule is the fallback.)
* a batch with `AllBlocksCleared` (a full dump, see `kv.events.full_dump_batch`, or a cache
  reset) describes the whole state: if it is newer than `last`, has id 0, or a dump is
  awaited, reset the worker, apply it, then replay remembered batches newer than it
  (APPLIED, or NEEDS_DUMP again when they are not contiguous). Ambiguity: while a dump is
  awaited, a restarted engine whose first batch clears looks like a dump taken after batch
  0, and the old incarnation's remembered batches would be replayed — another reason to
  signal restarts with remove_worker + add_worker.
* id <= last: a duplicate, ignored.
* id == last + 1 and no dump awaited: apply (APPLIED).
* otherwise (a gap, a worker with no history, or a dump awaited): apply best effort and
  remember the batch for the replay; NEEDS_DUMP the first time, then AWAITING_DUMP.

Stored blocks whose `block_size` differs from the index's are ignored and counted as
rejected: their hashes could never match a prompt hashed with the index's block size.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvrelay.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    clears_all,
)
from kvrelay.kv.hashing import DEFAULT_BLOCK_SIZE

WorkerId = str
DEFAULT_MAX_PENDING_BATCHES = 4096  # batches remembered per worker while a dump is awaited


class ApplyStatus(enum.Enum):
    APPLIED = "applied"  # in order (or self-contained): the worker's view is exact
    DUPLICATE = "duplicate"  # already applied (event id not newer); nothing changed
    NEEDS_DUMP = "needs_dump"  # applied best effort; ask the worker for a full dump now
    AWAITING_DUMP = "awaiting_dump"  # applied best effort; a dump was already asked for
    IGNORED = "ignored"  # not for this index (unregistered worker, approximate mode)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What applying one batch did. num_* count (block, tier) entries that changed."""

    status: ApplyStatus
    num_stored: int = 0
    num_removed: int = 0
    num_rejected: int = 0  # stored blocks ignored for a block-size mismatch
    reason: str = ""

    @property
    def needs_dump(self) -> bool:
        return self.status is ApplyStatus.NEEDS_DUMP


@dataclass(slots=True)
class _Counts:
    stored: int = 0
    removed: int = 0
    rejected: int = 0


@dataclass(slots=True)
class _WorkerState:
    bit: int
    tiers: dict[str, set[int]] = field(default_factory=dict)
    last_event_id: int | None = None  # None: no history yet
    awaiting_dump: bool = False
    pending: deque[KVEventBatch] = field(default_factory=deque)


class PrefixIndex:
    """Exact index built from KV events. Not thread-safe: one owner applies and queries."""

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_pending_batches: int = DEFAULT_MAX_PENDING_BATCHES,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._block_size = block_size
        self._max_pending = max_pending_batches
        self._holders: dict[int, int] = {}  # block hash -> bit mask of holding workers
        self._workers: dict[WorkerId, _WorkerState] = {}
        self._by_bit: dict[int, WorkerId] = {}  # bit -> worker, for decoding masks
        self._free_bits: list[int] = []
        self._next_bit = 1

    # -- membership -------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def workers(self) -> list[WorkerId]:
        return list(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def add_worker(self, worker_id: WorkerId) -> None:
        """Register a worker with no blocks and no history: its first batch must be
        self-contained (event id 0 or a dump) or the index asks for a dump."""
        if worker_id in self._workers:
            return
        bit = self._free_bits.pop() if self._free_bits else self._take_new_bit()
        self._workers[worker_id] = _WorkerState(bit=bit, pending=deque(maxlen=self._max_pending))
        self._by_bit[bit] = worker_id

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget a worker and every block it held."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._clear(state)
        del self._by_bit[state.bit]
        self._free_bits.append(state.bit)

    def awaiting_dump(self, worker_id: WorkerId) -> bool:
        state = self._workers.get(worker_id)
        return state is not None and state.awaiting_dump

    def last_event_id(self, worker_id: WorkerId) -> int | None:
        state = self._workers.get(worker_id)
        return None if state is None else state.last_event_id

    def num_blocks(self, worker_id: WorkerId, tier: str | None = None) -> int:
        """(block, tier) entries a worker holds, or distinct blocks in one tier."""
        state = self._workers.get(worker_id)
        if state is None:
            return 0
        if tier is not None:
            return len(state.tiers.get(tier, ()))
        return sum(len(s) for s in state.tiers.values())

    def blocks(self, worker_id: WorkerId) -> set[int]:
        """Distinct hashes a worker holds in any tier (a copy; for tests and dumps)."""
        state = self._workers.get(worker_id)
        return _all_hashes(state) if state else set()

    @property
    def num_hashes(self) -> int:
        """Distinct block hashes held anywhere in the cluster."""
        return len(self._holders)

    # -- queries (hot path) -----------------------------------------------------------------
    def overlap(self, block_hashes: Sequence[int]) -> dict[WorkerId, int]:
        """Length, in blocks, of the longest prefix of `block_hashes` each worker holds (any
        tier). Workers with no matched block are absent. Stops at the first block no
        remaining worker holds, so the cost is proportional to the longest match."""
        if not block_hashes:
            return {}
        holders = self._holders
        live = holders.get(block_hashes[0], 0)
        if not live:
            return {}
        result: dict[WorkerId, int] = {}
        depth = 1
        for h in block_hashes[1:]:
            nxt = live & holders.get(h, 0)
            if nxt != live:
                self._record(live & ~nxt, depth, result)
                if not nxt:
                    return result
                live = nxt
            depth += 1
        self._record(live, depth, result)
        return result

    def _record(self, mask: int, depth: int, result: dict[WorkerId, int]) -> None:
        by_bit = self._by_bit
        while mask:
            low = mask & -mask
            result[by_bit[low]] = depth
            mask ^= low

    # -- events -----------------------------------------------------------------------------
    def apply(self, worker_id: WorkerId, batch: KVEventBatch) -> ApplyResult:
        """Apply one batch from `worker_id` (registering the worker if new); see the module
        docstring for the sequencing rules."""
        self.add_worker(worker_id)
        state = self._workers[worker_id]
        last = state.last_event_id
        if clears_all(batch):
            if state.awaiting_dump or last is None or batch.event_id > last or batch.event_id == 0:
                return self._reset(state, batch, replay=True)
        elif batch.event_id == 0:
            return self._reset(state, batch, replay=False)
        if last is not None and batch.event_id <= last:
            return ApplyResult(ApplyStatus.DUPLICATE, reason=f"event id {batch.event_id} <= {last}")
        counts = self._apply_events(state, batch.events)
        if state.awaiting_dump or last is None or batch.event_id != last + 1:
            return self._best_effort(state, batch, counts)
        state.last_event_id = batch.event_id
        return _result(ApplyStatus.APPLIED, counts)

    def _reset(self, state: _WorkerState, batch: KVEventBatch, replay: bool) -> ApplyResult:
        """Replace the worker's blocks with a self-contained batch; with `replay`, re-apply
        the remembered batches newer than it (they happened after the dump was taken)."""
        self._clear(state)
        counts = self._apply_events(state, batch.events)
        state.last_event_id = batch.event_id
        pending = list(state.pending)
        state.pending.clear()
        state.awaiting_dump = False
        if not replay:
            return _result(ApplyStatus.APPLIED, counts, "engine started (event id 0)")
        by_id = {b.event_id: b for b in pending if b.event_id > batch.event_id}
        newer = [by_id[i] for i in sorted(by_id)]
        contiguous = True
        for b in newer:
            contiguous = contiguous and b.event_id == state.last_event_id + 1
            self._apply_events(state, b.events, counts)
            state.last_event_id = b.event_id
        if contiguous:
            return _result(ApplyStatus.APPLIED, counts)
        state.pending.extend(newer)
        state.awaiting_dump = True
        return _result(ApplyStatus.NEEDS_DUMP, counts, "batches missing after the dump")

    def _best_effort(
        self, state: _WorkerState, batch: KVEventBatch, counts: _Counts
    ) -> ApplyResult:
        """Out-of-order batch already applied: remember it for the replay after the dump."""
        last = state.last_event_id
        state.last_event_id = batch.event_id
        state.pending.append(batch)
        if state.awaiting_dump:
            return _result(ApplyStatus.AWAITING_DUMP, counts)
        state.awaiting_dump = True
        reason = (
            f"no history (first event id {batch.event_id})"
            if last is None
            else f"gap: expected event id {last + 1}, got {batch.event_id}"
        )
        return _result(ApplyStatus.NEEDS_DUMP, counts, reason)

    def _apply_events(
        self, state: _WorkerState, events: Sequence[KVEvent], counts: _Counts | None = None
    ) -> _Counts:
        counts = counts if counts is not None else _Counts()
        for ev in events:
            if isinstance(ev, BlockStored):
                if ev.block_size != self._block_size:
                    counts.rejected += len(ev.block_hashes)
                else:
                    counts.stored += self._store(state, ev.block_hashes, ev.tier)
            elif isinstance(ev, BlockRemoved):
                counts.removed += self._remove(state, ev.block_hashes, ev.tier)
            elif isinstance(ev, AllBlocksCleared):
                counts.removed += self._clear(state)
        return counts

    def _store(self, state: _WorkerState, hashes: Sequence[int], tier: str) -> int:
        tier_set = state.tiers.get(tier)
        if tier_set is None:
            tier_set = state.tiers[tier] = set()
        holders, bit, n = self._holders, state.bit, 0
        for h in hashes:
            if h in tier_set:
                continue
            tier_set.add(h)
            holders[h] = holders.get(h, 0) | bit
            n += 1
        return n

    def _remove(self, state: _WorkerState, hashes: Sequence[int], tier: str) -> int:
        tier_set = state.tiers.get(tier)
        if not tier_set:
            return 0
        others = [s for t, s in state.tiers.items() if t != tier and s]
        n = 0
        for h in hashes:
            if h not in tier_set:
                continue
            tier_set.remove(h)
            n += 1
            if not any(h in s for s in others):
                self._drop_holder(h, state.bit)
        return n

    def _clear(self, state: _WorkerState) -> int:
        """Drop every block of a worker, all tiers; returns the (block, tier) entries."""
        n = sum(len(s) for s in state.tiers.values())
        for h in _all_hashes(state):
            self._drop_holder(h, state.bit)
        state.tiers.clear()
        return n

    def _drop_holder(self, h: int, bit: int) -> None:
        mask = self._holders[h] & ~bit
        if mask:
            self._holders[h] = mask
        else:
            del self._holders[h]

    def _take_new_bit(self) -> int:
        bit = self._next_bit
        self._next_bit <<= 1
        return bit

    # -- invariants -------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Masks and per-worker tier sets describe the same (worker, block) pairs; bits are
        unique; no empty mask is stored; pending batches only while a dump is awaited."""
        assert len(self._by_bit) == len(self._workers)
        expected: dict[int, int] = {}
        for worker_id, state in self._workers.items():
            assert self._by_bit.get(state.bit) == worker_id, f"bit of {worker_id} not mapped"
            assert state.bit & (state.bit - 1) == 0, f"{worker_id} owns several bits"
            assert state.awaiting_dump or not state.pending, f"{worker_id} pending, no dump due"
            for h in _all_hashes(state):
                expected[h] = expected.get(h, 0) | state.bit
        assert not set(self._free_bits) & set(self._by_bit), "a free bit is in use"
        assert expected == self._holders, "holder masks disagree with per-worker blocks"

    def iter_worker_blocks(self) -> Iterator[tuple[WorkerId, str, int]]:
        """(worker, tier, hash) for every entry; for tests and debugging."""
        for worker_id, state in self._workers.items():
            for tier, hashes in state.tiers.items():
                for h in hashes:
                    yield worker_id, tier, h


def _result(status: ApplyStatus, counts: _Counts, reason: str = "") -> ApplyResult:
    return ApplyResult(status, counts.stored, counts.removed, counts.rejected, reason)


def _all_hashes(state: _WorkerState) -> set[int]:
    if len(state.tiers) == 1:
        return set(next(iter(state.tiers.values())))
    result: set[int] = set()
    return result.union(*state.tiers.values())
