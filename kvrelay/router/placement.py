"""Placement rule: prefill a request on its decode worker (local) or on a prefill worker
whose KV then moves to the decode worker (remote). A pure function of numbers the router
already has; documented in docs/disaggregation.md.

Owns: `PlacementConfig`, `PrefillCandidate`, `PlacementInput`, `Placement`, `place`.
Layer L3 (router): imports nothing from kvrelay; no I/O, no clock.

The rule, with `uncached` = prompt tokens after the decode worker's own prefix hit:

    local_s  = (decode_queued_tokens + uncached) / prefill_tokens_per_s
    remote_s = min over prefill workers p of
               (queued_p + compute_p) / prefill_tokens_per_s + uncached_bytes / bandwidth
    compute_p = uncached - (tokens p already caches beyond the decode worker's hit)

remote when mode is "always" (and a prefill worker exists), or when mode is "auto",
uncached >= min_remote_tokens and remote_s < local_s; local otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("auto", "always", "never")

# placement reasons (the `reason` label of kvrelay_placement_decisions_total)
REASON_NO_PREFILL_WORKER = "no_prefill_worker"
REASON_DISABLED = "disabled"
REASON_NOTHING_UNCACHED = "nothing_uncached"
REASON_BELOW_THRESHOLD = "below_threshold"
REASON_LOCAL_FASTER = "local_faster"
REASON_REMOTE_FASTER = "remote_faster"
REASON_FORCED = "forced"
REASONS = (
    REASON_NO_PREFILL_WORKER,
    REASON_DISABLED,
    REASON_NOTHING_UNCACHED,
    REASON_BELOW_THRESHOLD,
    REASON_LOCAL_FASTER,
    REASON_REMOTE_FASTER,
    REASON_FORCED,
)


@dataclass(frozen=True)
class PlacementConfig:
    """mode: "auto" (the rule), "always" (remote whenever a prefill worker exists and a
    block is missing; for tests), "never". The two rates are priors until measured."""

    mode: str = "auto"
    min_remote_tokens: int = 256
    prefill_tokens_per_s: float = 2000.0
    transfer_bytes_per_s: float = 1e9
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"placement mode must be one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class PrefillCandidate:
    worker_id: str
    num_cached_tokens: int  # prompt tokens its cache holds (router index)
    num_queued_tokens: int  # prompt tokens of remote prefills it is working on


@dataclass(frozen=True)
class PlacementInput:
    num_prompt_tokens: int
    block_size: int
    num_decode_cached_tokens: int  # the decode worker's prefix hit (router index)
    num_decode_queued_tokens: int  # prefill tokens already queued on the decode worker
    kv_bytes_per_block: int
    prefill_tokens_per_s: float  # measured (or the config's prior)
    transfer_bytes_per_s: float  # measured (or the config's prior)
    candidates: Sequence[PrefillCandidate]


@dataclass(frozen=True)
class Placement:
    remote: bool
    reason: str
    prefill_worker_id: str | None = None
    num_uncached_tokens: int = 0
    local_s: float = 0.0
    remote_s: float = 0.0


def _usable_tokens(num_prompt_tokens: int, block_size: int) -> int:
    """Tokens in the blocks a request can take from cache (the last token is computed)."""
    return max(0, (num_prompt_tokens - 1) // block_size) * block_size


def place(inp: PlacementInput, config: PlacementConfig) -> Placement:
    """Local or remote prefill for one request already assigned to a decode worker."""
    usable = _usable_tokens(inp.num_prompt_tokens, inp.block_size)
    decode_hit = min(inp.num_decode_cached_tokens, usable)
    movable = usable - decode_hit  # tokens whose KV could move
    uncached = inp.num_prompt_tokens - decode_hit
    rate = max(inp.prefill_tokens_per_s, 1e-9)
    local_s = (inp.num_decode_queued_tokens + uncached) / rate
    if config.mode == "never":
        return Placement(False, REASON_DISABLED, None, uncached, local_s)
    if not inp.candidates:
        return Placement(False, REASON_NO_PREFILL_WORKER, None, uncached, local_s)
    if movable <= 0:
        return Placement(False, REASON_NOTHING_UNCACHED, None, uncached, local_s)
    num_bytes = movable // inp.block_size * inp.kv_bytes_per_block
    transfer_s = num_bytes / max(inp.transfer_bytes_per_s, 1e-9)
    best: tuple[float, str] | None = None
    for c in inp.candidates:
        remote_hit = max(0, min(c.num_cached_tokens, usable) - decode_hit)
        compute_s = (c.num_queued_tokens + movable - remote_hit) / rate
        estimate = compute_s + transfer_s
        if best is None or estimate < best[0]:
            best = (estimate, c.worker_id)
    assert best is not None
    remote_s, worker_id = best
    if config.mode == "always":
        return Placement(True, REASON_FORCED, worker_id, uncached, local_s, remote_s)
    if uncached < config.min_remote_tokens:
        return Placement(False, REASON_BELOW_THRESHOLD, None, uncached, local_s, remote_s)
    if remote_s < local_s:
        return Placement(True, REASON_REMOTE_FASTER, worker_id, uncached, local_s, remote_s)
    return Placement(False, REASON_LOCAL_FASTER, None, uncached, local_s, remote_s)
