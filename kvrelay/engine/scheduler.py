"""Scheduler: continuous batching with chunked prefill, admission by free KV blocks,
preemption by recompute, FCFS order.

Each step every request is brought closer to computing all of its known tokens: running
requests first (in admission order: a long prompt continues its prefill chunk by chunk while
the others decode), then waiting requests while the token budget, the sequence limit and
free blocks allow. When a running request cannot get a block, the most recently admitted
running request is preempted (blocks freed, recomputed later from its tokens, resumed
first). No torch, no I/O; time comes from the injected clock.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrelay.config import SchedulerConfig
from kvrelay.engine.batch import ScheduledChunk, StepBatch
from kvrelay.engine.kv_manager import KVCacheManager
from kvrelay.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    """A step's plan: the batch for the runner plus how many tokens each request computes."""

    batch: StepBatch
    requests: list[Request]
    num_scheduled: dict[str, int]
    preempted: list[Request] = field(default_factory=list)


@dataclass
class _Budget:
    tokens: int
    seqs: int


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    # -- intake ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request as aborted and free its blocks; None if it is unknown or done."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        out = SchedulerOutput(StepBatch([], self._finished_ids), [], {})
        self._finished_ids = []
        self._schedule_running(budget, out)
        if not out.preempted:
            self._schedule_waiting(budget, out)
        return out

    def _schedule_running(self, budget: _Budget, out: SchedulerOutput) -> None:
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget.tokens)
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    return
            self._add_chunk(request, num_new, out)
            budget.tokens -= num_new
            i += 1

    def _schedule_waiting(self, budget: _Budget, out: SchedulerOutput) -> None:
        while self.waiting and budget.tokens > 0 and len(self.running) < budget.seqs:
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if num_new > budget.tokens and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget.tokens)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self._admit(request, num_hit_tokens)
            self._add_chunk(request, num_new, out)
            budget.tokens -= num_new

    def _admit(self, request: Request, num_hit_tokens: int) -> None:
        self.kv.record_admission(request, num_hit_tokens)
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = min(num_hit_tokens, request.num_prompt_tokens)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self.clock()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _add_chunk(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        out.batch.chunks.append(
            ScheduledChunk(
                request_id=request.request_id,
                token_ids=request.all_token_ids[start:end],
                start_pos=start,
                block_ids=self.kv.get_block_ids(request.request_id),
                sample=end == request.num_tokens,
                sampling=request.sampling,
            )
        )
        out.requests.append(request)
        out.num_scheduled[request.request_id] = num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        logger.debug("preempting %s at %d tokens", request.request_id, request.num_tokens)
        self.kv.free(request)
        self.kv.stats.num_preempted += 1
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        out.preempted.append(request)

    # -- results ---------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance each scheduled request by its computed tokens and sampled token; returns
        the requests that changed (those that got a token or finished)."""
        now = self.clock()
        changed: list[Request] = []
        for request in out.requests:
            request.num_computed_tokens += out.num_scheduled[request.request_id]
            self.kv.cache_blocks(request)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_output_token(token)
            if request.first_token_time is None:
                request.first_token_time = now
            status = request.check_stop(self.max_model_len)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status, now)
            changed.append(request)
        return changed

    def _finish(self, request: Request, status: RequestStatus, now: float | None = None) -> None:
        request.status = status
        request.finished_time = self.clock() if now is None else now
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
