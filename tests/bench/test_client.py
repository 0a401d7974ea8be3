"""The load client against a fake OpenAI-compatible server on 127.0.0.1: streaming timings,
usage and cached tokens, arrival modes, limits, errors, /metrics scraping."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvrelay.bench.client import LoadConfig, run_load_sync
from kvrelay.bench.prom import counter_delta, metrics_hit_rate, parse_prometheus
from kvrelay.bench.report import response_hit_rate
from kvrelay.bench.stream import RequestOptions, request_body
from kvrelay.bench.traces import TraceReplayOptions, TraceWorkload, load_trace
from kvrelay.bench.workloads.base import Message, RequestSpec, Session, Turn
from kvrelay.bench.workloads.code_sessions import CodeSessionsOptions, CodeSessionsWorkload
from kvrelay.errors import InvalidRequestError, PeerUnavailableError

FIXTURES = Path(__file__).parent / "fixtures"


class ListWorkload:
    """A fixed list of sessions."""

    name = "list"

    def __init__(self, sessions: list[Session]) -> None:
        self._sessions = sessions

    def sessions(self) -> Iterator[Session]:
        return iter(self._sessions)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def chat_session(
    sid: str, turns: int, max_tokens: int = 4, delay_s: float = 0.0, text: str = "hello"
) -> Session:
    out = []
    for k in range(turns):
        messages = (Message("system", "be brief " * 40), Message("user", f"{text} {sid} {k}"))
        out.append(
            Turn(
                RequestSpec(f"{sid}-{k}", "chat", max_tokens, messages=messages),
                delay_s=0.0 if k == 0 else delay_s,
            )
        )
    return Session(sid, tuple(out))


def config(url: str, **kwargs: Any) -> LoadConfig:
    return LoadConfig(url=url, progress=False, metrics_settle_s=0.0, **kwargs)


def test_request_bodies() -> None:
    opts = RequestOptions(model="m", extra_body={"top_k": 5})
    chat = RequestSpec("c", "chat", 7, messages=(Message("user", "hi"),))
    path, body = request_body(chat, opts)
    assert path == "/v1/chat/completions" and body["messages"] == [
        {"role": "user", "content": "hi"}
    ]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["ignore_eos"], body["top_k"]) == (7, True, 5)
    path, body = request_body(
        RequestSpec("t", "completion", 1, prompt_token_ids=(5, 6)),
        RequestOptions(model="m", ignore_eos=False),
    )
    assert path == "/v1/completions" and body["prompt"] == [5, 6] and "ignore_eos" not in body


def test_closed_loop_measures_stream_and_cache(fake_server: tuple[str, Any]) -> None:
    url, _ = fake_server
    sessions = [chat_session(f"s{i}", 3, max_tokens=6) for i in range(4)]
    run = run_load_sync(ListWorkload(sessions), config(url + "/v1", concurrency=2, num_requests=10))
    assert run.model == "fake-model"  # discovered from /v1/models
    assert len(run.requests) == 10 and all(r.ok for r in run.requests)
    for r in run.requests:
        assert r.num_chunks == 6 and len(r.itl_s) == 5 and r.num_output_tokens == 6
        assert r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s  # type: ignore[operator]
        assert r.finish_reason == "length" and r.kvrelay == {"cached_tokens": r.num_cached_tokens}
        assert sum(r.itl_s) >= 0.004  # the fake sleeps 1 ms per token (reads may batch)
    # The shared system prompt is cached after the first request.
    assert any((r.num_cached_tokens or 0) > 0 for r in run.requests)
    order = {r.request_id: i for i, r in enumerate(run.requests)}
    for session in sessions:  # turns of a session never overlap
        done = [
            run.requests[order[t.request.request_id]]
            for t in session.turns
            if t.request.request_id in order
        ]
        for a, b in itertools.pairwise(done):
            assert b.start_s >= a.start_s + (a.e2e_s or 0)
    from_responses = response_hit_rate(run.requests)
    from_metrics = metrics_hit_rate(run.metrics_before, run.metrics_after)
    assert from_responses is not None and from_metrics is not None
    assert from_metrics["server"] == "kvrelay"
    assert from_metrics["hits"] == from_responses["cached_tokens"]
    assert from_metrics["queries"] == from_responses["prompt_tokens"]


def test_think_time_is_scaled(fake_server: tuple[str, Any]) -> None:
    url, _ = fake_server
    sessions = [chat_session("s", 2, max_tokens=1, delay_s=0.3)]
    run = run_load_sync(
        ListWorkload(sessions), config(url, num_requests=2, think_scale=0.5, model="fake-model")
    )
    first, second = run.requests
    assert second.start_s - (first.start_s + (first.e2e_s or 0)) == pytest.approx(0.15, abs=0.08)


def test_poisson_arrivals_and_duration(fake_server: tuple[str, Any]) -> None:
    url, _ = fake_server
    sessions = [chat_session(f"s{i}", 1, max_tokens=2) for i in range(1000)]
    started = time.perf_counter()
    run = run_load_sync(
        ListWorkload(sessions), config(url, arrival="poisson", rate=40.0, duration_s=0.5, seed=3)
    )
    assert time.perf_counter() - started < 5
    assert 5 <= len(run.requests) <= 60  # about 20 expected
    assert all(r.scheduled_s is not None and r.scheduled_s < 0.5 for r in run.requests)
    assert all(r.start_s - (r.scheduled_s or 0) < 0.2 for r in run.requests)


def test_trace_timestamps_and_session_order(fake_server: tuple[str, Any]) -> None:
    url, fake = fake_server
    trace = load_trace(FIXTURES / "qwen_bailian_small.jsonl")
    workload = TraceWorkload(trace, TraceReplayOptions(time_scale=0.05, vocab_hi=5000))
    run = run_load_sync(workload, config(url, arrival="trace", model="fake-model"))
    assert len(run.requests) == 7 and all(r.ok for r in run.requests)
    by_id = {r.request_id: r for r in run.requests}
    expected = {
        f"qwen-bailian-{i}": t * 0.05 for i, t in enumerate([0.0, 0.5, 2.7, 3.5, 6.0, 6.5, 7.5])
    }
    for rid, at_s in expected.items():
        assert by_id[rid].scheduled_s == pytest.approx(at_s)
        assert by_id[rid].start_s >= at_s - 0.01
    assert by_id["qwen-bailian-0"].num_prompt_tokens == 60  # token ids sent as the prompt
    assert isinstance(fake.bodies[0]["prompt"], list)
    assert (by_id["qwen-bailian-2"].num_cached_tokens or 0) >= 48  # same tokens as turn 1


def test_errors_are_recorded_not_raised(fake_server: tuple[str, Any]) -> None:
    url, _ = fake_server
    sessions = [chat_session("ok", 1), chat_session("bad", 1, text="FAIL")]
    run = run_load_sync(
        ListWorkload(sessions), config(url, concurrency=1, num_requests=5, model="fake-model")
    )
    assert len(run.requests) == 2
    bad = next(r for r in run.requests if r.session_id == "bad")
    assert not bad.ok and bad.http_status == 500 and "boom" in (bad.error or "")


def test_unreachable_server_and_bad_configs() -> None:
    with pytest.raises(PeerUnavailableError, match="pass --model"):
        run_load_sync(ListWorkload([]), config("http://127.0.0.1:9", num_requests=1))
    with pytest.raises(InvalidRequestError):
        config("http://x", arrival="poisson", num_requests=1)
    with pytest.raises(InvalidRequestError):
        config("http://x", concurrency=0, num_requests=1)


def test_trace_arrivals_need_timestamps(fake_server: tuple[str, Any]) -> None:
    url, _ = fake_server
    with pytest.raises(InvalidRequestError, match="trace workload"):
        run_load_sync(
            ListWorkload([chat_session("s", 1)]), config(url, arrival="trace", model="fake-model")
        )


def test_code_sessions_against_fake(fake_server: tuple[str, Any], corpus_dir: Path) -> None:
    url, _ = fake_server
    workload = CodeSessionsWorkload(
        CodeSessionsOptions(corpus=str(corpus_dir), context_tokens=500, max_tokens=3), seed=0
    )
    run = run_load_sync(workload, config(url, concurrency=3, num_requests=12, think_scale=0.0))
    assert len(run.requests) == 12 and all(r.ok for r in run.requests)
    hit = response_hit_rate(run.requests)
    assert hit is not None and hit["hit_rate"] > 0.3
    assert run.workload["name"] == "code-sessions" and run.config["concurrency"] == 3


def test_prometheus_parsing() -> None:
    text = (
        "# HELP a_total x\n# TYPE a_total counter\n"
        'a_total{model="m",worker="w0"} 10\na_total{model="m",worker="w1"} 5.5\n'
        "b 1e3 1700000000\nc NaN\nbroken line here\n"
    )
    samples = parse_prometheus(text)
    assert samples == {
        'a_total{model="m",worker="w0"}': 10.0,
        'a_total{model="m",worker="w1"}': 5.5,
        "b": 1000.0,
    }
    assert counter_delta({'a_total{model="m",worker="w0"}': 4.0}, samples, "a_total") == 11.5
    assert counter_delta(None, samples, "a_total") == 15.5
    assert counter_delta(samples, samples, "missing") is None
    vllm = {"vllm:prefix_cache_hits_total": 30.0, "vllm:prefix_cache_queries_total": 120.0}
    rate = metrics_hit_rate({}, vllm)
    assert rate is not None and rate["server"] == "vllm" and rate["hit_rate"] == 0.25
    assert metrics_hit_rate(None, None) is None and metrics_hit_rate({}, {"b": 1.0}) is None


def test_metrics_scrape_can_be_disabled(fake_server: tuple[str, Any]) -> None:
    url, _ = fake_server
    run = run_load_sync(
        ListWorkload([chat_session("s", 1)]),
        config(url, num_requests=1, metrics_url="", model="fake-model"),
    )
    assert run.metrics_before is None and run.metrics_after is None
    assert httpx.get(url + "/metrics").status_code == 200
