"""Router state: events feed the index, routing counts load, load drains on first token and
finish, workers come and go, and the approximate mode learns from its own decisions."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.errors import ServiceUnavailableError
from kvrelay.kv.events import BlockStored, KVEventBatch
from kvrelay.kv.hashing import hash_blocks
from kvrelay.kv.prefix_index import ApplyStatus
from kvrelay.router.policy import PolicyConfig, RouterPolicy
from kvrelay.router.state import RouterState, WorkerLoad

BS = 16


def make_state(config: PolicyConfig | None = None, now: list[float] | None = None) -> RouterState:
    clock = now if now is not None else [0.0]
    state = RouterState(BS, config, rng=random.Random(0), clock=lambda: clock[0])
    for w in ("w0", "w1", "w2"):
        state.add_worker(w)
    return state


def prompt(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(num_tokens)]


def store(hashes: list[int], event_id: int = 0) -> KVEventBatch:
    return KVEventBatch(event_id, 0.0, [BlockStored(hashes, None, [], BS)])


def test_events_steer_routing_and_load_is_tracked() -> None:
    state = make_state()
    tokens = prompt(1, 10 * BS + 3)  # 11 prompt blocks, 10 cacheable
    hashes = hash_blocks(tokens, BS)
    assert state.apply_events("w1", store(hashes[:8])).status is ApplyStatus.APPLIED
    d = state.route("r1", hashes, len(tokens))
    assert d.worker_id == "w1" and d.num_predicted_blocks == 8
    assert state.load("w1") == WorkerLoad(3, 0, 1)  # 11 - 8 blocks of prefill queued
    state.check_integrity()
    state.on_first_token("r1")
    assert state.load("w1") == WorkerLoad(0, 11, 1)
    state.on_first_token("r1")  # idempotent
    state.on_finished("r1")
    state.on_finished("r1")
    assert state.load("w1") == WorkerLoad()
    state.check_integrity()


def test_queued_prefill_spreads_cold_requests() -> None:
    state = make_state()
    picks = []
    for i in range(3):
        tokens = prompt(100 + i, 4 * BS)
        picks.append(state.route(f"r{i}", hash_blocks(tokens, BS), len(tokens)).worker_id)
    assert sorted(picks) == ["w0", "w1", "w2"]


def test_policy_override_per_request() -> None:
    state = make_state()
    tokens = prompt(2, 6 * BS)
    hashes = hash_blocks(tokens, BS)
    state.apply_events("w2", store(hashes))
    d = state.route("r", hashes, len(tokens), policy=RouterPolicy.ROUND_ROBIN)
    assert d.worker_id == "w0" and d.num_reachable_blocks == 5 and d.num_predicted_blocks == 0


def test_allowed_filter_and_no_worker() -> None:
    state = make_state()
    d = state.route("r", [], 5, allowed={"w2"})
    assert d.worker_id == "w2"
    with pytest.raises(ServiceUnavailableError):
        state.route("r2", [], 5, allowed=set())


def test_remove_worker_drops_its_requests_and_blocks() -> None:
    state = make_state()
    tokens = prompt(3, 5 * BS)
    hashes = hash_blocks(tokens, BS)
    state.apply_events("w0", store(hashes))
    d = state.route("r", hashes, len(tokens))
    assert d.worker_id == "w0"
    assert state.remove_worker("w0") == ["r"]
    assert state.workers == ["w1", "w2"] and state.overlap(hashes) == {}
    state.on_finished("r")  # late finish of a dropped request is harmless
    state.check_integrity()
    ignored = state.apply_events("w0", store(hashes, 1))
    assert ignored.status is ApplyStatus.IGNORED and state.overlap(hashes) == {}


def test_approximate_mode_learns_from_its_own_decisions() -> None:
    now = [0.0]
    config = PolicyConfig(approximate=True, approx_ttl_s=30.0)
    state = make_state(config, now)
    tokens = prompt(4, 8 * BS + 1)
    hashes = hash_blocks(tokens, BS)
    first = state.route("r1", hashes, len(tokens))
    state.on_finished("r1")
    second = state.route("r2", hashes, len(tokens))
    assert second.worker_id == first.worker_id and second.num_predicted_blocks == 8
    assert state.apply_events("w0", store(hashes)).status is ApplyStatus.IGNORED
    state.on_finished("r2")
    now[0] = 31.0
    assert state.overlap(hashes) == {}
    state.check_integrity()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["route", "route", "first", "finish", "add", "remove", "events"]),
            st.integers(0, 5),
            st.integers(1, 6 * BS),
        ),
        max_size=50,
    )
)
def test_random_lifecycles_keep_load_consistent(ops: list[tuple[str, int, int]]) -> None:
    state = make_state()
    base = prompt(5, 6 * BS)
    for kind, i, n in ops:
        rid, worker = f"r{i}", f"w{i % 4}"
        if kind == "route" and state.workers:
            state.route(rid, hash_blocks(base[:n], BS), n)
        elif kind == "first":
            state.on_first_token(rid)
        elif kind == "finish":
            state.on_finished(rid)
        elif kind == "add":
            state.add_worker(worker)
        elif kind == "remove":
            state.remove_worker(worker)
        elif worker in state.workers:
            state.apply_events(worker, store(hash_blocks(base[:n], BS), 0))
        state.check_integrity()
        for w in state.workers:
            load = state.load(w)
            assert min(load.num_queued_prefill_blocks, load.num_active_decode_blocks) >= 0
