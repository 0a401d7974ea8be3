"""Prefix index: sequencing, dumps, tiers, overlap — unit tests and a randomized cluster.

The property test drives simulated engines whose events are delivered, dropped or
duplicated, with dumps answered late and workers restarted or removed; after every step the
index must be internally consistent, its overlap must equal a brute-force walk over its own
view, and every worker the index believes exact must match its engine's true cached set.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    full_dump_batch,
)
from kvrelay.kv.hashing import hash_blocks
from kvrelay.kv.prefix_index import ApplyStatus, PrefixIndex

BS = 4
TIERS = ("device", "cpu")


def stored(hashes: list[int], tier: str = "device", block_size: int = BS) -> BlockStored:
    return BlockStored(hashes, None, [], block_size, tier)


def batch(event_id: int, *events: KVEvent) -> KVEventBatch:
    return KVEventBatch(event_id, 0.0, list(events))


def brute_overlap(view: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for worker, blocks in view.items():
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        if n:
            out[worker] = n
    return out


# -- unit tests ----------------------------------------------------------------------------


def test_overlap_walks_the_prefix_per_worker() -> None:
    idx = PrefixIndex(BS)
    h = hash_blocks(list(range(40)), BS)  # 10 blocks
    assert idx.apply("a", batch(0, stored(h[:6]))).status is ApplyStatus.APPLIED
    idx.apply("b", batch(0, stored(h[:2])))
    idx.apply("c", batch(0, stored(h[1:5])))  # no first block: matches nothing
    assert idx.overlap(h) == {"a": 6, "b": 2}
    assert idx.overlap(h[:1]) == {"a": 1, "b": 1}
    assert idx.overlap([]) == {}
    assert idx.overlap([12345]) == {}
    idx.check_integrity()


def test_in_order_duplicate_and_gap() -> None:
    idx = PrefixIndex(BS)
    assert idx.apply("w", batch(0, stored([1, 2]))).status is ApplyStatus.APPLIED
    assert idx.apply("w", batch(1, stored([3]))).status is ApplyStatus.APPLIED
    dup = idx.apply("w", batch(1, stored([3])))
    assert dup.status is ApplyStatus.DUPLICATE and dup.num_stored == 0
    gap = idx.apply("w", batch(3, BlockRemoved([2])))
    assert gap.needs_dump and "expected event id 2, got 3" in gap.reason
    assert idx.overlap([1, 2, 3]) == {"w": 1}  # applied best effort meanwhile
    assert idx.apply("w", batch(4, stored([9]))).status is ApplyStatus.AWAITING_DUMP
    assert idx.awaiting_dump("w")
    idx.check_integrity()


def test_dump_heals_and_replays_newer_batches() -> None:
    idx = PrefixIndex(BS)
    idx.apply("w", batch(0, stored([1, 2, 3])))
    idx.apply("w", batch(2, BlockRemoved([3])))  # batch 1 (stored [4]) was lost
    idx.apply("w", batch(3, stored([5])))
    # The dump was taken after batch 2; batch 3 arrived before it and must be replayed.
    dump = full_dump_batch(2, 0.0, [stored([1, 2, 4])])
    result = idx.apply("w", dump)
    assert result.status is ApplyStatus.APPLIED
    assert idx.blocks("w") == {1, 2, 4, 5}
    assert not idx.awaiting_dump("w") and idx.last_event_id("w") == 3
    assert idx.apply("w", batch(4, stored([6]))).status is ApplyStatus.APPLIED
    idx.check_integrity()


def test_dump_with_missing_later_batches_asks_again() -> None:
    idx = PrefixIndex(BS)
    idx.apply("w", batch(0, stored([1])))
    idx.apply("w", batch(5, stored([2])))  # gap -> dump requested
    result = idx.apply("w", full_dump_batch(3, 0.0, [stored([1, 7])]))  # 4 never seen
    assert result.needs_dump and idx.awaiting_dump("w")
    assert idx.apply("w", full_dump_batch(5, 0.0, [stored([1, 2, 7])])).status is (
        ApplyStatus.APPLIED
    )
    assert idx.blocks("w") == {1, 2, 7}


def test_unknown_worker_mid_stream_needs_dump_but_fresh_one_does_not() -> None:
    idx = PrefixIndex(BS)
    late = idx.apply("late", batch(7, stored([1])))
    assert late.needs_dump and "no history" in late.reason
    idx.add_worker("fresh")
    assert idx.apply("fresh", batch(0, stored([1]))).status is ApplyStatus.APPLIED
    # An empty engine's dump (nothing emitted yet) has event id -1.
    idx.add_worker("idle")
    assert idx.apply("idle", full_dump_batch(-1, 0.0, [])).status is ApplyStatus.APPLIED
    assert idx.apply("idle", batch(0, stored([2]))).status is ApplyStatus.APPLIED


def test_restart_resets_the_worker() -> None:
    idx = PrefixIndex(BS)
    idx.apply("w", batch(0, stored([1, 2])))
    idx.apply("w", batch(1, stored([3])))
    assert idx.apply("w", batch(0, stored([9]))).status is ApplyStatus.APPLIED
    assert idx.blocks("w") == {9}


def test_tiers_are_tracked_separately() -> None:
    idx = PrefixIndex(BS)
    idx.apply("w", batch(0, stored([1, 2]), stored([2], tier="cpu")))
    idx.apply("w", batch(1, BlockRemoved([2])))  # gone from device, still on cpu
    assert idx.overlap([1, 2]) == {"w": 2}
    assert idx.num_blocks("w", "device") == 1 and idx.num_blocks("w", "cpu") == 1
    idx.apply("w", batch(2, BlockRemoved([2], tier="cpu")))
    assert idx.overlap([1, 2]) == {"w": 1}
    idx.apply("w", batch(3, AllBlocksCleared()))
    assert idx.overlap([1, 2]) == {} and idx.num_hashes == 0
    idx.check_integrity()


def test_block_size_mismatch_is_rejected() -> None:
    idx = PrefixIndex(BS)
    result = idx.apply("w", batch(0, stored([1, 2], block_size=BS * 2)))
    assert result.num_rejected == 2 and result.num_stored == 0
    assert idx.overlap([1]) == {}


def test_remove_worker_frees_its_bit_and_blocks() -> None:
    idx = PrefixIndex(BS)
    for i, w in enumerate(("a", "b", "c")):
        idx.apply(w, batch(0, stored([100, 200 + i])))
    idx.remove_worker("b")
    assert idx.overlap([100]) == {"a": 1, "c": 1}
    idx.apply("d", batch(0, stored([100])))  # reuses b's bit
    assert idx.overlap([100]) == {"a": 1, "c": 1, "d": 1}
    assert idx.workers == ["a", "c", "d"]
    idx.check_integrity()


# -- randomized cluster ----------------------------------------------------------------------

UNIVERSE = list(range(1, 11))
NUM_ENGINES = 3


class Engine:
    """An engine's true cached set per tier and its event ids."""

    def __init__(self) -> None:
        self.tiers: dict[str, set[int]] = {t: set() for t in TIERS}
        self.next_id = 0

    def emit(self, events: list[KVEvent]) -> KVEventBatch:
        for ev in events:
            if isinstance(ev, BlockStored):
                self.tiers[ev.tier].update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                self.tiers[ev.tier].difference_update(ev.block_hashes)
            else:
                for s in self.tiers.values():
                    s.clear()
        b = KVEventBatch(self.next_id, 0.0, events)
        self.next_id += 1
        return b

    def dump(self) -> KVEventBatch:
        runs = [stored(sorted(s), t) for t, s in self.tiers.items() if s]
        return full_dump_batch(self.next_id - 1, 0.0, runs)

    def entries(self) -> set[tuple[str, int]]:
        return {(t, h) for t, s in self.tiers.items() for h in s}


