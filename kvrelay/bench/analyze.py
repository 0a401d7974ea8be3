"""Offline prefix-cache analysis of a workload or trace: how much of it a KV cache could serve.

Owns: `prompt_blocks` (a request's chained block keys), `ordered_requests` (the order analysis
replays: trace time, or sessions interleaved round-robin), and `analyze`: the ideal hit rate
(an infinite cache shared by everything: a block hits when the same prefix was seen before)
and the hit rate under LRU caches of given sizes, by blocks and by tokens.

Block keys: token-level requests use `kvrelay.kv.hashing.hash_blocks`, the engine's own hash,
so the analysis names blocks exactly as the engine does (full blocks only). Traces analysed
without tokens use their block ids chained into prefix keys; at the trace's own block size the
partial last block counts (the published Mooncake figures count it); at a block size dividing
the trace's, block id h stands for sub-blocks (h, 0..n-1) and only full blocks count.
LRU: a request touches its blocks last-to-first, so the first blocks of a prompt are the most
recent and eviction eats prompts from their tails, as prefix caches free blocks.
Must not import the load client or reports.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvrelay.bench.tokens import TextTokenizer, prompt_token_ids
from kvrelay.bench.workloads.base import RequestSpec, Workload
from kvrelay.errors import InvalidRequestError
from kvrelay.kv.hashing import hash_blocks


@dataclass(frozen=True)
class PromptBlocks:
    """A prompt as chained block keys and the number of tokens each block holds."""

    keys: list[int]
    block_tokens: list[int]
    num_prompt_tokens: int


class BlockKeyInterner:
    """Chained keys for trace block ids: key(i) = id of (key(i-1), block item), exact (no
    hashing, no collisions) within one analysis."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, object], int] = {}

    def chain(self, items: Iterable[object]) -> list[int]:
        keys: list[int] = []
        parent = -1
        for item in items:
            parent = self._ids.setdefault((parent, item), len(self._ids))
            keys.append(parent)
        return keys


def prompt_blocks(
    request: RequestSpec,
    block_size: int,
    tokenizer: TextTokenizer | None,
    interner: BlockKeyInterner,
) -> PromptBlocks:
    """The block keys of `request` at `block_size` (see the module docstring for the rules)."""
    if request.block_ids is not None and not request.prompt_token_ids:
        return _trace_blocks(request, block_size, interner)
    ids = prompt_token_ids(request, tokenizer)
    keys = hash_blocks(ids, block_size)
    return PromptBlocks(keys, [block_size] * len(keys), len(ids))


