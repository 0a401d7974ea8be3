"""The router service's data: its configuration, one request's ticket, and what the service
heard from each worker.

Owns: `RouterConfig`, `RouteTicket` (a request's way through the router: its prompt hashed
once, its routing decision and ledger prediction, and the ledger row once closed) and
`WorkerEventStats` (per worker instance: event batches, blocks, gaps and dumps, exported at
`/kvrelay/workers` and `/metrics`). Plain dataclasses; imports router.policy and observe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvrelay.observe.ledger import LedgerRow, Prediction
from kvrelay.observe.ledger_inputs import DEFAULT_MAX_WORKLOADS, DEFAULT_SEEN_CAPACITY_BLOCKS
from kvrelay.router.placement import Placement, PlacementConfig
from kvrelay.router.policy import PolicyConfig, RouterPolicy, RoutingDecision


@dataclass(frozen=True)
class RouterConfig:
    """The router's policy and the ledger's bounds. `block_size` None: adopt each model's
    first registered worker's; set: workers with another block size are refused."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    block_size: int | None = None
    seed: int | None = None  # random / softmax choices; None: nondeterministic
    seen_capacity_blocks: int = DEFAULT_SEEN_CAPACITY_BLOCKS
    max_workloads: int = DEFAULT_MAX_WORKLOADS
    placement: PlacementConfig = field(default_factory=PlacementConfig)


@dataclass
class WorkerEventStats:
    """What the service heard from one worker instance (reset when it restarts)."""

    model: str
    block_size: int
    kv_events: bool
    routable: bool  # joined its model's state (block size matches)
    num_event_batches: int = 0
    num_blocks_stored: int = 0
    num_blocks_removed: int = 0
    num_blocks_rejected: int = 0  # stored blocks with a foreign block size
    num_gaps: int = 0  # batches that made the index ask for a dump
    num_dumps_requested: int = 0
    num_dumps_applied: int = 0
    num_dumps_failed: int = 0
    last_dump_at: float = -1e9  # monotonic time of the last dump request


@dataclass
class RouteTicket:
    """One request's way through the router: hashed once, routed (again on a retry),
    closed with the engine's realized hits. `row` is set once the ledger recorded it."""

    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    workload: str
    policy: RouterPolicy | None = None
    cache_salt: str | None = None
    block_hashes: list[int] = field(default_factory=list)
    block_size: int = 0
    decision: RoutingDecision | None = None
    prediction: Prediction | None = None
    row: LedgerRow | None = None
    first_token: bool = False
    placement: Placement | None = None  # local or remote prefill (decode workers only)
