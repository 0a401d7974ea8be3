"""Turning worker token streams into OpenAI choices: detokenization, stop strings, usage.

Owns: `ChoiceSpec` (one choice to generate), `ChoiceState` (what it produced: text, finish
reason, token counts, worker, engine timings, inter-token gaps, its hit-rate ledger row),
`StopChecker`, `run_choice` (one choice as a
stream of `Delta`s) and `merge` (several choices as one stream, cancelling them all when the
consumer leaves). Imports protocol, the tokenizer and `frontend.workers`; no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from kvrelay.engine.models.tokenizer import IncrementalDecoder, Tokenizer
from kvrelay.frontend.errors import from_wire
from kvrelay.frontend.workers import WorkerPool
from kvrelay.observe.ledger import LedgerRow
from kvrelay.protocol import (
    DisaggInfo,
    GenerateChunk,
    GenerateRequest,
    RequestMetrics,
    SamplingParams,
)
from kvrelay.router.service import RouteTicket


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    prompt_index: int
    prompt_token_ids: list[int]
    sampling: SamplingParams


@dataclass
class ChoiceState:
    """Everything one choice produced so far; final once `finish_reason` is set."""

    index: int
    prompt_index: int
    num_prompt_tokens: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    worker_id: str = ""
    metrics: RequestMetrics | None = None
    first_token_s: float | None = None  # frontend-measured, from the request's arrival
    last_token_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # per output token after the first
    ledger: LedgerRow | None = None
    disagg: DisaggInfo | None = None  # a remote prefill's transfer, from the decode worker


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    finish_reason: str | None = None


class StopChecker:
    """Finds the first stop string in streamed text; holds back a tail that could still
    become one, so no stop string (or its start) ever reaches the client."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:size]):
                    keep = size
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


async def run_choice(
    pool: WorkerPool,
    request: GenerateRequest,
    tokenizer: Tokenizer | None,
    stops: Sequence[str],
    state: ChoiceState,
    arrival: float,
    ticket: RouteTicket | None = None,
) -> AsyncGenerator[Delta, None]:
    """Generate one choice; ends after the Delta carrying its finish reason. Leaving early
    (or a stop string) closes the worker stream, which aborts the request there. The
    choice's ledger row is on `state.ledger` once the stream is closed."""
    decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
    checker = StopChecker(stops)
    ticket = ticket if ticket is not None else pool.ticket(request)
    stream = pool.generate(request, ticket)
    try:
        async for chunk in stream:
            if chunk.error is not None:
                raise from_wire(chunk.error, chunk.worker_id)
            _record(state, chunk, arrival)
            text = decoder.extend(chunk.new_token_ids) if decoder is not None else ""
            if chunk.finished and decoder is not None:
                text += decoder.flush()
            text, stopped = checker.feed(text)
            if stopped or chunk.finished:
                finish = "stop" if stopped else _finish_reason(chunk.finish_reason)
                text += "" if stopped else checker.flush()
                state.text.append(text)
                state.finish_reason = finish
                await stream.aclose()  # closes the ticket before the consumer sees the end
                state.ledger = ticket.row
                yield Delta(state.index, text, finish)
                return
            if text:
                state.text.append(text)
                yield Delta(state.index, text)
    finally:
        await stream.aclose()
        state.ledger = ticket.row


def _record(state: ChoiceState, chunk: GenerateChunk, arrival: float) -> None:
    now = time.monotonic() - arrival
    num_new = len(chunk.new_token_ids)
    if num_new and state.last_token_s is not None:
        state.itl_s.extend([(now - state.last_token_s) / num_new] * num_new)
    elif num_new > 1:  # the first chunk carried several tokens: they arrived together
        state.itl_s.extend([0.0] * (num_new - 1))
    if num_new:
        state.last_token_s = now
    if state.first_token_s is None and chunk.num_output_tokens:
        state.first_token_s = now
    state.num_output_tokens = chunk.num_output_tokens
    state.num_cached_tokens = chunk.num_cached_tokens
    state.worker_id = chunk.worker_id
    if chunk.metrics is not None:
        state.metrics = chunk.metrics
    if chunk.disagg is not None:
        state.disagg = chunk.disagg


def _finish_reason(engine_reason: str | None) -> str:
    return "length" if engine_reason == "length" else "stop"


async def merge(streams: Sequence[AsyncGenerator[Delta, None]]) -> AsyncGenerator[Delta, None]:
    """Interleave several choice streams; the first error cancels the rest and is raised."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield delta
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Delta, None]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait(delta)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
