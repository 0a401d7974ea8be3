"""KV cache manager: which blocks each request holds, prefix-cache lookups, hit accounting.

Owns: the request -> block table map, `get_computed_blocks` (longest cached prefix),
`allocate_slots` (None when out of memory), `free`, caching of newly computed full blocks,
and the prefix-cache query/hit counters in tokens. No torch. Imports L0/L1 and block_pool.
"""

from __future__ import annotations

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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.stats = PrefixCacheStats()
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of the request already cached

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
        blocks = self._req_blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, [])]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._req_blocks.get(request_id, []))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def take_events(self, ts: float) -> KVEventBatch | None:
        return self.pool.take_events(ts)

    def check_integrity(self) -> None:
        """Pool invariants, plus: every block's ref_cnt equals the requests holding it."""
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for blocks in self._req_blocks.values():
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == refs.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, held {refs.get(block.block_id)}"
            )
