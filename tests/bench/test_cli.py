"""`kvrelay bench run|analyze|compare` entry points (kvrelay.bench.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvrelay.bench.cli import analyze_main, compare_main, main, resolve_workload, run_main
from kvrelay.bench.traces import TraceWorkload
from kvrelay.errors import InvalidRequestError

FIXTURES = Path(__file__).parent / "fixtures"


def test_analyze_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert (
        analyze_main(
            [str(FIXTURES / "qwen_bailian_small.jsonl"), "--cache-blocks", "4", "--json", str(out)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| ideal (infinite) | 47.1% | 50.3% |" in text  # 16/34 blocks, 256/509 tokens
    assert "LRU 4 blocks" in text
    data = json.loads(out.read_text())
    assert data["block_size"] == 16 and data["lru"][0]["cache_blocks"] == 4


def test_analyze_synthetic_workload(capsys: pytest.CaptureFixture[str], corpus_dir: Path) -> None:
    argv = [
        "code-sessions",
        "-W",
        f"corpus={corpus_dir}",
        "-W",
        "context_tokens=400",
        "--tokenizer",
        "approx",
        "--num-requests",
        "30",
        "--concurrency",
        "3",
        "--block-size",
        "32",
    ]
    assert analyze_main(argv) == 0
    text = capsys.readouterr().out
    assert "requests: 30," in text and "block size: 32 tokens" in text


def test_resolve_workload(corpus_dir: Path) -> None:
    trace = resolve_workload(str(FIXTURES / "qwen_bailian_small.jsonl"), 0, ["max_requests=2"])
    assert isinstance(trace, TraceWorkload) and len(trace.selected()) == 2
    fim = resolve_workload("fim", 1, [f"corpus={corpus_dir}"])
    assert fim.name == "fim"
    with pytest.raises(InvalidRequestError, match="KEY=VALUE"):
        resolve_workload("fim", 1, ["corpus"])


def test_run_and_compare(
    fake_server: tuple[str, Any],
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = fake_server
    common = [
        "--url",
        url,
        "--workload",
        "fim",
        "-W",
        f"corpus={corpus_dir}",
        "-W",
        "max_tokens=3",
        "--think-scale",
        "0",
        "--num-requests",
        "8",
        "--no-progress",
    ]
    assert run_main([*common, "--concurrency", "2", "--out", str(tmp_path / "a")]) == 0
    assert run_main([*common, "--rate", "50", "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    summary = capsys.readouterr().out
    assert "# Benchmark: fim on fake-model" in summary
    for name in (
        "results.json",
        "summary.md",
        "ttft_vs_cached.png",
        "latency_cdf.png",
        "timeline.png",
    ):
        assert (tmp_path / "a" / name).is_file()
    assert not (tmp_path / "b" / "timeline.png").exists()
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["config"]["arrival"] == "closed" and len(results["requests"]) == 8
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert "| a | fim | 8/0 |" in table and "| b | fim | 8/0 |" in table


def test_trace_run_defaults_to_timestamps(fake_server: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = fake_server
    argv = [
        "--url",
        url,
        "--workload",
        str(FIXTURES / "qwen_bailian_small.jsonl"),
        "-W",
        "time_scale=0.02",
        "-W",
        "vocab_hi=3000",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--no-plots",
    ]
    assert run_main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["arrival"] == "trace" and len(results["requests"]) == 7


def test_finite_workload_runs_to_its_end(fake_server: tuple[str, Any], tmp_path: Path) -> None:
    url, fake = fake_server
    problems = tmp_path / "p.jsonl"
    rows = [{"task_id": f"T/{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}"}
            for i in range(5)]  # fmt: skip
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--url", url, "--workload", "humaneval", "-W", f"problems_file={problems}",
            "-W", "max_tokens=2", "--rate", "100", "--out", str(tmp_path / "out"),
            "--no-progress", "--no-plots"]  # fmt: skip
    assert run_main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["requests"]) == 5 and len(fake.bodies) == 5
    assert all(b["prompt"].startswith("# Complete each Python function") for b in fake.bodies)


def test_endless_workload_needs_a_limit(corpus_dir: Path, tmp_path: Path) -> None:
    argv = ["--url", "http://127.0.0.1:9", "--workload", "agent", "-W", f"corpus={corpus_dir}",
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(InvalidRequestError, match="never ends"):
        run_main(argv)


def test_module_main_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
