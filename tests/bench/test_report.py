"""Reports: aggregate arithmetic, files written (results.json, summary.md, PNGs), compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrelay.bench.report import (
    Slo,
    aggregate,
    distribution,
    format_summary,
    requests_per_worker,
    tpot_s,
    write_comparison,
    write_report,
)
from kvrelay.bench.results import RequestResult, RunResult, load_run


def make_run(ttft_scale: float = 1.0) -> RunResult:
    rows = []
    for i in range(20):
        cached = 0 if i % 2 else 64
        rows.append(
            RequestResult(
                request_id=f"r{i}",
                session_id=f"s{i // 4}",
                kind="chat",
                start_s=0.5 * i,
                scheduled_s=0.5 * i - 0.01,
                ttft_s=ttft_scale * (0.05 if cached else 0.4),
                e2e_s=ttft_scale * (0.05 if cached else 0.4) + 0.2,
                itl_s=[0.05] * 4,
                num_prompt_tokens=128,
                num_cached_tokens=cached,
                num_output_tokens=5,
                num_chunks=5,
                finish_reason="length",
                http_status=200,
            )
        )
    rows.append(
        RequestResult(
            request_id="bad",
            session_id="s9",
            kind="chat",
            start_s=3.0,
            http_status=500,
            error="HTTP 500: boom",
        )
    )
    before = {
        'kvrelay_prompt_tokens_total{model="m"}': 1000.0,
        'kvrelay_cached_prompt_tokens_total{model="m"}': 100.0,
    }
    after = {
        'kvrelay_prompt_tokens_total{model="m"}': 1000.0 + 20 * 128,
        'kvrelay_cached_prompt_tokens_total{model="m"}': 100.0 + 10 * 64,
    }
    return RunResult(
        config={"url": "http://x", "arrival": "closed", "concurrency": 2},
        workload={"name": "code-sessions"},
        model="m",
        started_at="2025-01-01T00:00:00+00:00",
        duration_s=10.0,
        requests=rows,
        metrics_before=before,
        metrics_after=after,
    )


def test_distribution_and_tpot() -> None:
    stats = distribution([1.0, 2.0, 3.0, 4.0])
    assert stats["count"] == 4 and stats["mean"] == 2.5 and stats["p50"] == 2.5
    assert stats["max"] == 4.0
    assert distribution([])["p99"] is None
    row = RequestResult("r", "s", "chat", 0.0, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1, 0.3])
    assert tpot_s(row) == pytest.approx(0.2)
    assert tpot_s(RequestResult("r", "s", "chat", 0.0, ttft_s=0.1, e2e_s=0.1)) is None


def test_aggregate_numbers() -> None:
    agg = aggregate(make_run(), Slo(ttft_s=0.1, itl_s=0.1))
    assert (agg["num_requests"], agg["num_ok"], agg["num_errors"]) == (21, 20, 1)
    assert agg["errors"] == ["HTTP 500: boom"]
    assert agg["ttft_s"]["p50"] == pytest.approx(0.225)
    assert agg["itl_s"]["count"] == 80 and agg["itl_s"]["p99"] == pytest.approx(0.05)
    assert agg["throughput"]["requests_per_s"] == pytest.approx(2.0)
    assert agg["throughput"]["output_tokens_per_s"] == pytest.approx(10.0)
    good = agg["goodput"]
    assert good["num_good"] == 10 and good["requests_per_s"] == pytest.approx(1.0)
    hit = agg["hit_rate"]
    assert hit["responses"]["hit_rate"] == pytest.approx(0.25)
    assert hit["metrics"]["hit_rate"] == pytest.approx(0.25)
    assert agg["send_lateness_s"]["mean"] == pytest.approx(0.01)
    assert agg["requests_per_worker"] == {}


def test_requests_per_worker() -> None:
    rows = [
        RequestResult("a", "s", "chat", 0.0, kvrelay={"workers": ["worker-1"]}),
        RequestResult("b", "s", "chat", 0.0, kvrelay={"workers": ["worker-0", "worker-1"]}),
        RequestResult("c", "s", "chat", 0.0),
    ]
    assert requests_per_worker(rows) == {"worker-0": 1, "worker-1": 2}


def test_write_report_files(tmp_path: Path) -> None:
    run = make_run()
    paths = write_report(run, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == [
        "latency_cdf.png",
        "results.json",
        "summary.md",
        "timeline.png",
        "ttft_vs_cached.png",
    ]
    for path in paths:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["requests"]) == 21 and data["aggregate"]["num_ok"] == 20
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "25.0%" in summary and "![ttft_vs_cached](ttft_vs_cached.png)" in summary
    loaded = load_run(tmp_path / "out")
    assert loaded.requests == run.requests and loaded.aggregate == run.aggregate


def test_report_without_usage_or_metrics(tmp_path: Path) -> None:
    run = make_run()
    for row in run.requests:
        row.num_cached_tokens = None
    run.metrics_after = None
    write_report(run, tmp_path)
    agg = run.aggregate
    assert agg["hit_rate"] == {"responses": None, "metrics": None}
    assert "no recognised counters" in format_summary(run)


def test_compare(tmp_path: Path) -> None:
    write_report(make_run(), tmp_path / "fast")
    write_report(make_run(ttft_scale=3.0), tmp_path / "slow", plots=False)
    table = write_comparison([tmp_path / "fast", tmp_path / "slow"], tmp_path / "cmp")
    lines = [
        line
        for line in table.splitlines()
        if line.startswith("| fast") or line.startswith("| slow")
    ]
    assert len(lines) == 2 and "code-sessions" in lines[0]
    assert "675.0" in lines[1]  # slow TTFT p50 = 3 x 225 ms
    assert (tmp_path / "cmp" / "compare.md").is_file()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    with pytest.raises(ValueError):
        load_run(tmp_path / "missing")
