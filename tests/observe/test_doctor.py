"""`kvrelay doctor` against a scripted server: each failure it must report, with its message.
(The end-to-end pass and the `--no-kv-events` failure are in tests/e2e/test_router_ledger.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from kvrelay.observe.doctor import DoctorError, UrllibClient, run_doctor

BS = 16


def worker(wid: str, *, block_size: int = BS, router_bs: int = BS, events: bool = True) -> Any:
    return {
        "worker_id": wid,
        "model": "m",
        "block_size": block_size,
        "kv_events": events,
        "router": {"router_block_size": router_bs, "num_blocks_stored": 0},
    }


def row(worker_id: str, predicted: int, realized: int, prompt: int = 100) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "num_prompt_tokens": prompt,
        "num_predicted_tokens": max(predicted, realized),
        "num_unpredicted_hit_tokens": max(0, realized - predicted),
        "num_realized_tokens": realized,
        "route_reason": "best_overlap",
    }


class FakeServer:
    """Answers the doctor's calls; probes get the scripted ledger rows in order."""

    def __init__(self, workers: list[Any], rows: list[dict[str, Any]], announce: bool = True):
        self.workers = workers
        self.rows = rows
        self.announce = announce
        self.bodies: list[dict[str, Any]] = []

    def get(self, path: str) -> Any:
        if path == "/v1/models":
            return {"data": [{"id": "m"}]}
        assert path == "/kvrelay/workers"
        return {"workers": self.workers}

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        assert path == "/v1/completions" and headers == {"x-kvrelay-workload": "doctor"}
        self.bodies.append(body)
        ledger = self.rows[len(self.bodies) - 1]
        if self.announce:  # the probe's blocks reach the router
            for w in self.workers:
                if w["worker_id"] == ledger["worker_id"]:
                    w["router"]["num_blocks_stored"] += 6
        return {"kvrelay": {"ledger": ledger}}


def doctor(server: FakeServer) -> list[tuple[str, bool, str]]:
    checks = run_doctor(server, settle_s=0.05, sleep=lambda _: None)
    return [(c.name, c.ok, c.detail) for c in checks]


def test_a_healthy_server_passes_every_check() -> None:
    server = FakeServer([worker("a"), worker("b")], [row("a", 0, 0), row("a", 96, 96)])
    checks = doctor(server)
    assert [ok for _, ok, _ in checks] == [True] * 5
    assert server.bodies[0]["prompt"] == server.bodies[1]["prompt"]  # the same probe twice
    assert server.bodies[0]["kvrelay"] == {"router": "kv"}
    assert len(server.bodies[0]["prompt"].split()) > 64


def test_block_size_mismatch_fails_first() -> None:
    server = FakeServer([worker("a", block_size=32), worker("b")], [])
    checks = doctor(server)
    assert checks[0][:2] == ("block sizes match", False)
    assert "a uses 32, the router 16" in checks[0][2] and not server.bodies


def test_disabled_events_fail_before_any_probe() -> None:
    server = FakeServer([worker("a", events=False), worker("b")], [])
    _, ok, detail = doctor(server)[1]
    assert not ok and "a publish no KV events (started with --no-kv-events)" in detail


def test_events_that_never_arrive_fail() -> None:
    server = FakeServer([worker("a")], [row("a", 0, 0)], announce=False)
    name, ok, detail = doctor(server)[-1]
    assert (name, ok) == ("KV events reach the router", False)
    assert "no KV event announcing them reached the router" in detail


def test_a_second_probe_that_misses_fails() -> None:
    server = FakeServer([worker("a"), worker("b")], [row("a", 0, 0), row("b", 0, 0)])
    checks = dict((n, (ok, d)) for n, ok, d in doctor(server))
    ok, detail = checks["second probe hits the cache"]
    assert not ok and "first on a, second on b" in detail


def test_prediction_that_disagrees_with_the_engine_fails() -> None:
    server = FakeServer([worker("a")], [row("a", 0, 0), row("a", 96, 48)])
    checks = dict((n, (ok, d)) for n, ok, d in doctor(server))
    ok, detail = checks["prediction equals realized"]
    assert not ok and "predicted 96 cached tokens on a, the engine realized 48" in detail
    assert checks["second probe hits the cache"][0]


def test_an_unreachable_server_is_a_doctor_error() -> None:
    with pytest.raises(DoctorError, match=r"127\.0\.0\.1:9"):
        run_doctor(UrllibClient("http://127.0.0.1:9/v1", timeout_s=2))
