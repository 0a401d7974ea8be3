"""Block pool and KV cache manager: unit and property tests (no torch)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.engine.block_pool import BlockPool
from kvrelay.engine.kv_manager import KVCacheManager
from kvrelay.engine.request import Request
from kvrelay.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvrelay.kv.prefix_index import ApplyStatus, PrefixIndex
from kvrelay.protocol import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1), BS, arrival_time=0.0)


class EventReplay:
    """Rebuilds the set of cached hashes from the event stream alone, as a router would."""

    def __init__(self) -> None:
        self.cached: set[int] = set()
        self.stored: set[int] = set()
        self.removed: set[int] = set()
        self.last_id = -1

    def apply(self, batch: KVEventBatch | None) -> None:
        if batch is None:
            return
        assert batch.event_id == self.last_id + 1, "event ids must be monotonic without gaps"
        self.last_id = batch.event_id
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size
                for h in ev.block_hashes:
                    assert h not in self.cached, "stored twice without removal"
                    self.cached.add(h)
                    self.stored.add(h)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in self.cached, "removed a hash that was never stored"
                    self.cached.discard(h)
                    self.removed.add(h)
            elif isinstance(ev, AllBlocksCleared):
                self.cached.clear()


def compute_all(kv: KVCacheManager, req: Request) -> bool:
    """Admit a request and mark all its prompt tokens computed, as the scheduler would."""
    hits, num_hit = kv.get_computed_blocks(req)
    if kv.allocate_slots(req, req.num_tokens - num_hit, hits) is None:
        return False
    kv.record_admission(req, num_hit)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)
    return True


def test_prefix_hit_counts_tokens_and_never_includes_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(12))  # exactly 3 full blocks
    assert compute_all(kv, make_request("a", prompt))
    b = make_request("b", prompt)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8  # 2 blocks: the last token must be recomputed for logits
    assert [blk.block_hash for blk in hits] == b.block_hashes[:2]
    assert compute_all(kv, b)
    assert kv.stats.num_query_tokens == 24 and kv.stats.num_hit_tokens == 8
    kv.check_integrity()


def test_allocate_returns_none_without_changing_state() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    big = make_request("big", list(range(20)))  # needs 5 blocks
    assert kv.allocate_slots(big, 20) is None
    assert kv.num_free_blocks == 3 and kv.get_block_ids("big") == []
    kv.check_integrity()


def test_lru_evicts_oldest_freed_and_emits_removal() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    replay = EventReplay()
    a, b = make_request("a", list(range(9))), make_request("b", list(range(100, 109)))
    assert compute_all(kv, a) and compute_all(kv, b)
    kv.free(a)
    kv.free(b)
    replay.apply(kv.take_events(0.0))
    assert replay.cached == set(a.block_hashes + b.block_hashes)
    c = make_request("c", list(range(200, 213)))
    assert compute_all(kv, c)  # 4 blocks: evicts a's (freed first) before b's
    replay.apply(kv.take_events(1.0))
    assert set(a.block_hashes) <= replay.removed
    assert kv.get_computed_blocks(make_request("b2", list(range(100, 109))))[1] == 8
    kv.check_integrity()


def test_reset_prefix_cache_emits_all_cleared() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert compute_all(kv, make_request("a", list(range(9))))
    kv.reset_prefix_cache()
    batch = kv.take_events(0.0)
    assert batch is not None and isinstance(batch.events[-1], AllBlocksCleared)
    assert kv.pool.num_cached_blocks == 0
    kv.check_integrity()


def test_extra_keys_separate_identical_tokens() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert compute_all(kv, make_request("a", list(range(9))))
    salted = Request("s", list(range(9)), SamplingParams(), BS, 0.0, extra_keys=b"salt=x")
    assert kv.get_computed_blocks(salted)[1] == 0


def test_dump_lists_every_cached_block_and_heals_a_router_index() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    index = PrefixIndex(BS)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(50, 63)))
    assert compute_all(kv, a)
    kv.free(a)
    first = kv.take_events(0.0)
    assert first is not None and index.apply("w", first).status is ApplyStatus.APPLIED
    assert compute_all(kv, b)  # stores b's blocks in a batch that is lost below
    kv.free(b)
    lost = kv.take_events(1.0)
    assert lost is not None and lost.event_id == 1
    c = make_request("c", list(range(100, 106)))
    assert compute_all(kv, c)
    kv.free(c)
    after = kv.take_events(2.0)
    assert after is not None and index.apply("w", after).needs_dump  # the gap is seen
    dump = kv.dump_events(3.0)
    assert dump.event_id == 2 and isinstance(dump.events[0], AllBlocksCleared)
    runs = [ev for ev in dump.events[1:] if isinstance(ev, BlockStored)]
    cached = {h for run in runs for h in run.block_hashes}
    assert cached == set(kv.pool._cached) and len(cached) == kv.pool.num_cached_blocks
    assert all(run.block_size == BS and run.token_ids == [] for run in runs)
    assert index.apply("w", dump).status is ApplyStatus.APPLIED
    assert index.blocks("w") == cached and not index.awaiting_dump("w")
    index.check_integrity()


def test_dump_runs_are_bounded_and_id_is_minus_one_before_any_batch() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    assert kv.dump_events(0.0).event_id == -1
    assert compute_all(kv, make_request("a", list(range(41))))  # 10 full blocks
    dump = kv.pool.dump_events(0.0, max_run=4)
    runs = [ev for ev in dump.events if isinstance(ev, BlockStored)]
    assert [len(run.block_hashes) for run in runs] == [4, 4, 2]
    assert dump.event_id == -1  # the storing batch was not taken yet: its id comes later


ops = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "free", "grow", "reset"]),
        st.integers(0, 5),  # prefix family: requests of one family share leading blocks
        st.integers(1, 30),  # length
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(4, 24))
def test_random_operations_keep_integrity_and_event_replay(
    ops: list[tuple[str, int, int]], num_blocks: int
) -> None:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BS)
    replay = EventReplay()
    live: dict[str, Request] = {}
    ids = itertools.count()
    for op, family, length in ops:
        if op == "alloc":
            req = make_request(f"r{next(ids)}", [family * 1000 + i for i in range(length)])
            if compute_all(kv, req):
                live[req.request_id] = req
        elif op == "free" and live:
            kv.free(live.pop(sorted(live)[family % len(live)]))
        elif op == "grow" and live:
            req = live[sorted(live)[family % len(live)]]
            req.append_output_token(family)
            if kv.allocate_slots(req, 1) is not None:
                req.num_computed_tokens += 1
                kv.cache_blocks(req)
        elif op == "reset":
            kv.reset_prefix_cache()
        kv.check_integrity()
        replay.apply(kv.take_events(0.0))
        assert replay.cached == set(kv.pool._cached), "event stream disagrees with the pool"
    for req in live.values():
        kv.free(req)
    # Allocating the whole pool evicts every cached block: each needs its removal event.
    kv.allocate_slots(make_request("all", [7] * (num_blocks * BS)), num_blocks * BS)
    kv.check_integrity()
    replay.apply(kv.take_events(0.0))
    assert not replay.cached
    assert kv.pool.num_cached_blocks == 0


def test_pool_rejects_overallocation() -> None:
    pool = BlockPool(2, BS)
    try:
        pool.get_new_blocks(3)
    except ValueError as e:
        assert "free" in str(e)
    else:
        raise AssertionError("expected ValueError")
