"""The frontend's view of the workers: discovery, load, model cards, and generate calls.

Owns: `WorkerPool` — the live workers (via `DiscoveryWatcher`), their latest load reports,
the frontend's own in-flight count per worker (the saturation check), each model's card and
tokenizer (fetched from a worker, so a frontend needs no model files), and `generate`, which
has the KV-aware router (`router.service.RouterService`) pick a worker among those with room,
streams its chunks, tells the router about the first token and the realized cache hits (the
ledger row lands on the request's `RouteTicket`), and retries on another worker when the
first one fails before producing anything. Prefill-role workers are never routed to; on a
decode worker the router's placement rule may name one for a remote prefill
(docs/disaggregation.md), and the ledger's realized hits then exclude the imported blocks.
Imports runtime, router, protocol, the tokenizer
and frontend helpers; must not import the engine core or the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kvrelay.engine.models.tokenizer import Tokenizer
from kvrelay.errors import PeerUnavailableError, RemoteError, ServiceUnavailableError
from kvrelay.frontend.errors import ApiError
from kvrelay.protocol import (
    ROLE_DECODE,
    ROLE_PREFILL,
    GenerateChunk,
    GenerateRequest,
    LoadReport,
    ModelCard,
    RemotePrefill,
    WorkerInfo,
)
from kvrelay.router.service import RouterConfig, RouterService, RouteTicket
from kvrelay.runtime.base import (
    DEFAULT_IDLE_TIMEOUT_S,
    ENDPOINT_GENERATE,
    ENDPOINT_MODEL_CARD,
    ENDPOINT_STATS,
    LOAD_PREFIX,
    Runtime,
    Subscription,
    call_once,
)
from kvrelay.runtime.discovery import DEFAULT_TTL_S, DiscoveryWatcher

logger = logging.getLogger(__name__)

Chooser = Callable[[Sequence[WorkerInfo], Mapping[str, int], Sequence[int]], WorkerInfo | None]
"""A test hook: force a worker (the router still records the decision), or None."""
_chunk_decoder = msgspec.msgpack.Decoder(GenerateChunk)
_load_decoder = msgspec.msgpack.Decoder(LoadReport)


class WorkerFailedError(ServiceUnavailableError):
    """The serving worker died or stopped answering mid-request."""

    code = "worker_failed"

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"worker {worker_id} failed mid-request: {reason}")
        self.worker_id = worker_id


@dataclass
class DisaggCounters:
    """The pool's disaggregation bookkeeping: placement decisions (exported at /metrics)
    and the prompt tokens sent to each prefill worker whose first token is not back yet."""

    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, reason)
    pending: dict[str, int] = field(default_factory=dict)  # prefill worker -> tokens


@dataclass(frozen=True)
class ModelState:
    card: ModelCard
    tokenizer: Tokenizer | None


class WorkerPool:
    def __init__(
        self,
        runtime: Runtime,
        *,
        max_inflight_per_worker: int = 64,
        ttl_s: float = DEFAULT_TTL_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_retries: int = 2,
        router: RouterConfig | None = None,
        chooser: Chooser | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_inflight_per_worker = max_inflight_per_worker
        self.idle_timeout_s = idle_timeout_s
        self.max_retries = max_retries
        self.chooser = chooser
        self.watcher = DiscoveryWatcher(runtime, ttl_s)
        self.watcher.add_listener(self._on_worker_change)
        self.router = RouterService(runtime, self.watcher, router)
        self.inflight: dict[str, int] = {}
        self._loads: dict[str, LoadReport] = {}
        self._models: dict[str, ModelState] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._load_sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.disagg = DisaggCounters()

    async def start(self) -> None:
        self._load_sub = await self.runtime.subscribe(f"{LOAD_PREFIX}.*")
        self._tasks.append(asyncio.create_task(self._consume_loads(self._load_sub)))
        await self.router.start()
        await self.watcher.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.router.close()
        await self.watcher.close()

    # -- views -----------------------------------------------------------------------------
    def workers(self, model: str | None = None) -> list[WorkerInfo]:
        live = self.watcher.workers()
        return [w for w in live if model is None or w.model == model]

    def models(self) -> list[str]:
        return sorted({w.model for w in self.watcher.workers()})

    def loads(self) -> list[tuple[str, LoadReport]]:
        out = []
        for w in self.watcher.workers():
            report = self._loads.get(w.worker_id)
            if report is not None and report.instance_id == w.instance_id:
                out.append((w.model, report))
        return out

    def is_ready(self) -> bool:
        return any(m in self._models for m in self.models())

    def _on_worker_change(self, worker_id: str, info: WorkerInfo | None) -> None:
        if info is None:
            self._loads.pop(worker_id, None)
        elif info.model not in self._models:
            self._tasks.append(asyncio.create_task(self._prefetch(info.model)))

    async def _prefetch(self, model: str) -> None:
        with contextlib.suppress(ApiError, ServiceUnavailableError):
            await self.model_state(model)

    async def _consume_loads(self, sub: Subscription) -> None:
        with contextlib.suppress(PeerUnavailableError):
            async for msg in sub:
                with contextlib.suppress(msgspec.DecodeError):
                    report = _load_decoder.decode(msg.data)
                    self._loads[report.worker_id] = report

    # -- models ----------------------------------------------------------------------------
    async def model_state(self, model: str) -> ModelState:
        """The model's card and tokenizer; 404 when no live worker serves `model`."""
        state = self._models.get(model)
        if state is not None:
            return state
        lock = self._model_locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model in self._models:
                return self._models[model]
            for worker in self.workers(model):
                try:
                    state = await self._fetch_card(worker)
                except (PeerUnavailableError, RemoteError, msgspec.DecodeError) as exc:
                    logger.warning("model card from %s failed: %s", worker.worker_id, exc)
                    continue
                self._models[model] = state
                return state
        if self.workers(model):
            raise ServiceUnavailableError(f"no worker of {model!r} answered for its model card")
        raise ApiError(
            404,
            f"the model {model!r} does not exist; try one of {self.models()}",
            code="model_not_found",
            param="model",
        )

    async def _fetch_card(self, worker: WorkerInfo) -> ModelState:
        pieces = []
        stream = self.runtime.call(worker.address, ENDPOINT_MODEL_CARD, b"")
        try:
            async for piece in stream:
                pieces.append(piece)
        finally:
            await stream.aclose()
        card = msgspec.msgpack.decode(b"".join(pieces), type=ModelCard)
        return ModelState(card, tokenizer_from_files(card.tokenizer_files))

    # -- requests --------------------------------------------------------------------------
    def _room(self, model: str, excluded: Collection[str]) -> list[WorkerInfo]:
        """Live workers of `model` with room; ServiceUnavailableError saying why if none."""
        live = [
            w for w in self.workers(model) if w.worker_id not in excluded and w.role != ROLE_PREFILL
        ]
        if not live:
            raise ServiceUnavailableError(f"no live worker serves {model!r}")
        room = [w for w in live if self.inflight.get(w.worker_id, 0) < self.max_inflight_per_worker]
        if not room:
            raise ServiceUnavailableError(
                f"all {len(live)} workers of {model!r} are saturated "
                f"({self.max_inflight_per_worker} requests each); retry shortly"
            )
        return room

    def pick(self, ticket: RouteTicket, excluded: Collection[str] = ()) -> WorkerInfo:
        """The router's choice for `ticket` among live workers with room."""
        room = self._room(ticket.model, excluded)
        if self.chooser is not None:
            forced = self.chooser(room, self.inflight, ticket.prompt_token_ids)
            room = room if forced is None else [forced]
        by_id = {w.worker_id: w for w in room}
        return by_id[self.router.route(ticket, by_id)]

    def check_capacity(self, model: str, num_requests: int = 1) -> None:
        live = self.workers(model)
        free = sum(
            max(0, self.max_inflight_per_worker - self.inflight.get(w.worker_id, 0)) for w in live
        )
        if free < num_requests:
            self._room(model, ())  # raises with the precise reason
            raise ServiceUnavailableError(f"not enough room for {num_requests} requests; retry")

    def ticket(self, request: GenerateRequest) -> RouteTicket:
        return self.router.ticket(
            request.request_id,
            request.model,
            request.prompt_token_ids,
            cache_salt=request.cache_salt,
        )

    async def generate(
        self, request: GenerateRequest, ticket: RouteTicket | None = None
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Stream one request's chunks from the worker the router picks; a failure before
        the first token moves it to another worker, after that it raises WorkerFailedError.
        The ticket's ledger row is set before the finishing chunk is yielded (or when the
        caller leaves after the prefill, e.g. on a stop string)."""
        ticket = ticket if ticket is not None else self.ticket(request)
        excluded: set[str] = set()
        payload = msgspec.msgpack.encode(request)
        last: GenerateChunk | None = None
        try:
            while True:
                worker = self.pick(ticket, excluded)
                self.inflight[worker.worker_id] = self.inflight.get(worker.worker_id, 0) + 1
                started = False
                stream = self._stream(worker, self._placed(request, ticket, worker, payload))
                try:
                    async for chunk in stream:
                        error = chunk.error
                        if error is not None and error.kind == "draining" and not started:
                            raise PeerUnavailableError("worker is draining")
                        started = True
                        last = self._observe(ticket, chunk)
                        yield chunk
                        if chunk.finished:
                            return
                    raise PeerUnavailableError("stream ended before the request finished")
                except (PeerUnavailableError, RemoteError) as exc:
                    self.watcher.forget(worker.worker_id, worker.instance_id)
                    if started or len(excluded) >= self.max_retries:
                        raise WorkerFailedError(worker.worker_id, str(exc)) from exc
                    logger.warning(
                        "worker %s unavailable (%s); retrying elsewhere", worker.worker_id, exc
                    )
                    excluded.add(worker.worker_id)
                finally:
                    self.inflight[worker.worker_id] -= 1
                    await stream.aclose()  # now, not at garbage collection: cancels the call
        finally:
            self._close_ticket(ticket, last)

    def _placed(
        self, request: GenerateRequest, ticket: RouteTicket, worker: WorkerInfo, payload: bytes
    ) -> bytes:
        """Decode worker: apply the placement rule; a remote prefill names its worker."""
        ticket.placement = None
        if worker.role != ROLE_DECODE:
            return payload
        prefill = [w for w in self.workers(request.model) if w.role == ROLE_PREFILL]
        placement = self.router.place(
            ticket, prefill, self._queued_prefill_tokens, worker.kv_bytes_per_block
        )
        key = (request.model, placement.reason)
        self.disagg.decisions[key] = self.disagg.decisions.get(key, 0) + 1
        if not placement.remote or placement.prefill_worker_id is None:
            return payload
        chosen = next(w for w in prefill if w.worker_id == placement.prefill_worker_id)
        self.disagg.pending[chosen.worker_id] = (
            self.disagg.pending.get(chosen.worker_id, 0) + placement.num_uncached_tokens
        )
        remote = RemotePrefill(
            worker_id=chosen.worker_id,
            address=chosen.address,
            timeout_s=self.router.config.placement.timeout_s,
        )
        return msgspec.msgpack.encode(msgspec.structs.replace(request, remote_prefill=remote))

    def _prefill_done(self, ticket: RouteTicket) -> None:
        """The remote prefill's tokens leave the prefill worker's pending count."""
        placement = ticket.placement
        if placement is None or placement.prefill_worker_id is None:
            return
        wid = placement.prefill_worker_id
        self.disagg.pending[wid] = max(
            0, self.disagg.pending.get(wid, 0) - placement.num_uncached_tokens
        )

    def _queued_prefill_tokens(self, worker_id: str) -> int:
        """A prefill worker's queue: what it reports, or what we sent it since, if more."""
        report = self._loads.get(worker_id)
        reported = report.num_queued_prefill_tokens if report is not None else 0
        return max(reported, self.disagg.pending.get(worker_id, 0))

    def _observe(self, ticket: RouteTicket, chunk: GenerateChunk) -> GenerateChunk | None:
        """Tell the router about the first token and, on success, the realized hits.

        Remote prefill: the decode engine counts imported blocks as cached tokens, but they
        were not its cache hits. The ledger's *realized* is the decode worker's own hits plus
        what the prefill worker served from its cache (tokens it did not compute)."""
        if chunk.error is not None:
            return None
        if chunk.num_output_tokens and not ticket.first_token:
            self._prefill_done(ticket)
        if chunk.num_output_tokens:
            self.router.on_first_token(ticket)
        if chunk.finished:
            prefill_s = chunk.metrics.prefill_s if chunk.metrics is not None else None
            realized = chunk.num_cached_tokens
            d = chunk.disagg
            if d is not None:
                realized = max(0, realized - d.num_imported_tokens) + d.num_remote_cached_tokens
                self.router.observe_transfer(d.num_bytes, d.transfer_s)
            else:
                computed = chunk.num_prompt_tokens - chunk.num_cached_tokens
                self.router.observe_prefill(computed, prefill_s)
            self.router.finish(ticket, realized, prefill_s)
        return chunk

    def _close_ticket(self, ticket: RouteTicket, last: GenerateChunk | None) -> None:
        """Left early: a prefill that finished still counts in the ledger (the engine's hits
        are known from its first token); anything else only releases the router's load."""
        if ticket.row is None and last is not None and last.num_output_tokens:
            self.router.finish(ticket, last.num_cached_tokens)
        self.router.release(ticket)

    async def _stream(
        self, worker: WorkerInfo, payload: bytes
    ) -> AsyncGenerator[GenerateChunk, None]:
        stream = self.runtime.call(
            worker.address, ENDPOINT_GENERATE, payload, idle_timeout_s=self.idle_timeout_s
        )
        try:
            async for raw in stream:
                yield _chunk_decoder.decode(raw)
        finally:
            await stream.aclose()

    async def worker_stats(self, worker_id: str) -> LoadReport:
        worker = self.watcher.get(worker_id)
        if worker is None:
            raise ApiError(404, f"no live worker {worker_id!r}", code="worker_not_found")
        raw = await call_once(self.runtime, worker.address, ENDPOINT_STATS, b"")
        return _load_decoder.decode(raw)


def tokenizer_from_files(files: Mapping[str, bytes]) -> Tokenizer | None:
    """Rebuild a tokenizer from a model card's Hugging Face files."""
    if "tokenizer.json" not in files:
        return None
    with tempfile.TemporaryDirectory(prefix="kvrelay-card-") as tmp:
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                continue  # names come from a peer: never write outside the temp dir
            (Path(tmp) / name).write_bytes(data)
        return Tokenizer.from_hf_dir(Path(tmp))
