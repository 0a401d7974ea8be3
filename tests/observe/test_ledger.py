"""Hit-rate ledger: funnel invariants, each loss cause produced on purpose, counters.

The cluster here is real KV memory (engine.kv_manager, torch-free) behind the real router
state, so 'predicted' comes from the index and 'realized' from the engine's own lookup.
"""

from __future__ import annotations

import random

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.engine.kv_manager import KVCacheManager
from kvrelay.engine.request import Request
from kvrelay.kv.hashing import hash_blocks
from kvrelay.observe.ledger import LOSS_CAUSES, HitLedger, LedgerRow, clamp_funnel
from kvrelay.observe.ledger_inputs import (
    OTHER_WORKLOAD,
    PrefillCostModel,
    SeenBlocks,
    WorkloadLabels,
)
from kvrelay.protocol import SamplingParams
from kvrelay.router.policy import PolicyConfig, RouterPolicy
from kvrelay.router.state import RouterState

BS = 4


class MiniCluster:
    """Workers = KV cache managers; a request is routed, prefilled at once, then freed."""

    def __init__(self, num_workers: int = 2, num_blocks: int = 64) -> None:
        self.engines = {f"w{i}": KVCacheManager(num_blocks, BS) for i in range(num_workers)}
        self.router = RouterState(BS, PolicyConfig(), rng=random.Random(0), clock=lambda: 0.0)
        cost = PrefillCostModel(min_tokens=1)
        self.ledger = HitLedger(BS, seen_capacity_blocks=10_000, prefill_cost=cost)
        for w in self.engines:
            self.router.add_worker(w)
        self.deliver_events = True
        self.stale: set[str] = set()  # workers that lost an event batch (never healed here)
        self._n = 0

    def serve(self, tokens: list[int], policy: RouterPolicy | None = None) -> LedgerRow:
        self._n += 1
        rid = f"r{self._n}"
        hashes = hash_blocks(tokens, BS)
        decision = self.router.route(rid, hashes, len(tokens), policy=policy)
        prediction = self.ledger.predict(rid, hashes, len(tokens), decision, workload="code")
        kv = self.engines[decision.worker_id]
        req = Request(rid, tokens, SamplingParams(max_tokens=1), BS, arrival_time=0.0)
        hits, num_hit = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
        req.num_computed_tokens = req.num_tokens
        kv.cache_blocks(req)
        kv.free(req)
        self.flush(decision.worker_id)
        self.router.on_first_token(rid)
        self.router.on_finished(rid)
        return self.ledger.record(prediction, {"device": num_hit}, prefill_s=0.001)

    def flush(self, worker: str) -> None:
        batch = self.engines[worker].take_events(0.0)
        if batch is None:
            return
        if not self.deliver_events:
            self.stale.add(worker)
            return
        self.router.apply_events(worker, batch)
        self.ledger.observe_events(batch)

    def evict_everywhere(self) -> None:
        for w, kv in self.engines.items():
            kv.reset_prefix_cache()
            self.flush(w)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def assert_funnel(row: LedgerRow) -> None:
    f = (
        row.num_prompt_tokens,
        row.num_seen_tokens,
        row.num_reachable_tokens,
        row.num_predicted_tokens,
    )
    assert f[0] >= f[1] >= f[2] >= f[3] >= 0, row
    assert 0 <= row.num_realized_tokens <= row.num_prompt_tokens
    assert all(v >= 0 for v in row.losses().values())
    assert sum(row.losses().values()) == row.num_prompt_tokens - row.num_realized_tokens


# -- each loss cause, on purpose ------------------------------------------------------------


def test_first_request_is_all_cold() -> None:
    row = MiniCluster().serve(tokens(1, 10 * BS))
    assert row.lost_cold_tokens == 10 * BS and row.num_realized_tokens == 0
    assert_funnel(row)


def test_repeat_predicts_exactly_what_the_engine_realizes() -> None:
    cluster = MiniCluster()
    for n in (10 * BS, 10 * BS + 3):  # with and without a partial last block
        prompt = tokens(n, n)
        cluster.serve(prompt)
        row = cluster.serve(prompt)
        # The last prompt token is never a hit: 10 full blocks -> 9 cacheable.
        assert row.num_predicted_tokens == row.num_realized_tokens == (n - 1) // BS * BS
        assert row.lost_stale_index_tokens == row.num_unpredicted_hit_tokens == 0
        assert row.lost_cold_tokens == n - row.num_realized_tokens
        assert_funnel(row)


def test_evicted_everywhere_is_capacity_loss() -> None:
    cluster = MiniCluster()
    prompt = tokens(2, 8 * BS)
    cluster.serve(prompt)
    cluster.evict_everywhere()
    row = cluster.serve(prompt)
    assert row.num_seen_tokens == 7 * BS and row.num_reachable_tokens == 0
    assert row.lost_capacity_tokens == 7 * BS and row.lost_routing_tokens == 0
    assert_funnel(row)


def test_forced_round_robin_is_routing_loss() -> None:
    cluster = MiniCluster()
    prompt = tokens(3, 8 * BS)
    first = cluster.serve(prompt, RouterPolicy.ROUND_ROBIN)  # turn 0 -> w0
    row = cluster.serve(prompt, RouterPolicy.ROUND_ROBIN)  # turn 1 -> w1, cold there
    assert (first.worker_id, row.worker_id, row.best_worker_id) == ("w0", "w1", "w0")
    assert row.num_reachable_tokens == 7 * BS and row.num_predicted_tokens == 0
    assert row.lost_routing_tokens == 7 * BS and row.route_reason == "round_robin"
    assert_funnel(row)


