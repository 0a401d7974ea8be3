"""Hit-rate ledger: for every request, where each prompt token could have come from cache,
where the router expected it to, where it really did, and why the rest did not.

Owns: the per-request funnel and its loss causes (`LedgerRow`), the clamping, and token
counters per (model, worker, workload). The bounded records it reads (seen blocks, workload
labels, prefill cost per token) live in `observe/ledger_inputs.py`.
Pure and deterministic; no clock, no I/O. Must not import prometheus_client (the exporter
reads `metric_samples()`), the router or the engine: routing facts arrive through the
`RouteFacts` protocol, realized hits as plain numbers.

Funnel, in tokens (ARCHITECTURE.md). Blocks become tokens as `min(blocks, cacheable) *
block_size` with `cacheable = (F0 - 1) // block_size`: only full blocks are hashed and the
last prompt token is never a hit (its logits must be computed), exactly as the engine
counts, so predicted equals realized when nothing changed between routing and prefill.

    F0 prompt  >=  F1 seen  >=  F2 reachable  >=  F3 predicted  >=  F4 realized

Clamping. The raw numbers can break that order: the seen record is bounded (F1 < F2 after it
evicts), and the engine can hit more than the index predicted (F4 > F3, events lagging). The
row keeps the order by raising, never lowering, each stage to the next one's value:
G4 = min(F4, F0), G3 = max(F3, G4), G2 = max(F2, G3), G1 = max(F1, G2). Losses are the
differences — cold G0-G1, capacity G1-G2, routing G2-G3, stale index G3-G4 — so each is >= 0
and they sum to F0 - F4. Realized hits the index did not predict are kept separately as
`num_unpredicted_hit_tokens` (= G3 - F3); only predicted-but-missing hits count as stale.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Protocol

import msgspec

from kvrelay.kv.events import BlockStored, KVEventBatch
from kvrelay.observe.ledger_inputs import (
    DEFAULT_MAX_WORKLOADS,
    DEFAULT_SEEN_CAPACITY_BLOCKS,
    PrefillCostModel,
    SeenBlocks,
    WorkloadLabels,
)

HIT_RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # for the exporter
LOSS_CAUSES = ("cold", "capacity", "routing", "stale_index")


class RouteFacts(Protocol):
    """What the ledger needs from a routing decision (router.policy.RoutingDecision)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def best_worker_id(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def num_reachable_blocks(self) -> int: ...
    @property
    def num_predicted_blocks(self) -> int: ...


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    """A request's funnel at routing time (F0..F3 in blocks); carried until it finishes."""

    request_id: str
    model: str
    workload: str
    worker_id: str
    best_worker_id: str
    policy: str
    reason: str
    num_prompt_tokens: int
    num_seen_blocks: int
    num_reachable_blocks: int
    num_predicted_blocks: int
    block_hashes: list[int]


class LedgerRow(msgspec.Struct, frozen=True, kw_only=True):
    """One request's funnel and loss causes, in tokens (clamped; see the module docstring).
    Goes into the response's `kvrelay` extension and the JSONL request log."""

    request_id: str
    model: str
    workload: str
    worker_id: str
    best_worker_id: str
    policy: str
    route_reason: str
    block_size: int
    num_prompt_tokens: int  # F0
    num_seen_tokens: int  # F1
    num_reachable_tokens: int  # F2
    num_predicted_tokens: int  # F3
    num_realized_tokens: int  # F4
    realized_tokens_by_tier: dict[str, int]
    lost_cold_tokens: int
    lost_capacity_tokens: int
    lost_routing_tokens: int
    lost_stale_index_tokens: int
    num_unpredicted_hit_tokens: int
    prefill_s_saved: float

    @property
    def hit_ratio(self) -> float:
        return self.num_realized_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    def losses(self) -> dict[str, int]:
        return dict(
            zip(
                LOSS_CAUSES,
                (
                    self.lost_cold_tokens,
                    self.lost_capacity_tokens,
                    self.lost_routing_tokens,
                    self.lost_stale_index_tokens,
                ),
                strict=True,
            )
        )


class MetricSample(NamedTuple):
    """One counter value for the exporter: kvrelay_<name>{labels} value (all counters)."""

    name: str
    labels: dict[str, str]
    value: float


@dataclass(slots=True)
class _Totals:
    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_seen_tokens: int = 0
    num_reachable_tokens: int = 0
    num_predicted_tokens: int = 0
    num_realized_tokens: int = 0
    num_unpredicted_hit_tokens: int = 0
    prefill_s_saved: float = 0.0
    lost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOSS_CAUSES, 0))
    realized_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Funnel:
    """F0..F4 in tokens after clamping, plus realized hits beyond the prediction."""

    prompt: int
    seen: int
    reachable: int
    predicted: int
    realized: int
    unpredicted: int

    def losses(self) -> tuple[int, int, int, int]:
        """(cold, capacity, routing, stale_index), each >= 0, summing to prompt - realized."""
        return (
            self.prompt - self.seen,
            self.seen - self.reachable,
            self.reachable - self.predicted,
            self.predicted - self.realized,
        )