def _trace_blocks(
    request: RequestSpec, block_size: int, interner: BlockKeyInterner
) -> PromptBlocks:
    assert request.block_ids is not None
    trace_size = request.block_size or block_size
    num_tokens = request.num_prompt_tokens_hint
    if num_tokens is None:
        num_tokens = len(request.block_ids) * trace_size
    ids = request.block_ids
    if block_size == trace_size:
        keys = interner.chain(ids)
        sizes = [trace_size] * len(keys)
        if sizes:
            sizes[-1] = num_tokens - trace_size * (len(sizes) - 1)
        return PromptBlocks(keys, sizes, num_tokens)
    num_full = num_tokens // block_size
    if trace_size % block_size == 0:
        per = trace_size // block_size
        items: list[object] = [(ids[i // per], i % per) for i in range(num_full)]
    elif block_size % trace_size == 0:
        per = block_size // trace_size
        items = [tuple(ids[i * per : (i + 1) * per]) for i in range(num_full)]
    else:
        raise InvalidRequestError(
            f"block size {block_size} and the trace's block size {trace_size} must divide one "
            "another"
        )
    return PromptBlocks(interner.chain(items), [block_size] * num_full, num_tokens)


def ordered_requests(
    workload: Workload, num_requests: int | None = None, concurrency: int = 1
) -> Iterator[RequestSpec]:
    """Requests in replay order: by trace time when turns carry times (finite traces), else
    `concurrency` sessions interleaved turn by turn (a new session takes a finished one's
    place). Stops after `num_requests` when given."""
    sessions = workload.sessions()
    first = next(sessions, None)
    if first is None:
        return iter(())
    sessions = itertools.chain([first], sessions)
    if first.turns and first.turns[0].at_s is not None:
        turns = sorted((t for s in sessions for t in s.turns), key=lambda t: t.at_s or 0.0)
        stream: Iterator[RequestSpec] = (t.request for t in turns)
    else:
        stream = _interleaved(sessions, max(1, concurrency))
    return itertools.islice(stream, num_requests) if num_requests is not None else stream


def _interleaved(sessions: Iterator[Any], concurrency: int) -> Iterator[RequestSpec]:
    active: list[Iterator[RequestSpec]] = []
    while True:
        while len(active) < concurrency:
            session = next(sessions, None)
            if session is None:
                break
            active.append(iter([t.request for t in session.turns]))
        if not active:
            return
        for turns in list(active):
            request = next(turns, None)
            if request is None:
                active.remove(turns)
            else:
                yield request


@dataclass
class HitCounts:
    """Token- and block-weighted hits of one cache model."""

    num_blocks: int = 0
    hit_blocks: int = 0
    num_tokens: int = 0
    hit_tokens: int = 0

    def add(self, blocks: PromptBlocks, num_hit: int) -> None:
        self.num_blocks += len(blocks.keys)
        self.hit_blocks += num_hit
        self.num_tokens += blocks.num_prompt_tokens
        self.hit_tokens += sum(blocks.block_tokens[:num_hit])

    def rates(self) -> dict[str, float]:
        return {
            "block_hit_rate": self.hit_blocks / self.num_blocks if self.num_blocks else 0.0,
            "token_hit_rate": self.hit_tokens / self.num_tokens if self.num_tokens else 0.0,
        }


class LRUBlockCache:
    """A block-granular LRU prefix cache of `capacity` blocks."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidRequestError(f"cache size must be >= 1 block, got {capacity}")
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.counts = HitCounts()

    def access(self, blocks: PromptBlocks) -> int:
        num_hit = _prefix_hits(blocks.keys, self._blocks)
        for key in reversed(blocks.keys):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        self.counts.add(blocks, num_hit)
        return num_hit


def _prefix_hits(keys: Sequence[int], present: Any) -> int:
    for i, key in enumerate(keys):
        if key not in present:
            return i
    return len(keys)


@dataclass
class AnalysisResult:
    """What `kvrelay bench analyze` reports (JSON-serializable via `as_dict`)."""

    workload: dict[str, Any]
    block_size: int
    num_requests: int = 0
    distinct_blocks: int = 0
    ideal: HitCounts = field(default_factory=HitCounts)
    lru: list[LRUBlockCache] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "block_size": self.block_size,
            "num_requests": self.num_requests,
            "num_prompt_tokens": self.ideal.num_tokens,
            "num_blocks": self.ideal.num_blocks,
            "distinct_blocks": self.distinct_blocks,
            "ideal": {**asdict(self.ideal), **self.ideal.rates()},
            "lru": [
                {"cache_blocks": c.capacity, **asdict(c.counts), **c.counts.rates()}
                for c in self.lru
            ],
        }


def analyze(
    requests: Iterable[RequestSpec],
    block_size: int,
    cache_blocks: Sequence[int] = (),
    tokenizer: TextTokenizer | None = None,
    workload_info: dict[str, Any] | None = None,
) -> AnalysisResult:
    """Replay `requests` in order through an infinite cache and LRU caches of the given sizes."""
    result = AnalysisResult(workload_info or {}, block_size)
    result.lru = [LRUBlockCache(n) for n in cache_blocks]
    interner = BlockKeyInterner()
    seen: set[int] = set()
    for request in requests:
        blocks = prompt_blocks(request, block_size, tokenizer, interner)
        result.ideal.add(blocks, _prefix_hits(blocks.keys, seen))
        seen.update(blocks.keys)
        for cache in result.lru:
            cache.access(blocks)
        result.num_requests += 1
    result.distinct_blocks = len(seen)
    return result


def format_analysis(result: AnalysisResult) -> str:
    """A short Markdown report of an analysis."""
    data = result.as_dict()
    name = data["workload"].get("name", "workload")
    ideal = data["ideal"]
    lines = [
        f"# Prefix-cache analysis: {name}",
        "",
        f"- requests: {data['num_requests']:,}, prompt tokens: {data['num_prompt_tokens']:,}",
        f"- block size: {data['block_size']} tokens, blocks: {data['num_blocks']:,} "
        f"({data['distinct_blocks']:,} distinct)",
        "",
        "| cache | block hit rate | token hit rate |",
        "|---|---:|---:|",
        f"| ideal (infinite) | {ideal['block_hit_rate']:.1%} | {ideal['token_hit_rate']:.1%} |",
    ]
    for row in data["lru"]:
        lines.append(
            f"| LRU {row['cache_blocks']:,} blocks | {row['block_hit_rate']:.1%} "
            f"| {row['token_hit_rate']:.1%} |"
        )
    return "\n".join(lines) + "\n"