def test_dropped_events_are_stale_index_loss() -> None:
    cluster = MiniCluster()
    prompt = tokens(4, 8 * BS)
    cluster.serve(prompt)
    cluster.deliver_events = False  # the eviction never reaches the router
    cluster.evict_everywhere()
    row = cluster.serve(prompt)
    assert row.num_predicted_tokens == 7 * BS and row.num_realized_tokens == 0
    assert row.lost_stale_index_tokens == 7 * BS
    assert_funnel(row)


def test_unpredicted_hits_raise_the_funnel_instead_of_going_negative() -> None:
    cluster = MiniCluster(num_workers=1)
    prompt = tokens(5, 8 * BS)
    cluster.deliver_events = False  # the router never learns the blocks were stored
    cluster.serve(prompt)
    row = cluster.serve(prompt)
    assert row.num_realized_tokens == 7 * BS and row.num_unpredicted_hit_tokens == 7 * BS
    assert row.num_predicted_tokens == 7 * BS and row.lost_stale_index_tokens == 0
    assert_funnel(row)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_random_code_sessions_keep_the_funnel(seed: int) -> None:
    """Sessions share a repo prefix and grow turn by turn on small caches; some event
    batches are lost. Every row keeps the invariants; with events delivered and nothing
    evicted between routing and prefill, predicted equals realized."""
    rng = random.Random(seed)
    cluster = MiniCluster(num_workers=3, num_blocks=40)
    repos = [tokens(rng.randrange(100), rng.randrange(4, 12) * BS) for _ in range(3)]
    sessions = [list(rng.choice(repos)) for _ in range(5)]
    for _ in range(30):
        s = rng.randrange(len(sessions))
        sessions[s] += tokens(rng.randrange(10_000), rng.randrange(1, 3 * BS))
        sessions[s] = sessions[s][-24 * BS :] if len(sessions[s]) > 30 * BS else sessions[s]
        cluster.deliver_events = rng.random() > 0.1
        stale_before = set(cluster.stale)
        row = cluster.serve(sessions[s], rng.choice(list(RouterPolicy)))
        assert_funnel(row)
        if row.worker_id not in stale_before:
            assert row.lost_stale_index_tokens == row.num_unpredicted_hit_tokens == 0


# -- clamping, pieces, counters ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 200),
    st.integers(-2, 60),
    st.integers(-2, 60),
    st.integers(-2, 60),
    st.integers(-5, 250),
)
def test_clamped_funnel_is_ordered_and_losses_sum(
    prompt: int, seen: int, reach: int, pred: int, realized: int
) -> None:
    f = clamp_funnel(BS, prompt, seen, reach, pred, realized)
    assert f.prompt >= f.seen >= f.reachable >= f.predicted >= f.realized >= 0
    assert all(x >= 0 for x in f.losses())
    assert sum(f.losses()) == f.prompt - f.realized
    assert f.predicted - f.unpredicted <= max(0, (prompt - 1) // BS) * BS


def test_seen_blocks_is_a_bounded_lru_prefix_match() -> None:
    seen = SeenBlocks(capacity_blocks=3)
    seen.add([1, 2, 3])
    assert seen.match_prefix([1, 2, 3, 4]) == 3
    seen.add([4])  # evicts 1 (2 and 3 were refreshed after it)
    assert seen.match_prefix([1, 2]) == 0 and seen.match_prefix([2, 3, 4]) == 3
    assert len(seen) == 3


def test_workload_labels_are_bounded_and_sanitized() -> None:
    labels = WorkloadLabels(max_values=3)
    assert labels.label(None) == "default"
    assert labels.label(" Code Session!") == "code_session_"
    assert labels.label("fim") == "fim"
    assert labels.label("agents") == OTHER_WORKLOAD
    assert labels.label("fim") == "fim"


def test_prefill_cost_ewma_and_saved_seconds() -> None:
    cost = PrefillCostModel(alpha=0.5, min_tokens=64)
    assert cost.saved_s("w", 100) == 0.0
    cost.observe("w", 0.2, 100)  # 2 ms / token
    cost.observe("w", 0.1, 10)  # too few tokens: skipped
    cost.observe("w", 0.4, 100)  # 4 ms / token -> EWMA 3 ms
    assert abs(cost.saved_s("w", 1000) - 3.0) < 1e-9


def test_counters_per_label_set_and_metric_samples() -> None:
    cluster = MiniCluster()
    prompt = tokens(6, 6 * BS)
    cluster.serve(prompt)
    cluster.serve(prompt)
    totals = cluster.ledger.totals()
    [(key, t)] = totals.items()
    assert key == ("", "w0", "code")
    assert t["num_requests"] == 2 and t["num_prompt_tokens"] == 12 * BS
    assert t["num_realized_tokens"] == 5 * BS
    assert t["lost_cold_tokens"] + t["lost_capacity_tokens"] == 12 * BS - 5 * BS
    assert t["prefill_s_saved"] > 0
    labels = {"model": "", "worker": "w0", "workload": "code"}
    samples = {s.name: s.value for s in cluster.ledger.metric_samples() if s.labels == labels}
    assert samples["ledger_realized_tokens_total"] == 5 * BS
    assert samples["ledger_requests_total"] == 2
    losses = sum(samples[f"ledger_lost_{c}_tokens_total"] for c in LOSS_CAUSES)
    assert losses == samples["ledger_prompt_tokens_total"] - samples["ledger_realized_tokens_total"]


def test_row_round_trips_as_json() -> None:
    cluster = MiniCluster()
    row = cluster.serve(tokens(7, 3 * BS))
    data = msgspec.json.encode(row)
    assert msgspec.json.decode(data, type=LedgerRow) == row
    assert b'"lost_cold_tokens"' in data