def event_for(kind: str, hashes: list[int], tier: str) -> list[KVEvent]:
    if kind == "store":
        return [stored(hashes, tier)]
    if kind == "remove":
        return [BlockRemoved(hashes, tier)]
    return [AllBlocksCleared(), stored(hashes, tier)]  # a reset, then new blocks


OPS = st.tuples(
    st.sampled_from(["store"] * 4 + ["remove"] * 3 + ["clear", "restart", "forget", "dump"]),
    st.integers(0, NUM_ENGINES - 1),
    st.lists(st.sampled_from(UNIVERSE), max_size=5),
    st.sampled_from(TIERS),
    st.sampled_from(["deliver"] * 6 + ["drop", "dup"]),
)


class Cluster:
    def __init__(self, max_pending: int) -> None:
        self.index = PrefixIndex(BS, max_pending_batches=max_pending)
        self.engines = [Engine() for _ in range(NUM_ENGINES)]
        self.dumps: dict[str, KVEventBatch] = {}  # answered late, taken when asked
        self.undetected = dict.fromkeys(self.names(), False)  # a loss the index cannot know
        self.must_deliver: set[str] = set()

    @staticmethod
    def names() -> list[str]:
        return [f"w{i}" for i in range(NUM_ENGINES)]

    def deliver(self, name: str, b: KVEventBatch) -> None:
        result = self.index.apply(name, b)
        if b.event_id == self.engines[int(name[1:])].next_id - 1:
            # The newest batch reveals any earlier loss (as a gap); an older one (a dump
            # taken before a batch that was then dropped) cannot.
            self.undetected[name] = False
        if result.needs_dump:
            self.dumps[name] = self.engines[int(name[1:])].dump()

    def step(self, kind: str, i: int, hashes: list[int], tier: str, delivery: str) -> None:
        name = f"w{i}"
        if kind == "restart":
            self.engines[i] = Engine()
            self.dumps.pop(name, None)  # a reply from the old incarnation is discarded
            if delivery == "drop":  # the service saw the instance id change
                self.index.remove_worker(name)
                self.index.add_worker(name)
            else:  # the index finds out from event id 0, which must then arrive
                self.must_deliver.add(name)
                self.undetected[name] = True
            return
        if kind == "forget":
            self.index.remove_worker(name)
            self.dumps.pop(name, None)
            return
        if kind == "dump":
            if name in self.dumps:
                self.deliver(name, self.dumps.pop(name))
            return
        if name in self.must_deliver and kind == "clear":
            kind = "store"  # see PrefixIndex: a first batch that clears looks like a dump
        b = self.engines[i].emit(event_for(kind, hashes, tier))
        if delivery == "drop" and name not in self.must_deliver:
            self.undetected[name] = True
            return
        self.must_deliver.discard(name)
        self.deliver(name, b)
        if delivery == "dup":
            self.deliver(name, b)

    def check(self, queries: list[list[int]]) -> None:
        idx = self.index
        idx.check_integrity()
        view = {w: idx.blocks(w) for w in idx.workers}
        for q in queries:
            assert idx.overlap(q) == brute_overlap(view, q)
        for i, engine in enumerate(self.engines):
            name = f"w{i}"
            if name in idx and not idx.awaiting_dump(name) and not self.undetected[name]:
                got = {(t, h) for w, t, h in idx.iter_worker_blocks() if w == name}
                assert got == engine.entries(), f"{name} believed exact but differs"


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(OPS, max_size=60),
    queries=st.lists(st.lists(st.sampled_from(UNIVERSE), max_size=6), min_size=1, max_size=4),
    max_pending=st.sampled_from([2, 64]),
)
def test_random_event_streams_keep_the_index_consistent(
    ops: list[tuple[str, int, list[int], str, str]],
    queries: list[list[int]],
    max_pending: int,
) -> None:
    cluster = Cluster(max_pending)
    for op in ops:
        cluster.step(*op)
        cluster.check(queries)
    # Heal: one more batch per engine reveals any loss or restart; requested dumps answer.
    for i, engine in enumerate(cluster.engines):
        name = f"w{i}"
        cluster.deliver(name, engine.emit([stored([])]))
        for _ in range(2):  # a stale dump (pending overflowed) asks for a fresher one
            if name in cluster.dumps:
                cluster.deliver(name, cluster.dumps.pop(name))
        assert not cluster.index.awaiting_dump(name)
        assert cluster.index.blocks(name) == {h for _, h in engine.entries()}
    cluster.check(queries)
