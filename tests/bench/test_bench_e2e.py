"""`kvrelay bench run` end to end: the `code-sessions` workload against a real `kvrelay serve`
(embedded runtime, one worker process, a tiny random Llama with a tiny tokenizer). Checks that
the report files exist, that every request succeeded, and that the KV cache hit rate read from
the responses (`usage.prompt_tokens_details.cached_tokens`) agrees with the one read from
`/metrics` (`kvrelay_cached_prompt_tokens_total / kvrelay_prompt_tokens_total` deltas)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvrelay.bench.cli import run_main
from tests.tiny_models import make_tiny_model_dir
from tests.tiny_tokenizer import add_tiny_tokenizer

START_TIMEOUT_S = 120.0
URL_RE = re.compile(r"(http://127\.0\.0\.1:\d+)/v1")


def _read_url(proc: subprocess.Popen[bytes], log: Path) -> str:
    """The base URL `kvrelay serve` prints once it listens."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            match = URL_RE.search(proc.stdout.readline().decode())
            if match:
                return match.group(1)
    raise AssertionError(f"kvrelay serve printed no URL; log:\n{log.read_text()[-4000:]}")


def _wait_ready(url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"kvrelay serve not ready; log:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("bench-e2e")
    model = make_tiny_model_dir(root / "tiny-llama", kind="llama")
    add_tiny_tokenizer(model)
    log = root / "serve.log"
    args = [
        "-m",
        "kvrelay.launch",
        "--model",
        str(model),
        "--workers",
        "1",
        "--port",
        "0",
        "--threads",
        "1",
        "--num-kv-blocks",
        "2048",
        "--log-level",
        "WARNING",
    ]
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            url = _read_url(proc, log)
            _wait_ready(url, log)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # serve drains, then stops its workers
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_code_sessions_against_kvrelay_serve(
    serve_url: str, corpus_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = [
        "--url", serve_url, "--workload", "code-sessions", "--seed", "1",
        "-W", f"corpus={corpus_dir}", "-W", "context_tokens=400", "-W", "turns_max=3",
        "-W", "max_tokens=8", "--concurrency", "2", "--num-requests", "12",
        "--think-scale", "0", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert run_main(argv) == 0
    for name in (
        "results.json",
        "summary.md",
        "ttft_vs_cached.png",
        "latency_cdf.png",
        "timeline.png",
    ):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    requests = results["requests"]
    assert len(requests) == 12 and all(r["error"] is None for r in requests)
    assert all(r["ttft_s"] is not None and r["num_output_tokens"] == 8 for r in requests)
    assert all(r["kvrelay"] is not None for r in requests)  # the server's extension object
    assert results["aggregate"]["requests_per_worker"] == {"worker-0": 12}
    hit = results["aggregate"]["hit_rate"]
    responses, metrics = hit["responses"], hit["metrics"]
    assert responses is not None and metrics is not None and metrics["server"] == "kvrelay"
    # Both are token counts over the same requests: they agree exactly, not just roughly.
    assert metrics["queries"] == responses["prompt_tokens"]
    assert metrics["hits"] == responses["cached_tokens"]
    assert metrics["hit_rate"] == pytest.approx(responses["hit_rate"])
    # Shared system prompt, shared repository context and growing histories hit the cache.
    assert responses["hit_rate"] > 0.3
    summary = (out / "summary.md").read_text()
    assert "KV cache hit rate from /metrics" in summary
