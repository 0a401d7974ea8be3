"""Router state: the prefix index plus the active load of every worker.

Owns: the registered workers (in a stable order), the prefix index (exact from KV events, or
approximate from routing decisions when engines publish none), each in-flight request's
load and the per-worker sums, and the round-robin turn. `route` ties them to the pure
policy. Deterministic: randomness and time are injected. Imports `kv` (L1), `errors` (L0)
and `router.policy`; never the engine, the runtime or anything that does I/O.

Load model, in blocks (see docs/router.md): a routed request queues `prompt blocks -
predicted cached blocks` of prefill on its worker until its first token; from then until it
finishes it keeps `prompt blocks` of KV active for decode.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from kvrelay.errors import ServiceUnavailableError
from kvrelay.kv.approx_index import ApproxPrefixIndex, Clock
from kvrelay.kv.events import KVEventBatch
from kvrelay.kv.prefix_index import ApplyResult, ApplyStatus, PrefixIndex, WorkerId
from kvrelay.router.policy import (
    PolicyConfig,
    RouterPolicy,
    RoutingDecision,
    WorkerSnapshot,
    select_worker,
)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's load as the router tracks it (a snapshot)."""

    num_queued_prefill_blocks: int = 0
    num_active_decode_blocks: int = 0
    num_requests: int = 0


@dataclass(slots=True)
class _InFlight:
    worker_id: WorkerId
    num_prefill_blocks: int
    num_decode_blocks: int
    decoding: bool = False


