"""Router policy: the cost function, tie-breaking, temperature and the baseline policies."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvrelay.errors import InvalidRequestError
from kvrelay.router.policy import (
    PolicyConfig,
    RouteReason,
    RouterPolicy,
    RoutingDecision,
    WorkerSnapshot,
    kv_cost,
    parse_policy,
    select_worker,
)

BS = 16
PROMPT = 20 * BS + 5  # 21 prompt blocks, 20 of them cacheable


def snap(worker: str, overlap: int = 0, queued: int = 0, active: int = 0) -> WorkerSnapshot:
    return WorkerSnapshot(worker, overlap, queued, active)


def choose(
    candidates: list[WorkerSnapshot],
    config: PolicyConfig | None = None,
    turn: int = 0,
    seed: int = 0,
    policy: RouterPolicy | None = None,
    num_tokens: int = PROMPT,
) -> RoutingDecision:
    return select_worker(
        candidates, num_tokens, BS, config or PolicyConfig(), random.Random(seed), turn, policy
    )


def test_kv_picks_the_worker_that_caches_the_prompt() -> None:
    d = choose([snap("a"), snap("b", overlap=12), snap("c", overlap=3)])
    assert d.worker_id == "b" and d.reason == RouteReason.BEST_OVERLAP
    assert (d.num_reachable_blocks, d.num_predicted_blocks, d.best_worker_id) == (12, 12, "b")
    assert d.num_prompt_blocks == 21
    assert d.costs == {"a": 21.0, "b": 9.0, "c": 18.0} and d.cost == 9.0


def test_load_outweighs_overlap() -> None:
    busy = snap("b", overlap=12, queued=5, active=40)  # 1 * (9 + 5) + 40 = 54
    d = choose([snap("a", active=10), busy])  # 21 + 10 = 31
    assert d.worker_id == "a" and d.reason == RouteReason.LOAD_OVER_OVERLAP
    assert (d.num_reachable_blocks, d.num_predicted_blocks, d.best_worker_id) == (12, 0, "b")
    # A larger overlap weight makes reuse win again.
    d = choose([snap("a", active=10), busy], PolicyConfig(overlap_weight=8.0))
    assert d.worker_id == "b"  # 8 * 14 + 40 = 152 < 8 * 21 + 10 = 178


def test_cost_formula() -> None:
    s = snap("w", overlap=4, queued=3, active=7)
    assert kv_cost(s, 10, 4, 2.0) == 2.0 * ((10 - 4) + 3) + 7


def test_overlap_is_capped_at_the_cacheable_prefix() -> None:
    # 32 tokens = 2 full blocks, but the last token is never a hit: only 1 block is cacheable.
    d = choose([snap("a", overlap=2)], num_tokens=32)
    assert d.num_predicted_blocks == 1 and d.num_reachable_blocks == 1
    assert d.num_prompt_blocks == 2


def test_ties_prefer_overlap_then_rotate_with_turn() -> None:
    # Equal cost (21 - 11 + 1 = 21 - 10 = 11): the longer cached prefix wins the tie.
    tied = [snap("a", overlap=11, active=1), snap("b", overlap=10)]
    assert choose(tied).worker_id == "a"
    cold = [snap("a"), snap("b"), snap("c")]
    assert [choose(cold, turn=t).worker_id for t in range(4)] == ["a", "b", "c", "a"]
    assert choose(cold).reason == RouteReason.NO_OVERLAP


def test_temperature_zero_is_deterministic_whatever_the_rng() -> None:
    cands = [snap("a", overlap=3, active=2), snap("b", overlap=5, active=4), snap("c")]
    picks = {choose(cands, seed=s).worker_id for s in range(20)}
    assert len(picks) == 1


def test_softmax_sampling_is_seeded_and_follows_cost() -> None:
    cands = [snap("a", overlap=20), snap("b"), snap("c")]
    warm = PolicyConfig(temperature=0.5)
    runs = [[choose(cands, warm, seed=s).worker_id for s in range(200)] for _ in range(2)]
    assert runs[0] == runs[1]
    counts = Counter(runs[0])
    assert counts["a"] > counts["b"] and counts["a"] > counts["c"] and len(counts) == 3
    d = next(choose(cands, warm, seed=s) for s in range(200) if runs[0][s] != "a")
    assert d.reason == RouteReason.SAMPLED and d.best_worker_id == "a"


def test_round_robin_cycles() -> None:
    cands = [snap("a", overlap=20), snap("b"), snap("c")]
    rr = PolicyConfig(policy=RouterPolicy.ROUND_ROBIN)
    picks = [choose(cands, rr, turn=t).worker_id for t in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    d = choose(cands, rr, turn=1)
    assert d.reason == RouteReason.ROUND_ROBIN
    assert (d.num_reachable_blocks, d.num_predicted_blocks, d.best_worker_id) == (20, 0, "a")


def test_random_is_seeded() -> None:
    cands = [snap(w) for w in "abcd"]
    cfg = PolicyConfig(policy=RouterPolicy.RANDOM)
    a = [choose(cands, cfg, seed=s).worker_id for s in range(50)]
    b = [choose(cands, cfg, seed=s).worker_id for s in range(50)]
    assert a == b and len(set(a)) == 4


def test_least_loaded_ignores_overlap() -> None:
    cands = [snap("a", overlap=20, active=9), snap("b", queued=3, active=5), snap("c", active=7)]
    d = choose(cands, policy=RouterPolicy.LEAST_LOADED)
    assert d.worker_id == "c" and d.policy == "least_loaded"


def test_parse_policy_and_config_validation() -> None:
    assert parse_policy("round_robin") is RouterPolicy.ROUND_ROBIN
    with pytest.raises(InvalidRequestError, match="valid: kv, round_robin"):
        parse_policy("fastest")
    with pytest.raises(InvalidRequestError):
        PolicyConfig(temperature=-1.0)
    with pytest.raises(InvalidRequestError):
        PolicyConfig(overlap_weight=float("nan"))
