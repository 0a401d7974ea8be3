"""KV import bookkeeping in the KV cache manager (no torch): holds, commits, events, release."""

from __future__ import annotations

from kvrelay.engine.kv_manager import KVCacheManager
from kvrelay.engine.request import Request
from kvrelay.kv.events import BlockRemoved, BlockStored
from kvrelay.kv.hashing import hash_blocks
from kvrelay.protocol import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1), BS, arrival_time=0.0)


def compute_all(kv: KVCacheManager, req: Request) -> None:
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
    kv.record_admission(req, num_hit)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)


def stored_hashes(kv: KVCacheManager) -> list[int]:
    batch = kv.take_events(0.0)
    events = [] if batch is None else batch.events
    return [h for ev in events if isinstance(ev, BlockStored) for h in ev.block_hashes]


def test_import_holds_prefix_caches_commits_and_admission_releases() -> None:
    kv = KVCacheManager(num_blocks=12, block_size=BS)
    prompt = list(range(100, 125))  # 6 full blocks + 1 token
    hashes = hash_blocks(prompt, BS)
    warm = make_request("warm", prompt[:9])  # caches blocks 0, 1
    compute_all(kv, warm)
    kv.free(warm)
    kv.take_events(0.0)

    imp = kv.begin_import("r", hashes, prompt)
    assert imp is not None
    assert imp.num_cached == 2 and imp.missing_hashes == hashes[2:] and imp.next_block == 2
    assert len(set(imp.missing_block_ids)) == 4
    kv.check_integrity()
    assert kv.num_free_blocks == 12 - 6  # the held prefix cannot be evicted
    kv.commit_import("r", 3)
    assert stored_hashes(kv) == hashes[2:5]
    assert kv.num_cached_prefix_blocks(hashes) == 5

    req = make_request("r", prompt)
    hits, num_hit = kv.get_computed_blocks(req)
    assert num_hit == 5 * BS
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
    assert kv.get_import("r") is None  # admission ended the hold
    kv.check_integrity()
    kv.free(req)
    kv.check_integrity()
    assert kv.num_free_blocks == 12


def test_abandoned_import_returns_uncommitted_blocks_uncached() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(21))
    hashes = hash_blocks(prompt, BS)
    imp = kv.begin_import("r", hashes, prompt)
    assert imp is not None and imp.num_cached == 0
    kv.commit_import("r", 2)
    kv.end_import("r")
    kv.check_integrity()
    assert kv.num_free_blocks == 8
    assert kv.num_cached_prefix_blocks(hashes) == 2  # committed blocks stay cached
    assert kv.pool.num_cached_blocks == 2
    assert stored_hashes(kv) == hashes[:2]
    kv.end_import("r")  # idempotent


def test_import_refused_when_memory_is_short_and_nothing_changes() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(30))
    hashes = hash_blocks(prompt, BS)
    assert kv.begin_import("r", hashes, prompt) is None
    kv.check_integrity()
    assert kv.num_free_blocks == 4 and kv.take_events(0.0) is None
    assert KVCacheManager(4, BS, enable_caching=False).begin_import("r", [], []) is None


def test_import_allocation_evicts_lru_blocks_with_events() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    old = make_request("old", list(range(500, 516)))  # caches 4 blocks
    compute_all(kv, old)
    kv.free(old)
    kv.take_events(0.0)
    prompt = list(range(9))
    imp = kv.begin_import("r", hash_blocks(prompt, BS), prompt)
    assert imp is not None
    batch = kv.take_events(0.0)
    assert batch is not None and isinstance(batch.events[0], BlockRemoved)
    kv.check_integrity()