class RouterState:
    """Index + load + policy. Not thread-safe: one owner (the router service) drives it."""

    def __init__(
        self,
        block_size: int,
        config: PolicyConfig | None = None,
        *,
        rng: random.Random,
        clock: Clock,
    ) -> None:
        self.block_size = block_size
        self.config = config or PolicyConfig()
        self._rng = rng
        self.index: PrefixIndex | ApproxPrefixIndex
        if self.config.approximate:
            self.index = ApproxPrefixIndex(
                clock, self.config.approx_ttl_s, self.config.approx_max_entries
            )
        else:
            self.index = PrefixIndex(block_size)
        self._order: list[WorkerId] = []  # registered workers, sorted: the candidate order
        self._loads: dict[WorkerId, WorkerLoad] = {}
        self._inflight: dict[str, _InFlight] = {}
        self._turn = 0

    # -- workers ----------------------------------------------------------------------------
    @property
    def workers(self) -> list[WorkerId]:
        return list(self._order)

    def add_worker(self, worker_id: WorkerId) -> None:
        """Register a routing candidate (exact mode: its first batch must be self-contained
        or the index asks for a dump)."""
        if worker_id in self._loads:
            return
        bisect.insort(self._order, worker_id)
        self._loads[worker_id] = WorkerLoad()
        self.index.add_worker(worker_id)

    def remove_worker(self, worker_id: WorkerId) -> list[str]:
        """Drop a worker, its blocks and its in-flight requests; returns their ids so the
        caller can fail or retry them."""
        if worker_id not in self._loads:
            return []
        self._order.remove(worker_id)
        del self._loads[worker_id]
        self.index.remove_worker(worker_id)
        dropped = [rid for rid, f in self._inflight.items() if f.worker_id == worker_id]
        for rid in dropped:
            del self._inflight[rid]
        return dropped

    def load(self, worker_id: WorkerId) -> WorkerLoad:
        return self._loads.get(worker_id, WorkerLoad())

    # -- KV events --------------------------------------------------------------------------
    def apply_events(self, worker_id: WorkerId, batch: KVEventBatch) -> ApplyResult:
        """Feed one event batch; unregistered workers and approximate mode ignore it."""
        if worker_id not in self._loads:
            return ApplyResult(ApplyStatus.IGNORED, reason=f"unregistered worker {worker_id}")
        if isinstance(self.index, ApproxPrefixIndex):
            return ApplyResult(ApplyStatus.IGNORED, reason="approximate mode")
        return self.index.apply(worker_id, batch)

    def overlap(self, block_hashes: Sequence[int]) -> dict[WorkerId, int]:
        return self.index.overlap(block_hashes)

    # -- routing ----------------------------------------------------------------------------
    def route(
        self,
        request_id: str,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        *,
        policy: RouterPolicy | None = None,
        allowed: Collection[WorkerId] | None = None,
    ) -> RoutingDecision:
        """Choose a worker for a request and count its load there. `block_hashes` are the
        prompt's full-block hashes (`kv.hashing.hash_blocks`); `allowed` restricts the
        candidates (e.g. a role or a model). Raises ServiceUnavailableError if none."""
        self.on_finished(request_id)  # a reused id replaces the old entry
        candidates = self._candidates(block_hashes, allowed)
        decision = select_worker(
            candidates,
            num_prompt_tokens,
            self.block_size,
            self.config,
            self._rng,
            self._turn,
            policy,
        )
        self._turn += 1
        num_prefill = decision.num_prompt_blocks - decision.num_predicted_blocks
        self._inflight[request_id] = _InFlight(
            decision.worker_id, num_prefill, decision.num_prompt_blocks
        )
        self._add_load(decision.worker_id, num_prefill, 0, 1)
        if isinstance(self.index, ApproxPrefixIndex):
            self.index.insert(decision.worker_id, block_hashes)
        return decision

    def _candidates(
        self, block_hashes: Sequence[int], allowed: Collection[WorkerId] | None
    ) -> list[WorkerSnapshot]:
        overlaps = self.index.overlap(block_hashes)
        loads = self._loads
        candidates = [
            WorkerSnapshot(
                w,
                overlaps.get(w, 0),
                loads[w].num_queued_prefill_blocks,
                loads[w].num_active_decode_blocks,
            )
            for w in self._order
            if allowed is None or w in allowed
        ]
        if not candidates:
            raise ServiceUnavailableError("no worker registered with the router can serve this")
        return candidates

    def on_first_token(self, request_id: str) -> None:
        """Prefill done: the request's queued prefill becomes active decode KV."""
        f = self._inflight.get(request_id)
        if f is None or f.decoding:
            return
        f.decoding = True
        self._add_load(f.worker_id, -f.num_prefill_blocks, f.num_decode_blocks, 0)

    def on_finished(self, request_id: str) -> None:
        """Finished, aborted or failed: release whatever load the request still holds."""
        f = self._inflight.pop(request_id, None)
        if f is None:
            return
        if f.decoding:
            self._add_load(f.worker_id, 0, -f.num_decode_blocks, -1)
        else:
            self._add_load(f.worker_id, -f.num_prefill_blocks, 0, -1)

    def _add_load(self, worker_id: WorkerId, prefill: int, decode: int, requests: int) -> None:
        old = self._loads.get(worker_id)
        if old is None:  # worker removed while the request was in flight
            return
        self._loads[worker_id] = WorkerLoad(
            old.num_queued_prefill_blocks + prefill,
            old.num_active_decode_blocks + decode,
            old.num_requests + requests,
        )

    # -- invariants -------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Per-worker loads equal the sums over in-flight requests; workers are sorted and
        known to the index; the index itself is consistent."""
        assert self._order == sorted(self._loads), "candidate order out of sync"
        assert set(self.index.workers) == set(self._loads), "index and router disagree on workers"
        expected = {w: [0, 0, 0] for w in self._loads}
        for rid, f in self._inflight.items():
            assert f.worker_id in expected, f"{rid} in flight on unknown worker {f.worker_id}"
            sums = expected[f.worker_id]
            if f.decoding:
                sums[1] += f.num_decode_blocks
            else:
                sums[0] += f.num_prefill_blocks
            sums[2] += 1
        for w, (prefill, decode, n) in expected.items():
            assert self._loads[w] == WorkerLoad(prefill, decode, n), f"load of {w} drifted"
        self.index.check_integrity()
