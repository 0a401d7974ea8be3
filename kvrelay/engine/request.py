"""Per-request state inside the engine: tokens, progress, block hashes, status, timings.

Owns: `Request` and `RequestStatus`. No torch; imports only L0/L1 modules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvrelay.kv.hashing import ROOT_PARENT_HASH, hash_blocks
from kvrelay.protocol import RequestMetrics, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    """A request's tokens and progress. `num_computed_tokens` tokens are in the KV cache;
    the scheduler computes the rest (prompt chunks, then one decode token per step)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    block_size: int
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    extra_keys: bytes = b""
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens hit in the prefix cache; -1 until scheduled
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    _block_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def block_hashes(self) -> list[int]:
        """Hashes of every full block of prompt + output so far (extended lazily)."""
        start = len(self._block_hashes)
        if (start + 1) * self.block_size <= self.num_tokens:
            parent = self._block_hashes[-1] if start else ROOT_PARENT_HASH
            self._block_hashes.extend(
                hash_blocks(self.all_token_ids, self.block_size, self.extra_keys, parent, start)
            )
        return self._block_hashes

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last output token causes, or None to keep going."""
        last = self.output_token_ids[-1]
        if not self.sampling.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in self.sampling.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.sampling.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def metrics(self) -> RequestMetrics:
        """Timings so far: queue (arrival→scheduled), prefill (→first token), decode (→finish)."""
        m = RequestMetrics(arrival_time=self.arrival_time, num_preemptions=self.num_preemptions)
        if self.first_scheduled_time is not None:
            m.queue_s = self.first_scheduled_time - self.arrival_time
            if self.first_token_time is not None:
                m.prefill_s = self.first_token_time - self.first_scheduled_time
                if self.finished_time is not None:
                    m.decode_s = self.finished_time - self.first_token_time
        return m