def clamp_funnel(
    block_size: int,
    num_prompt_tokens: int,
    seen_blocks: int,
    reachable_blocks: int,
    predicted_blocks: int,
    realized_tokens: int,
) -> Funnel:
    """Blocks to tokens (capped at the cacheable prefix) and the order-keeping clamp."""
    cacheable = max(0, (num_prompt_tokens - 1) // block_size)

    def tokens(blocks: int) -> int:
        return min(max(blocks, 0), cacheable) * block_size

    realized = min(max(realized_tokens, 0), num_prompt_tokens)
    raw_predicted = tokens(predicted_blocks)
    predicted = max(raw_predicted, realized)
    reachable = max(tokens(reachable_blocks), predicted)
    seen = max(tokens(seen_blocks), reachable)
    return Funnel(
        num_prompt_tokens, seen, reachable, predicted, realized, predicted - raw_predicted
    )


class HitLedger:
    """The funnel per request and its sums. Not thread-safe: one owner drives it.

    Flow: `predict()` when a request is routed (reads the seen record), `record()` when its
    prefill's realized hits are known (adds its blocks to the seen record, updates counters),
    `observe_events()` for every KV event batch (blocks computed during decode are seen too).
    """

    def __init__(
        self,
        block_size: int,
        seen_capacity_blocks: int = DEFAULT_SEEN_CAPACITY_BLOCKS,
        max_workloads: int = DEFAULT_MAX_WORKLOADS,
        prefill_cost: PrefillCostModel | None = None,
    ) -> None:
        self.block_size = block_size
        self.seen = SeenBlocks(seen_capacity_blocks)
        self.workloads = WorkloadLabels(max_workloads)
        self.prefill_cost = prefill_cost or PrefillCostModel()
        self._totals: dict[tuple[str, str, str], _Totals] = {}

    def predict(
        self,
        request_id: str,
        block_hashes: list[int],
        num_prompt_tokens: int,
        route: RouteFacts,
        *,
        model: str = "",
        workload: str | None = None,
    ) -> Prediction:
        return Prediction(
            request_id=request_id,
            model=model,
            workload=self.workloads.label(workload),
            worker_id=route.worker_id,
            best_worker_id=route.best_worker_id,
            policy=route.policy,
            reason=route.reason,
            num_prompt_tokens=num_prompt_tokens,
            num_seen_blocks=self.seen.match_prefix(block_hashes),
            num_reachable_blocks=route.num_reachable_blocks,
            num_predicted_blocks=route.num_predicted_blocks,
            block_hashes=block_hashes,
        )

    def record(
        self,
        prediction: Prediction,
        realized_tokens_by_tier: Mapping[str, int],
        prefill_s: float | None = None,
    ) -> LedgerRow:
        """Close a request's funnel with the engine's realized hits (tokens per tier) and,
        when measured, its prefill time; returns the row and adds it to the counters."""
        p = prediction
        realized_raw = sum(realized_tokens_by_tier.values())
        funnel = clamp_funnel(
            self.block_size,
            p.num_prompt_tokens,
            p.num_seen_blocks,
            p.num_reachable_blocks,
            p.num_predicted_blocks,
            realized_raw,
        )
        if prefill_s is not None:
            uncached = p.num_prompt_tokens - funnel.realized
            self.prefill_cost.observe(p.worker_id, prefill_s, uncached)
        saved_s = self.prefill_cost.saved_s(p.worker_id, funnel.realized)
        row = _make_row(p, funnel, dict(realized_tokens_by_tier), self.block_size, saved_s)
        self.seen.add(p.block_hashes)
        self._add(row)
        return row

    def observe_events(self, batch: KVEventBatch) -> None:
        """Every stored block has been computed somewhere: remember it as seen."""
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self.seen.add(ev.block_hashes)

    def _add(self, row: LedgerRow) -> None:
        key = (row.model, row.worker_id, row.workload)
        t = self._totals.get(key)
        if t is None:
            t = self._totals[key] = _Totals()
        t.num_requests += 1
        t.num_prompt_tokens += row.num_prompt_tokens
        t.num_seen_tokens += row.num_seen_tokens
        t.num_reachable_tokens += row.num_reachable_tokens
        t.num_predicted_tokens += row.num_predicted_tokens
        t.num_realized_tokens += row.num_realized_tokens
        t.num_unpredicted_hit_tokens += row.num_unpredicted_hit_tokens
        t.prefill_s_saved += row.prefill_s_saved
        for cause, n in row.losses().items():
            t.lost[cause] += n
        for tier, n in row.realized_tokens_by_tier.items():
            t.realized_by_tier[tier] = t.realized_by_tier.get(tier, 0) + n

    def totals(self) -> dict[tuple[str, str, str], dict[str, float]]:
        """Counters per (model, worker, workload), flattened (for tests and reports)."""
        out: dict[tuple[str, str, str], dict[str, float]] = {}
        for key, t in self._totals.items():
            flat: dict[str, float] = {
                f.name: getattr(t, f.name)
                for f in fields(t)
                if f.name not in ("lost", "realized_by_tier")
            }
            flat.update({f"lost_{c}_tokens": n for c, n in t.lost.items()})
            out[key] = flat
        return out

    def metric_samples(self) -> Iterator[MetricSample]:
        """Every counter as (name without the `kvrelay_` prefix, labels, value), labels from
        the fixed set (model, worker, workload). Loss causes are separate names; realized
        hits by tier stay in the rows and `totals()` (a `tier` label is not in the set)."""
        for (model, worker, workload), t in self._totals.items():
            labels = {"model": model, "worker": worker, "workload": workload}
            values: list[tuple[str, float]] = [
                ("requests_total", t.num_requests),
                ("prompt_tokens_total", t.num_prompt_tokens),
                ("seen_tokens_total", t.num_seen_tokens),
                ("reachable_tokens_total", t.num_reachable_tokens),
                ("predicted_tokens_total", t.num_predicted_tokens),
                ("realized_tokens_total", t.num_realized_tokens),
                ("unpredicted_hit_tokens_total", t.num_unpredicted_hit_tokens),
                ("prefill_seconds_saved_total", t.prefill_s_saved),
            ]
            values += [(f"lost_{cause}_tokens_total", n) for cause, n in t.lost.items()]
            for name, value in values:
                yield MetricSample(f"ledger_{name}", labels, value)


def _make_row(
    p: Prediction, funnel: Funnel, by_tier: dict[str, int], block_size: int, saved_s: float
) -> LedgerRow:
    cold, capacity, routing, stale = funnel.losses()
    return LedgerRow(
        request_id=p.request_id,
        model=p.model,
        workload=p.workload,
        worker_id=p.worker_id,
        best_worker_id=p.best_worker_id,
        policy=p.policy,
        route_reason=p.reason,
        block_size=block_size,
        num_prompt_tokens=funnel.prompt,
        num_seen_tokens=funnel.seen,
        num_reachable_tokens=funnel.reachable,
        num_predicted_tokens=funnel.predicted,
        num_realized_tokens=funnel.realized,
        realized_tokens_by_tier=by_tier,
        lost_cold_tokens=cold,
        lost_capacity_tokens=capacity,
        lost_routing_tokens=routing,
        lost_stale_index_tokens=stale,
        num_unpredicted_hit_tokens=funnel.unpredicted,
        prefill_s_saved=saved_s,
    )
