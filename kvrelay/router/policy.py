"""Router policy: the pure function that picks a worker for a request.

Owns: the policy names, `PolicyConfig`, the cost function, tie-breaking, softmax sampling,
and `RoutingDecision` (the choice plus the numbers the hit-rate ledger needs). Pure and
deterministic: no clock, no I/O, randomness only from an injected `random.Random`.
Imports only L0 (`errors`); must not import the engine, the runtime or any state.

Cost of worker w for a prompt of P blocks (ceil(tokens / block_size)) of which w caches o_w:

    cost_w = overlap_weight * ((P - o_w) + queued_prefill_blocks_w) + active_decode_blocks_w

The first term is the prefill work w would have to do before this request's first token
(its own uncached blocks plus the prefill already queued there); the second is the decode
work w is busy with. See docs/router.md for the reasoning and the defaults.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvrelay.errors import InvalidRequestError

COST_EPSILON = 1e-9  # costs closer than this are a tie


class RouterPolicy(enum.StrEnum):
    KV = "kv"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_LOADED = "least_loaded"


class RouteReason(enum.StrEnum):
    """Why the chosen worker was chosen; the ledger attributes routing loss with it."""

    BEST_OVERLAP = "best_overlap"  # kv: the chosen worker has the longest cached prefix
    LOAD_OVER_OVERLAP = "load_over_overlap"  # kv: a longer prefix elsewhere cost more in load
    NO_OVERLAP = "no_overlap"  # kv: no worker caches any of the prompt; lowest load cost
    SAMPLED = "sampled"  # kv with temperature > 0: sampled a worker with a shorter prefix
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_LOADED = "least_loaded"


def parse_policy(name: str) -> RouterPolicy:
    """The policy named `name` (a flag or a per-request override), or a typed error."""
    try:
        return RouterPolicy(name)
    except ValueError:
        valid = ", ".join(p.value for p in RouterPolicy)
        raise InvalidRequestError(f"unknown router policy {name!r}; valid: {valid}") from None


@dataclass(frozen=True)
class PolicyConfig:
    """Router settings. overlap_weight > 1 favours cache reuse over balance; temperature 0
    is a deterministic argmin, > 0 samples from a softmax over normalized costs."""

    policy: RouterPolicy = RouterPolicy.KV
    overlap_weight: float = 1.0
    temperature: float = 0.0
    approximate: bool = False  # no KV events: guess the index from routing decisions
    approx_ttl_s: float = 120.0
    approx_max_entries: int = 1 << 20

    def __post_init__(self) -> None:
        if not math.isfinite(self.overlap_weight) or self.overlap_weight < 0:
            raise InvalidRequestError(f"overlap_weight must be >= 0, got {self.overlap_weight}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.approx_ttl_s <= 0 or self.approx_max_entries < 1:
            raise InvalidRequestError("approx_ttl_s must be > 0 and approx_max_entries >= 1")


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One candidate as the policy sees it: cached prefix and load, all in blocks."""

    worker_id: str
    num_overlap_blocks: int = 0
    num_queued_prefill_blocks: int = 0
    num_active_decode_blocks: int = 0

    @property
    def num_load_blocks(self) -> int:
        return self.num_queued_prefill_blocks + self.num_active_decode_blocks


@dataclass(frozen=True)
class RoutingDecision:
    """The chosen worker and the funnel numbers (in blocks, capped at the cacheable prefix:
    the last prompt token is never a hit) the ledger turns into tokens."""

    worker_id: str
    policy: str
    reason: str
    best_worker_id: str  # a worker with the longest cached prefix (F2's worker)
    num_prompt_blocks: int  # ceil(prompt tokens / block size)
    num_reachable_blocks: int  # F2: longest cached prefix on any candidate
    num_predicted_blocks: int  # F3: cached prefix on the chosen worker, per the index
    cost: float  # the chosen worker's kv cost (computed for every policy, for comparison)
    costs: dict[str, float] = field(default_factory=dict)


def kv_cost(
    snapshot: WorkerSnapshot, num_prompt_blocks: int, num_overlap_blocks: int, weight: float
) -> float:
    uncached = num_prompt_blocks - num_overlap_blocks
    prefill = uncached + snapshot.num_queued_prefill_blocks
    return weight * prefill + snapshot.num_active_decode_blocks


