"""Offline prefix-cache analysis: ideal and LRU hit rates on hand-checked cases, the published
Mooncake figure, and agreement between block-id analysis and the engine's hash on tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvrelay.bench.analyze import (
    BlockKeyInterner,
    LRUBlockCache,
    analyze,
    format_analysis,
    ordered_requests,
    prompt_blocks,
)
from kvrelay.bench.tokens import ApproxTokenizer
from kvrelay.bench.traces import TraceReplayOptions, TraceWorkload, load_trace
from kvrelay.bench.workloads.base import RequestSpec
from kvrelay.bench.workloads.code_sessions import CodeSessionsOptions, CodeSessionsWorkload
from kvrelay.errors import InvalidRequestError
from kvrelay.kv.hashing import hash_blocks

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_TRACES = Path(
    os.environ.get("KVRELAY_TRACES_DIR", Path(__file__).parents[3] / "shared" / "traces")
)
MOONCAKE = SHARED_TRACES / "mooncake_fast25" / "conversation_trace.jsonl"


def tokens_request(rid: str, ids: list[int]) -> RequestSpec:
    return RequestSpec(rid, "completion", 1, prompt_token_ids=tuple(ids))


def test_ideal_and_lru_on_token_prompts() -> None:
    a = list(range(64))  # 4 blocks of 16
    b = list(range(48)) + [900 + i for i in range(20)]  # shares 3 blocks with a, 4 full blocks
    c = [500 + i for i in range(32)]
    requests = [
        tokens_request("a", a),
        tokens_request("c", c),
        tokens_request("b", b),
        tokens_request("a2", a),
    ]
    result = analyze(requests, 16, cache_blocks=[4, 1000])
    data = result.as_dict()
    assert data["num_blocks"] == 4 + 2 + 4 + 4
    assert data["ideal"]["hit_blocks"] == 0 + 0 + 3 + 4
    assert data["ideal"]["hit_tokens"] == 7 * 16
    assert data["num_prompt_tokens"] == 64 + 32 + 68 + 64
    assert data["distinct_blocks"] == 4 + 2 + 1
    small, big = data["lru"]
    assert big["hit_blocks"] == data["ideal"]["hit_blocks"]
    # 4 blocks: after c, a keeps only its first two blocks (tails are evicted first).
    assert small["hit_blocks"] == 0 + 0 + 2 + 3
    assert "ideal (infinite)" in format_analysis(result)


def test_prompt_blocks_use_the_engine_hash() -> None:
    ids = list(range(40))
    blocks = prompt_blocks(tokens_request("x", ids), 16, None, BlockKeyInterner())
    assert blocks.keys == hash_blocks(ids, 16)
    assert blocks.block_tokens == [16, 16] and blocks.num_prompt_tokens == 40


def test_lru_rejects_empty_cache() -> None:
    with pytest.raises(InvalidRequestError):
        LRUBlockCache(0)


def test_bailian_fixture_ideal_hit_rate() -> None:
    workload = TraceWorkload(load_trace(FIXTURES / "qwen_bailian_small.jsonl"), synthesize=False)
    requests = list(ordered_requests(workload))
    assert [r.request_id for r in requests] == [f"qwen-bailian-{i}" for i in range(7)]  # by time
    data = analyze(requests, 16).as_dict()
    assert (data["ideal"]["hit_blocks"], data["num_blocks"]) == (16, 34)
    assert (data["ideal"]["hit_tokens"], data["num_prompt_tokens"]) == (256, 509)
    coarse = analyze(ordered_requests(workload), 32).as_dict()  # pairs of trace blocks
    assert coarse["num_blocks"] == 1 + 2 + 3 + 0 + 4 + 2 + 1
    assert coarse["ideal"]["hit_blocks"] == 0 + 1 + 1 + 0 + 3 + 2 + 0


def test_block_ids_agree_with_hashing_synthesized_tokens() -> None:
    """Analysing a trace by its block ids gives what the engine's hash gives on the tokens
    replay sends (full blocks), at the trace's block size and at a divisor of it."""
    trace = load_trace(FIXTURES / "qwen_bailian_small.jsonl")
    by_ids = analyze(ordered_requests(TraceWorkload(trace, synthesize=False)), 8).as_dict()
    by_tokens = analyze(ordered_requests(TraceWorkload(trace)), 8).as_dict()
    for key in ("num_blocks", "distinct_blocks", "num_prompt_tokens"):
        assert by_ids[key] == by_tokens[key]
    assert by_ids["ideal"] == by_tokens["ideal"]


def test_mooncake_conversation_ideal_hit_rate_is_the_published_36_6_percent() -> None:
    if not MOONCAKE.is_file():
        pytest.skip(f"{MOONCAKE} not found (set KVRELAY_TRACES_DIR)")
    workload = TraceWorkload(load_trace(MOONCAKE), synthesize=False)
    data = analyze(ordered_requests(workload), 512, cache_blocks=[20_000]).as_dict()
    assert data["num_requests"] == 12_031 and data["distinct_blocks"] == 182_790
    assert round(100 * data["ideal"]["block_hit_rate"], 1) == 36.6
    assert round(100 * data["ideal"]["token_hit_rate"], 1) == 37.4
    assert data["lru"][0]["block_hit_rate"] < data["ideal"]["block_hit_rate"]


def test_mooncake_slice_block_ids_match_engine_hash() -> None:
    if not MOONCAKE.is_file():
        pytest.skip(f"{MOONCAKE} not found (set KVRELAY_TRACES_DIR)")
    trace = load_trace(MOONCAKE)
    opts = TraceReplayOptions(max_requests=40, max_input_tokens=2048)
    by_ids = analyze(ordered_requests(TraceWorkload(trace, opts, synthesize=False)), 16).as_dict()
    by_tokens = analyze(ordered_requests(TraceWorkload(trace, opts)), 16).as_dict()
    assert by_ids["ideal"] == by_tokens["ideal"]
    assert by_ids["ideal"]["hit_blocks"] > 0


def test_text_workload_analysis(corpus_dir: Path) -> None:
    opts = CodeSessionsOptions(corpus=str(corpus_dir), context_tokens=600, num_repos=2)
    workload = CodeSessionsWorkload(opts, seed=0)
    result = analyze(
        ordered_requests(workload, 40, concurrency=4), 16, [50], tokenizer=ApproxTokenizer()
    ).as_dict()
    assert result["num_requests"] == 40
    # Two repositories' contexts and growing histories: most of the prompt is reusable.
    assert result["ideal"]["token_hit_rate"] > 0.7
    assert result["lru"][0]["token_hit_rate"] < result["ideal"]["token_hit_rate"]
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        analyze(ordered_requests(workload, 1), 16)


def test_ordered_requests_interleaves_sessions(corpus_dir: Path) -> None:
    opts = CodeSessionsOptions(corpus=str(corpus_dir), context_tokens=300, turns_min=2)
    workload = CodeSessionsWorkload(opts, seed=0)
    sequential = [r.request_id for r in ordered_requests(workload, 6)]
    interleaved = [r.request_id for r in ordered_requests(workload, 6, concurrency=3)]
    assert sequential[:2] == [f"code-sessions-0-0-t{k}" for k in range(2)]
    assert interleaved[:3] == [f"code-sessions-0-{i}-t0" for i in range(3)]
    assert sorted(sequential) != sorted(interleaved)
