"""What the scheduler hands the runner each step: plain dataclasses, no torch.

Both sides import this module; the scheduler never imports the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrelay.protocol import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens of one request to compute this step.

    token_ids occupy positions start_pos .. start_pos + len(token_ids) - 1; positions
    below start_pos are already in the KV cache. block_ids is the request's block table
    and covers every position up to the end of this chunk. When `sample` is set the
    chunk ends at the request's last known token and the runner samples the next one.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling: SamplingParams


@dataclass(frozen=True)
class StepBatch:
    """One engine step. finished_request_ids lets the runner drop per-request state (RNGs)."""

    chunks: list[ScheduledChunk]
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
