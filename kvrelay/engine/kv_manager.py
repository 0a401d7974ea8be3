"""KV cache manager: which blocks each request holds, prefix-cache lookups, hit accounting.

Owns: the request -> block table map, `get_computed_blocks` (longest cached prefix),
`allocate_slots` (None when out of memory), `free`, caching of newly computed full blocks,
the prefix-cache query/hit counters in tokens, and KV imports: blocks held for a request
whose KV arrives from another engine (`begin_import` / `commit_import` / `end_import`).
No torch. Imports L0/L1 and block_pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvrelay.engine.block_pool import BlockPool, KVBlock
from kvrelay.engine.request import Request
from kvrelay.kv.events import KVEventBatch


@dataclass
class PrefixCacheStats:
    """Token-weighted counters since start: prompt tokens looked up and found cached."""

    num_queries: int = 0  # requests admitted
    num_query_tokens: int = 0
    num_hit_tokens: int = 0
    num_preempted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


@dataclass
class KVImport:
    """Blocks held for a request whose prompt KV is being imported.

    `blocks[i]` holds prompt block i: the leading `num_cached` were already cached here
    (held so they cannot be evicted meanwhile), the rest were allocated for the imported KV
    and enter the prefix cache as their runs arrive (`num_committed` of them so far).
    """

    request_id: str
    block_hashes: list[int]  # of the prompt's blocks [0, len(blocks))
    token_ids: list[int]  # the prompt, for the BlockStored events
    blocks: list[KVBlock]
    num_cached: int
    num_committed: int = 0

    @property
    def missing_hashes(self) -> list[int]:
        return self.block_hashes[self.num_cached :]

    @property
    def missing_block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks[self.num_cached :]]

    @property
    def next_block(self) -> int:
        """Prompt index of the next block to import."""
        return self.num_cached + self.num_committed


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.stats = PrefixCacheStats()
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of the request already cached
        self._imports: dict[str, KVImport] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest run of the request's leading full blocks found in the prefix cache, and the
        tokens they cover. The last token is never a hit: it must be computed for logits."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def num_cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of a hash chain are in the prefix cache now."""
        n = 0
        while n < len(block_hashes) and self.pool.get_cached_block(block_hashes[n]) is not None:
            n += 1
        return n

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
    ) -> list[KVBlock] | None:
        """Make room for `num_new_tokens` more tokens after the request's computed ones
        (plus `new_computed_blocks` reused from the cache on admission). Returns the newly
        allocated blocks, or None, changing nothing, when memory is short."""
        computed = new_computed_blocks or []
        held = self._req_blocks.setdefault(request.request_id, [])
        num_total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_required = -(-num_total // self.block_size)
        num_new_blocks = max(0, num_required - len(held) - len(computed))
        # Reused blocks sitting in the free queue stop being allocatable once touched.
        num_reused_free = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_reused_free:
            if not held:
                del self._req_blocks[request.request_id]
            return None
        if computed:
            self.pool.touch(computed)
            held.extend(computed)
            self._num_cached[request.request_id] = len(computed)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        held.extend(new_blocks)
        if new_computed_blocks is not None and request.request_id in self._imports:
            self.end_import(request.request_id)  # admitted: its own references keep them
        return new_blocks

    def record_admission(self, request: Request, num_hit_tokens: int) -> None:
        """Count a request's prefix-cache lookup (once per admission, in tokens)."""
        self.stats.num_queries += 1
        self.stats.num_query_tokens += request.num_tokens
        self.stats.num_hit_tokens += num_hit_tokens

    def cache_blocks(self, request: Request) -> None:
        """Enter the request's newly completed full blocks (per num_computed_tokens)."""
        blocks = self._req_blocks.get(request.request_id)
        if not blocks or not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = request.block_hashes
        self.pool.cache_full_blocks(blocks, hashes, request.all_token_ids, start, num_full)
        self._num_cached[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its shared prefix is evicted last."""
        self.end_import(request.request_id)
        blocks = self._req_blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    # -- KV import ---------------------------------------------------------------------------
    def begin_import(
        self, request_id: str, block_hashes: Sequence[int], token_ids: Sequence[int]
    ) -> KVImport | None:
        """Hold the cached leading blocks of `block_hashes` and allocate blocks for the rest,
        whose KV will be imported. None, changing nothing, when memory is short (or prefix
        caching is off). The hold ends when the request is admitted, freed, or `end_import`.
        """
        if not self.enable_caching or request_id in self._imports:
            return None
        num_cached = self.num_cached_prefix_blocks(block_hashes)
        cached = [self.pool.get_cached_block(h) for h in block_hashes[:num_cached]]
        hits = [b for b in cached if b is not None]
        num_missing = len(block_hashes) - num_cached
        if num_missing > self.pool.num_free_blocks - sum(1 for b in hits if b.ref_cnt == 0):
            return None
        self.pool.touch(hits)
        blocks = hits + self.pool.get_new_blocks(num_missing)
        imp = KVImport(request_id, list(block_hashes), list(token_ids), blocks, num_cached)
        self._imports[request_id] = imp
        return imp

    def get_import(self, request_id: str) -> KVImport | None:
        return self._imports.get(request_id)

    def commit_import(self, request_id: str, num_blocks: int) -> None:
        """The next `num_blocks` imported blocks hold their KV now: enter them into the
        prefix cache (BlockStored events), so the request and later ones hit them."""
        imp = self._imports[request_id]
        start = imp.next_block
        end = start + num_blocks
        assert end <= len(imp.blocks), f"{request_id}: commit past the imported blocks"
        self.pool.cache_full_blocks(imp.blocks, imp.block_hashes, imp.token_ids, start, end)
        imp.num_committed += num_blocks

    def end_import(self, request_id: str) -> None:
        """Drop an import's hold: committed blocks stay cached (evictable), blocks whose KV
        never arrived return to the pool uncached."""
        imp = self._imports.pop(request_id, None)
        if imp is not None:
            self.pool.free_blocks(reversed(imp.blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, [])]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._req_blocks.get(request_id, []))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def take_events(self, ts: float) -> KVEventBatch | None:
        return self.pool.take_events(ts)

    def dump_events(self, ts: float) -> KVEventBatch:
        """Every cached block as a full-dump batch (for a router healing a gap)."""
        return self.pool.dump_events(ts)

    def check_integrity(self) -> None:
        """Pool invariants, plus: every block's ref_cnt equals the requests holding it."""
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        held = [imp.blocks for imp in self._imports.values()]
        for blocks in [*self._req_blocks.values(), *held]:
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == refs.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, held {refs.get(block.block_id)}"
            )
