"""KV-aware routing and the hit-rate ledger against a real `kvrelay serve` (3 worker processes,
tiny Llama, small KV caches): a randomized multi-session workload keeps the funnel on every
request and predicts what the engines realize; the request log matches the responses; and
`kvrelay doctor` passes against it and fails, saying why, against a server started with
`--no-kv-events`."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvrelay.observe.doctor import doctor_main
from tests.e2e.procs import started, wait_ready

MODEL = "tiny-llama"
BS = 16
NUM_KV_BLOCKS = 48  # 768 tokens per worker: sessions evict each other now and then


def serve_args(tiny_model: Path, workers: int, *extra: str) -> list[str]:
    return [
        "-m",
        "kvrelay.launch",
        "--model",
        str(tiny_model),
        "--workers",
        str(workers),
        "--port",
        "0",
        "--num-kv-blocks",
        str(NUM_KV_BLOCKS),
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("router")
    log = tmp / "requests.jsonl"
    args = serve_args(tiny_model, 3, "--request-log", str(log))
    with started(args, tmp / "serve.log") as proc:
        base = proc.url("kvrelay: serving")
        proc.wait_for_line("kvrelay: ready")
        wait_ready(base, workers=3)
        yield base, log
        assert proc.stop() == 0, proc.log()


def synced(base: str, since: float) -> bool:
    """Every worker reported (after `since`) a last KV event id the router has applied."""
    workers = httpx.get(f"{base}/kvrelay/workers", timeout=5).json()["workers"]
    for w in workers:
        load, router = w["load"], w["router"]
        if load is None or load["ts"] < since or router["awaiting_dump"]:
            return False
        if router["last_event_id"] != load["last_kv_event_id"]:
            return False
    return True


def wait_synced(base: str, since: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not synced(base, since):
        assert time.monotonic() < deadline, "the router's index never caught up"
        time.sleep(0.05)


def complete(base: str, prompt: list[int], router: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
    body.update(temperature=0, ignore_eos=True)
    if router is not None:
        body["kvrelay"] = {"router": router}
    resp = httpx.post(
        f"{base}/v1/completions", json=body, headers={"x-kvrelay-workload": "e2e"}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    row = resp.json()["kvrelay"]["ledger"]
    assert isinstance(row, dict)
    return row


def check_funnel(row: dict[str, Any]) -> None:
    f0, f1, f2 = row["num_prompt_tokens"], row["num_seen_tokens"], row["num_reachable_tokens"]
    f3, f4 = row["num_predicted_tokens"], row["num_realized_tokens"]
    assert f0 >= f1 >= f2 >= f3 >= f4 >= 0 and f4 <= f0, row
    losses = ("cold", "capacity", "routing", "stale_index")
    assert sum(row[f"lost_{c}_tokens"] for c in losses) == f0 - f4, row


def test_random_sessions_keep_the_funnel_and_predict_realized(server: tuple[str, Path]) -> None:
    base, log = server
    rng = random.Random(4)
    repos = [[rng.randrange(3, 500) for _ in range(rng.randrange(60, 200))] for _ in range(4)]
    sessions: list[list[int]] = []
    rows = []
    for _ in range(36):
        if not sessions or rng.random() < 0.3:  # a new session on a (shared) repository
            sessions.append(list(rng.choice(repos)) + [rng.randrange(3, 500) for _ in range(9)])
        session = rng.choice(sessions)
        session += [rng.randrange(3, 500) for _ in range(rng.randrange(5, 40))]  # a new turn
        if len(session) > 600:
            sessions.remove(session)
            continue
        policy = rng.choice([None, None, None, "round_robin", "random", "least_loaded"])
        since = time.time()
        rows.append(complete(base, session, policy))
        wait_synced(base, since)
    for row in rows:
        check_funnel(row)
    prompt = sum(r["num_prompt_tokens"] for r in rows)
    predicted = sum(r["num_predicted_tokens"] - r["num_unpredicted_hit_tokens"] for r in rows)
    realized = sum(r["num_realized_tokens"] for r in rows)
    assert abs(predicted - realized) <= 0.02 * prompt, (predicted, realized, prompt)
    assert realized > 0.3 * prompt  # sessions and shared repositories do hit
    assert {r["policy"] for r in rows} == {"kv", "round_robin", "random", "least_loaded"}
    logged = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        logged[record["request_id"]] = record
    for row in rows:
        assert {k: logged[row["request_id"]][k] for k in row} == row


def test_concurrent_requests_keep_the_funnel(server: tuple[str, Path]) -> None:
    base, _ = server
    prefix = [7 + i % 300 for i in range(150)]

    async def burst() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:

            async def one(i: int) -> dict[str, Any]:
                body = {"model": MODEL, "prompt": [*prefix, 3 + i, 4 + i], "max_tokens": 4}
                resp = await client.post("/v1/completions", json={**body, "temperature": 0})
                assert resp.status_code == 200, resp.text
                row = resp.json()["kvrelay"]["ledger"]
                assert isinstance(row, dict)
                return row

            return list(await asyncio.gather(*(one(i) for i in range(12))))

    for row in asyncio.run(burst()):
        check_funnel(row)


def test_doctor_passes_against_a_healthy_server(
    server: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = server
    assert doctor_main(["--url", base]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and "all checks passed" in out
    assert "prediction equals realized" in out


def test_doctor_fails_loudly_without_kv_events(tiny_model: Path, tmp_path: Path) -> None:
    with started(serve_args(tiny_model, 2, "--no-kv-events"), tmp_path / "serve.log") as proc:
        base = proc.url("kvrelay: serving")
        proc.wait_for_line("kvrelay: ready")
        wait_ready(base, workers=2)
        doctor = subprocess.run(
            [sys.executable, "-m", "kvrelay.cli", "doctor", "--url", base],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.stop() == 0, proc.log()
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "[FAIL] workers publish KV events" in doctor.stdout
    assert "--no-kv-events" in doctor.stdout