def select_worker(
    candidates: Sequence[WorkerSnapshot],
    num_prompt_tokens: int,
    block_size: int,
    config: PolicyConfig,
    rng: random.Random,
    turn: int,
    policy: RouterPolicy | None = None,
) -> RoutingDecision:
    """Pick one of `candidates` (non-empty, in a stable order, e.g. by worker id).

    `turn` counts routed requests; round robin cycles with it and ties rotate with it, so
    equal workers share cold traffic instead of piling onto the first. `policy` overrides
    `config.policy` (per-request experiments).
    """
    assert candidates, "select_worker needs at least one candidate"
    policy = policy or config.policy
    num_prompt_blocks = -(-num_prompt_tokens // block_size)
    cacheable = max(0, (num_prompt_tokens - 1) // block_size)
    overlaps = [min(c.num_overlap_blocks, cacheable) for c in candidates]
    costs = [
        kv_cost(c, num_prompt_blocks, o, config.overlap_weight)
        for c, o in zip(candidates, overlaps, strict=True)
    ]
    index, reason = _choose(policy, candidates, overlaps, costs, config, rng, turn)
    best = _best_overlap_index(overlaps, costs, index)
    return RoutingDecision(
        worker_id=candidates[index].worker_id,
        policy=policy.value,
        reason=reason.value,
        best_worker_id=candidates[best].worker_id,
        num_prompt_blocks=num_prompt_blocks,
        num_reachable_blocks=overlaps[best],
        num_predicted_blocks=overlaps[index],
        cost=costs[index],
        costs={c.worker_id: cost for c, cost in zip(candidates, costs, strict=True)},
    )


def _choose(
    policy: RouterPolicy,
    candidates: Sequence[WorkerSnapshot],
    overlaps: list[int],
    costs: list[float],
    config: PolicyConfig,
    rng: random.Random,
    turn: int,
) -> tuple[int, RouteReason]:
    n = len(candidates)
    if policy is RouterPolicy.ROUND_ROBIN:
        return turn % n, RouteReason.ROUND_ROBIN
    if policy is RouterPolicy.RANDOM:
        return rng.randrange(n), RouteReason.RANDOM
    if policy is RouterPolicy.LEAST_LOADED:
        loads = [float(c.num_load_blocks) for c in candidates]
        return _argmin_rotated(loads, turn), RouteReason.LEAST_LOADED
    if config.temperature > 0 and n > 1:
        index = _softmax_sample(costs, config.temperature, rng)
    else:
        index = _kv_argmin(overlaps, costs, turn)
    return index, _kv_reason(overlaps, index, sampled=config.temperature > 0)


def _kv_argmin(overlaps: list[int], costs: list[float], turn: int) -> int:
    """Lowest cost; among equal costs the longest cached prefix; then rotate by turn."""
    low = min(costs)
    tied = [i for i, c in enumerate(costs) if c - low <= COST_EPSILON]
    if len(tied) == 1:
        return tied[0]
    longest = max(overlaps[i] for i in tied)
    tied = [i for i in tied if overlaps[i] == longest]
    return tied[turn % len(tied)]


def _argmin_rotated(values: list[float], turn: int) -> int:
    low = min(values)
    tied = [i for i, v in enumerate(values) if v - low <= COST_EPSILON]
    return tied[turn % len(tied)]


def _softmax_sample(costs: list[float], temperature: float, rng: random.Random) -> int:
    """Sample with p_i proportional to exp(-z_i / T), z = costs min-max normalized to [0, 1]
    so the temperature means the same at any load scale."""
    low, high = min(costs), max(costs)
    span = high - low
    if span <= COST_EPSILON:
        return rng.randrange(len(costs))
    weights = [math.exp(-((c - low) / span) / temperature) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]


def _kv_reason(overlaps: list[int], index: int, sampled: bool) -> RouteReason:
    longest = max(overlaps)
    if longest == 0:
        return RouteReason.NO_OVERLAP
    if overlaps[index] == longest:
        return RouteReason.BEST_OVERLAP
    return RouteReason.SAMPLED if sampled else RouteReason.LOAD_OVER_OVERLAP


def _best_overlap_index(overlaps: list[int], costs: list[float], chosen: int) -> int:
    """The chosen worker if it has the longest prefix, else the cheapest of those that do."""
    longest = max(overlaps)
    if overlaps[chosen] == longest:
        return chosen
    tied = [i for i, o in enumerate(overlaps) if o == longest]
    return min(tied, key=lambda i: costs[i])
