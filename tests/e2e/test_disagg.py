"""Disaggregated serving against real `kvrelay serve` processes (tiny Llama): greedy outputs
equal an aggregated server's on 24 prompts, some partly cached on the decode worker so only
their missing blocks move; the ledger does not count imported blocks as the decode worker's
hits; a stalled prefill worker (SIGSTOP) costs the timeout, then a local prefill; and killing
the prefill worker (SIGKILL) under load loses no request."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.procs import started, wait_ready

MODEL = "tiny-llama"
BS = 16


def serve_args(tiny_model: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "kvrelay.launch",
        "--model",
        str(tiny_model),
        "--served-model-name",
        MODEL,
        "--port",
        "0",
        "--num-kv-blocks",
        "256",
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("disagg")
    agg_args = serve_args(tiny_model, "--workers", "1")
    disagg_args = serve_args(
        tiny_model,
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--remote-prefill",
        "always",
        "--remote-prefill-timeout",
        "3",
    )
    with (
        started(agg_args, tmp / "agg.log") as agg,
        started(disagg_args, tmp / "disagg.log") as disagg,
    ):
        agg_url = agg.url("kvrelay: serving")
        disagg_url = disagg.url("kvrelay: serving")
        agg.wait_for_line("kvrelay: ready")
        disagg.wait_for_line("kvrelay: ready")
        wait_ready(agg_url, workers=1)
        wait_ready(disagg_url, workers=2)
        yield agg_url, disagg_url


def complete(base: str, prompt: list[int], max_tokens: int = 8) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    resp = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def make_prompts(n: int, seed: int = 3) -> list[list[int]]:
    """Groups of three: a fresh prompt, then two that share its first blocks (cached on the
    decode worker by then, so only their own blocks move)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < n:
        base = [rng.randrange(5, 250) for _ in range(rng.randrange(60, 200))]
        out.append(base)
        for _ in range(2):
            keep = rng.randrange(2, len(base) // BS + 1) * BS
            out.append(base[:keep] + [rng.randrange(5, 250) for _ in range(rng.randrange(20, 90))])
    return out[:n]


def test_disaggregated_equals_aggregated(servers: tuple[str, str]) -> None:
    agg, disagg = servers
    prompts = make_prompts(24)
    num_partial = 0
    for prompt in prompts:
        a = complete(agg, prompt)
        d = complete(disagg, prompt)
        assert d["choices"][0]["text"] == a["choices"][0]["text"]
        assert d["usage"]["completion_tokens"] == a["usage"]["completion_tokens"] == 8
        ext = d["kvrelay"]
        assert ext["workers"] == ["decode-0"]
        info = ext["disagg"]
        usable = (len(prompt) - 1) // BS * BS
        if info is None:  # every usable block was cached on the decode worker already
            assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == usable
            continue
        assert info["prefill_worker"] == "prefill-0" and info["decode_worker"] == "decode-0"
        assert not info["fallback"], info
        assert info["imported_tokens"] + info["decode_worker_cached_tokens"] == usable
        assert info["decode_worker_computed_tokens"] == len(prompt) - usable
        assert info["transfer_bytes"] > 0 and info["transfer_ms"] > 0
        if info["decode_worker_cached_tokens"] > 0:
            num_partial += 1
        # the ledger's realized hits: the decode worker's own plus the prefill worker's
        realized = ext["ledger"]["num_realized_tokens"]
        own = info["decode_worker_cached_tokens"] + info["prefill_worker_cached_tokens"]
        assert realized == own
    assert num_partial >= 5
    metrics = httpx.get(f"{disagg}/metrics", timeout=10).text
    assert 'kvrelay_disagg_placement_decisions_total{model="tiny-llama",reason="forced"}' in metrics
    assert "kvrelay_disagg_transfer_bytes_total" in metrics


def _workers(base: str) -> dict[str, Any]:
    live = httpx.get(f"{base}/kvrelay/workers", timeout=5).json()["workers"]
    return {w["worker_id"]: w for w in live}


def test_stalled_prefill_worker_times_out_to_local_prefill(servers: tuple[str, str]) -> None:
    """SIGSTOP: the prefill worker accepts connections but never answers; the decode worker
    waits --remote-prefill-timeout (3 s), then prefills locally."""
    agg, disagg = servers
    pid = _workers(disagg)["prefill-0"]["pid"]
    prompt = [random.Random(5).randrange(5, 250) for _ in range(300)]
    os.kill(pid, signal.SIGSTOP)
    try:
        d = complete(disagg, prompt)
    finally:
        os.kill(pid, signal.SIGCONT)
    info = d["kvrelay"]["disagg"]
    assert info is not None and info["fallback"], info
    assert info["imported_tokens"] == 0 and info["transfer_ms"] >= 2900
    assert d["choices"][0]["text"] == complete(agg, prompt)["choices"][0]["text"]


def fallbacks_counted(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kvrelay_disagg_fallbacks_total{")
    )


def test_kill_prefill_worker_under_load(servers: tuple[str, str]) -> None:
    _, disagg = servers
    rng = random.Random(11)
    prompts = [[rng.randrange(5, 250) for _ in range(rng.randrange(300, 600))] for _ in range(16)]
    wait_ready(disagg, workers=2)  # prefill-0 is back in discovery after any earlier stall
    counted_before = fallbacks_counted(disagg)
    pid = _workers(disagg)["prefill-0"]["pid"]
    with ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(complete, disagg, p, 4) for p in prompts]
        # under load: once one request is through, the next ones are mid-prefill / transfer
        next(as_completed(futures)).result()
        os.kill(pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    infos = [r["kvrelay"]["disagg"] for r in results if r["kvrelay"]["disagg"] is not None]
    num_fallbacks = sum(1 for info in infos if info["fallback"])
    counted = fallbacks_counted(disagg) - counted_before
    assert num_fallbacks >= 1  # requests in flight at the kill fell back, and later ones
    assert counted == num_fallbacks
