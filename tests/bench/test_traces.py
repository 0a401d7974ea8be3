"""Trace parsers (Mooncake, Azure, Qwen-Bailian) and replay: sessions, times, token synthesis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvrelay.bench.traces import (
    TraceFormatError,
    TraceReplayOptions,
    TraceWorkload,
    block_tokens,
    detect_format,
    load_trace,
)
from kvrelay.errors import InvalidRequestError

FIXTURES = Path(__file__).parent / "fixtures"
BAILIAN = FIXTURES / "qwen_bailian_small.jsonl"
SHARED_TRACES = Path(
    os.environ.get("KVRELAY_TRACES_DIR", Path(__file__).parents[3] / "shared" / "traces")
)


def write_mooncake(path: Path) -> Path:
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 600, "output_length": 3, "hash_ids": [0, 3]},
        {"timestamp": 1500, "input_length": 1030, "output_length": 0, "hash_ids": [0, 1, 4]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_azure(path: Path) -> Path:
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:17:06.4799600,20,1\n"
    )
    return path


def test_mooncake_parser_and_replay(tmp_path: Path) -> None:
    trace = load_trace(write_mooncake(tmp_path / "m.jsonl"))
    assert trace.format == "mooncake" and trace.block_size == 512
    assert [r.timestamp_s for r in trace.records] == [0.0, 1.5, 1.5]  # milliseconds -> s
    assert trace.records[2].hash_ids == (0, 1, 4)
    workload = TraceWorkload(trace, TraceReplayOptions(time_scale=2.0, vocab_hi=5000), seed=1)
    sessions = list(workload.sessions())
    assert [len(s.turns) for s in sessions] == [1, 1, 1]
    turns = [s.turns[0] for s in sessions]
    assert [t.at_s for t in turns] == [0.0, 3.0, 3.0]
    a, b, c = (t.request for t in turns)
    assert (len(a.prompt_token_ids), len(b.prompt_token_ids), len(c.prompt_token_ids)) == (
        1100,
        600,
        1030,
    )
    assert c.max_tokens == 1  # output_length 0 still asks for one token
    assert a.prompt_token_ids[:1024] == c.prompt_token_ids[:1024]  # shared blocks 0, 1
    assert a.prompt_token_ids[:512] == b.prompt_token_ids[:512]
    assert a.prompt_token_ids[512:1024] != b.prompt_token_ids[512:1024]
    assert all(1000 <= t < 5000 for t in a.prompt_token_ids)
    assert a.block_ids == (0, 1, 2) and a.block_size == 512
    again = [
        s.turns[0].request
        for s in TraceWorkload(trace, TraceReplayOptions(vocab_hi=5000), seed=1).sessions()
    ]
    assert again[0].prompt_token_ids == a.prompt_token_ids  # a pure function of (seed, id)


def test_replay_limits_and_truncation(tmp_path: Path) -> None:
    trace = load_trace(write_mooncake(tmp_path / "m.jsonl"))
    opts = TraceReplayOptions(
        start_s=1.0, max_requests=1, max_input_tokens=700, max_output_tokens=2
    )
    (session,) = list(TraceWorkload(trace, opts).sessions())
    request = session.turns[0].request
    assert session.turns[0].at_s == 0.0  # times count from the first replayed request
    assert len(request.prompt_token_ids) == 600 and request.max_tokens == 2
    opts = TraceReplayOptions(max_input_tokens=700)
    first = next(TraceWorkload(trace, opts).sessions()).turns[0].request
    assert len(first.prompt_token_ids) == 700 and first.block_ids == (0, 1)
    assert first.num_prompt_tokens_hint == 700
    lazy = next(TraceWorkload(trace, synthesize=False).sessions()).turns[0].request
    assert lazy.prompt_token_ids == () and lazy.block_ids == (0, 1, 2)


def test_azure_parser(tmp_path: Path) -> None:
    trace = load_trace(write_azure(tmp_path / "AzureLLMInferenceTrace_code.csv"))
    assert trace.format == "azure" and trace.block_size is None
    times = [r.timestamp_s for r in trace.records]
    assert times[0] == 0.0 and times[1] == pytest.approx(0.052) and times[2] == pytest.approx(2.5)
    assert [(r.input_length, r.output_length) for r in trace.records] == [
        (4808, 10),
        (3180, 8),
        (20, 1),
    ]
    requests = [s.turns[0].request for s in TraceWorkload(trace).sessions()]
    assert len(requests[0].prompt_token_ids) == 4808 and requests[0].block_ids is None
    assert requests[0].prompt_token_ids[:16] != requests[1].prompt_token_ids[:16]  # no sharing


def test_qwen_bailian_parser_and_sessions() -> None:
    assert detect_format(BAILIAN) == "qwen-bailian"
    trace = load_trace(BAILIAN)
    assert trace.block_size == 16 and len(trace.records) == 7
    first = trace.records[0]
    assert (first.chat_id, first.parent_chat_id, first.turn, first.type) == (1, None, 1, "text")
    assert first.timestamp_s == 0.0 and trace.records[2].timestamp_s == pytest.approx(2.7)
    sessions = list(TraceWorkload(trace).sessions())
    chains = [[t.request.request_id for t in s.turns] for s in sessions]
    # Conversations follow parent_chat_id; 7's parent is not in the file.
    assert chains == [
        ["qwen-bailian-0", "qwen-bailian-2", "qwen-bailian-4"],
        ["qwen-bailian-1", "qwen-bailian-5"],
        ["qwen-bailian-3"],
        ["qwen-bailian-6"],
    ]
    conv = sessions[0].turns
    assert [t.at_s for t in conv] == pytest.approx([0.0, 2.7, 6.0])
    assert [t.delay_s for t in conv] == pytest.approx([0.0, 2.7, 3.3])
    t1, t2, t3 = (t.request.prompt_token_ids for t in conv)
    assert len(t1) == 60 and len(t3) == 128
    assert t2[:48] == t1[:48] and t2[48:60] != t1[48:60]  # blocks 1, 2, 3 shared; 4 vs 8
    assert t3[:96] == t2[:96]
    other = sessions[1].turns[0].request.prompt_token_ids
    assert other[:32] == t1[:32] and other[32:48] != t1[32:48]  # shared system prompt blocks
    flat = list(TraceWorkload(trace, TraceReplayOptions(sessions=False)).sessions())
    assert len(flat) == 7


def test_block_tokens_is_pure() -> None:
    assert list(block_tokens(5, 16, 0, 10, 20)) == list(block_tokens(5, 16, 0, 10, 20))
    assert list(block_tokens(5, 16, 0, 10, 20)) != list(block_tokens(6, 16, 0, 10, 20))
    assert len(block_tokens(-3, 512, 1, 0, 100)) == 512  # negative ids are fine


def test_parser_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 3}\n')
    with pytest.raises(TraceFormatError, match="Mooncake"):
        load_trace(bad)
    bad.write_text('{"chat_id": 1, "timestamp": "x"}\n')
    with pytest.raises(TraceFormatError, match="Qwen-Bailian"):
        load_trace(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(TraceFormatError):
        load_trace(bad)
    csv = tmp_path / "bad.csv"
    csv.write_text("TIMESTAMP,ContextTokens\nnot a time,1\n")
    with pytest.raises(TraceFormatError, match="Azure"):
        load_trace(csv)
    with pytest.raises(InvalidRequestError):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidRequestError):
        TraceWorkload(load_trace(BAILIAN), TraceReplayOptions(vocab_lo=5, vocab_hi=5))


def test_shared_traces_parse() -> None:
    """The real traces under /work/shared/traces (never copied into the repository)."""
    mooncake = SHARED_TRACES / "mooncake_fast25" / "conversation_trace.jsonl"
    azure = SHARED_TRACES / "azure_llm_inference_2023" / "AzureLLMInferenceTrace_code.csv"
    if not (mooncake.is_file() and azure.is_file()):
        pytest.skip(f"shared traces not found under {SHARED_TRACES} (set KVRELAY_TRACES_DIR)")
    trace = load_trace(mooncake)
    assert len(trace.records) == 12_031
    assert all(len(r.hash_ids or ()) == -(-r.input_length // 512) for r in trace.records)
    code = load_trace(azure)
    assert len(code.records) == 8_819
    assert 3300 < code.records[-1].timestamp_s < 3500  # about 57 minutes
