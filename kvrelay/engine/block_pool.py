"""Block pool: the engine's KV memory as numbered blocks, with prefix caching.

Owns: ref counts, the hash -> block map of cached full blocks, the LRU queue of free
blocks (a free block that still holds a hash is cached and evictable; eviction takes
the least recently freed first), and the KV events those changes cause.
No torch, no clock of its own (timestamps are passed in). Imports only L0/L1 modules.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvrelay.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    full_dump_batch,
)

DUMP_RUN_BLOCKS = 4096  # hashes per BlockStored in a full dump (bounds one event's size)


@dataclass(eq=False, slots=True)
class KVBlock:
    """One block of KV memory; `block_hash` is set while it is in the prefix cache."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    """Fixed set of blocks. Invariant: a block is in the free queue iff its ref_cnt is 0."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # LRU order: eviction pops from the front, freeing appends at the back.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self._events: list[KVEvent] = []
        self._next_event_id = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (uncached free plus evictable cached)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks referenced by running requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        return self._cached.get(block_hash)

    # -- allocation ------------------------------------------------------------------------
    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take blocks from the LRU front, evicting their cached hashes; ref_cnt becomes 1."""
        if num_blocks > len(self._free):
            raise ValueError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out: list[KVBlock] = []
        evicted: list[int] = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        if evicted:
            self._events.append(BlockRemoved(block_hashes=evicted))
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks a request reuses (pulls them off the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the free queue in the given order,
        so the first ones given are evicted first."""
        for block in ordered_blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    # -- prefix cache ----------------------------------------------------------------------
    def cache_full_blocks(
        self,
        blocks: Sequence[KVBlock],
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        start: int,
        end: int,
    ) -> None:
        """Enter blocks[start:end] (full, computed) into the prefix cache under their hashes.

        A hash already cached by another block (two requests computed the same block) is
        left to that block. One BlockStored per contiguous run of newly cached blocks.
        """
        if not self.enable_caching:
            return
        run: list[int] = []
        run_start = start
        for i in range(start, end):
            block, h = blocks[i], block_hashes[i]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block
                if not run:
                    run_start = i
                run.append(h)
                continue
            self._emit_stored(run, block_hashes, token_ids, run_start)
            run = []
        self._emit_stored(run, block_hashes, token_ids, run_start)

    def _emit_stored(
        self, run: list[int], hashes: Sequence[int], token_ids: Sequence[int], first: int
    ) -> None:
        if not run:
            return
        bs = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=run,
                parent_block_hash=hashes[first - 1] if first > 0 else None,
                token_ids=list(token_ids[first * bs : (first + len(run)) * bs]),
                block_size=bs,
            )
        )

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their memory, just not their names)."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        self._events.append(AllBlocksCleared())

    # -- events ----------------------------------------------------------------------------
    def take_events(self, ts: float) -> KVEventBatch | None:
        """Events since the last call as one batch with the next monotonic event id."""
        if not self._events:
            return None
        batch = KVEventBatch(event_id=self._next_event_id, ts=ts, events=self._events)
        self._next_event_id += 1
        self._events = []
        return batch

    @property
    def last_event_id(self) -> int:
        """Id of the last batch `take_events` returned (-1 before the first)."""
        return self._next_event_id - 1

    def cached_runs(self, max_run: int = DUMP_RUN_BLOCKS) -> list[BlockStored]:
        """Every cached block as `BlockStored` runs of at most `max_run` hashes, in the order
        they were cached. A dump names blocks only: no parent, no token ids (a consumer
        needs hashes and tiers; chained hashes already encode each block's prefix)."""
        assert max_run > 0
        hashes = list(self._cached)
        return [
            BlockStored(
                block_hashes=hashes[i : i + max_run],
                parent_block_hash=None,
                token_ids=[],
                block_size=self.block_size,
            )
            for i in range(0, len(hashes), max_run)
        ]

    def dump_events(self, ts: float, max_run: int = DUMP_RUN_BLOCKS) -> KVEventBatch:
        """The whole cached set as one self-contained batch (`kv.events.full_dump_batch`)
        whose event id is the last one emitted. Events not yet taken are already reflected
        in it; they still go out later under newer ids, and applying them again over the
        dump is harmless (each hash ends in the state its last event says)."""
        return full_dump_batch(self.last_event_id, ts, self.cached_runs(max_run))

    # -- invariants ------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Free + cached-in-use + uncached-in-use == total; every hash maps to a live block."""
        free_ids = set(self._free)
        assert len(free_ids) == len(self._free)
        in_use = 0
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} ref_cnt {block.ref_cnt}"
            assert (block.ref_cnt == 0) == (block.block_id in free_ids), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} vs free queue membership"
            )
            in_use += block.ref_cnt > 0
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, (
                    f"block {block.block_id} has hash {block.block_hash} not mapped to it"
                )
        assert len(free_ids) + in_use == self.num_blocks
        for h, block in self._cached.items():
            assert block.block_hash == h, f"hash {h} maps to block {block.block_id} without it"
            assert self.blocks[block.block_id] is block
