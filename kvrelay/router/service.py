"""Router service: keeps a `RouterState` per model fed by every worker's KV events, routes
requests with it, and closes each request's hit-rate ledger row.

Owns: `RouterService` — membership from discovery, the KV-event subscription, dump requests
on a gap or a new worker, routing, the ledger per model, and the views `/kvrelay/workers`,
`/metrics` and `kvrelay doctor` read. Its data types (`RouterConfig`, `RouteTicket`,
`WorkerEventStats`) are in `router/ticket.py`. Async, one owner: everything runs
on the event loop of the frontend that holds it. Layer L3: imports kv, observe, runtime,
protocol, errors and router modules; never the engine, the frontend or the worker.

Membership. A worker joins the model's state when discovery reports it, if its block size
matches the model's router block size (`RouterConfig.block_size`, else the first worker's);
a mismatched worker is logged as an error and never routed to, since none of its blocks
could ever match a prompt hashed here. A new instance (restart) resets the worker. Workers
that publish events get a dump request on joining, and again whenever the index reports a
gap (`ApplyStatus.NEEDS_DUMP`, or still awaiting one after `DUMP_RETRY_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from kvrelay.errors import PeerUnavailableError, RemoteError, ServiceUnavailableError
from kvrelay.kv.events import KVEventBatch, decode_batch
from kvrelay.kv.hashing import extra_keys_bytes, hash_blocks
from kvrelay.kv.prefix_index import ApplyResult, ApplyStatus, PrefixIndex
from kvrelay.observe.ledger import HitLedger, LedgerRow, MetricSample
from kvrelay.observe.ledger_inputs import WorkloadLabels
from kvrelay.protocol import WorkerInfo
from kvrelay.router.placement import Placement, PlacementInput, PrefillCandidate, place
from kvrelay.router.policy import RouterPolicy
from kvrelay.router.state import RouterState
from kvrelay.router.ticket import RouterConfig, RouteTicket, WorkerEventStats
from kvrelay.runtime.base import ENDPOINT_KV_DUMP, KV_EVENTS_PREFIX, Runtime, Subscription
from kvrelay.runtime.discovery import DiscoveryWatcher

logger = logging.getLogger(__name__)

DUMP_TIMEOUT_S = 10.0  # silence on a dump call before giving up on it
DUMP_RETRY_S = 1.0  # least time between two dump requests to one worker
MAX_DUMP_ATTEMPTS = 3  # per request for a dump, with DUMP_RETRY_S between attempts


@dataclass
class _ModelRouter:
    block_size: int
    state: RouterState
    ledger: HitLedger


class RouterService:
    """KV-aware routing plus the hit-rate ledger, for every model a frontend serves."""

    def __init__(
        self,
        runtime: Runtime,
        watcher: DiscoveryWatcher,
        config: RouterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.watcher = watcher
        self.config = config or RouterConfig()
        self.clock = clock
        self.workloads = WorkloadLabels(self.config.max_workloads)
        self._rng = random.Random(self.config.seed)
        self._models: dict[str, _ModelRouter] = {}
        self._workers: dict[str, WorkerInfo] = {}  # routable or not, as discovery said
        self._stats: dict[str, WorkerEventStats] = {}
        self._dumps: dict[str, asyncio.Task[None]] = {}
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # measured rates for the placement rule (EWMA; the config's priors until measured)
        self.prefill_tokens_per_s = self.config.placement.prefill_tokens_per_s
        self.transfer_bytes_per_s = self.config.placement.transfer_bytes_per_s
        watcher.add_listener(self.on_worker_change)

    @property
    def policy(self) -> RouterPolicy:
        return self.config.policy.policy

    async def start(self) -> None:
        """Subscribe to every worker's KV events and adopt the workers already known."""
        self._sub = await self.runtime.subscribe(f"{KV_EVENTS_PREFIX}.*")
        self._tasks.append(asyncio.create_task(self._consume(self._sub)))
        for info in self.watcher.workers():
            self.on_worker_change(info.worker_id, info)

    async def close(self) -> None:
        for task in [*self._tasks, *self._dumps.values()]:
            task.cancel()
        self._tasks, self._dumps = [], {}

    # -- membership ------------------------------------------------------------------------
    def on_worker_change(self, worker_id: str, info: WorkerInfo | None) -> None:
        """Discovery listener: a worker joined, restarted (new instance) or left."""
        old = self._workers.get(worker_id)
        if info is not None and old is not None and old.instance_id == info.instance_id:
            return
        if old is not None:
            self._drop(worker_id, old)
        if info is not None:
            self._join(info)

    def _join(self, info: WorkerInfo) -> None:
        wid = info.worker_id
        self._workers[wid] = info
        model = self._model(info.model, info.block_size)
        routable = info.block_size == model.block_size
        self._stats[wid] = WorkerEventStats(info.model, info.block_size, info.kv_events, routable)
        if not routable:
            logger.error(
                "worker %s of %r has block size %d but the router hashes prompts in blocks of "
                "%d: its KV events can never match, so it gets no requests; start the workers "
                "and the router with the same --block-size",
                wid,
                info.model,
                info.block_size,
                model.block_size,
            )
            return
        model.state.add_worker(wid)
        if not info.kv_events:
            logger.warning("worker %s publishes no KV events: the router cannot see its cache", wid)
            return
        self.request_dump(wid)

    def _drop(self, worker_id: str, old: WorkerInfo) -> None:
        self._workers.pop(worker_id, None)
        self._stats.pop(worker_id, None)
        task = self._dumps.pop(worker_id, None)
        if task is not None:
            task.cancel()
        model = self._models.get(old.model)
        if model is not None:
            model.state.remove_worker(worker_id)
            model.ledger.prefill_cost.forget(worker_id)

    def _model(self, name: str, worker_block_size: int) -> _ModelRouter:
        model = self._models.get(name)
        if model is None:
            bs = self.config.block_size or worker_block_size
            state = RouterState(bs, self.config.policy, rng=self._rng, clock=self.clock)
            ledger = HitLedger(bs, self.config.seen_capacity_blocks, self.config.max_workloads)
            ledger.workloads = self.workloads  # one bounded label set for every model
            model = self._models[name] = _ModelRouter(bs, state, ledger)
            logger.info("router for %r: policy %s, block size %d", name, self.policy, bs)
        return model

    def block_size(self, model: str) -> int | None:
        m = self._models.get(model)
        return None if m is None else m.block_size

    # -- KV events -------------------------------------------------------------------------
    async def _consume(self, sub: Subscription) -> None:
        with contextlib.suppress(PeerUnavailableError):
            async for msg in sub:
                worker_id = msg.subject.rsplit(".", 1)[-1]
                try:
                    batch = decode_batch(msg.data)
                except msgspec.DecodeError:
                    logger.warning("ignoring a malformed KV event batch from %s", worker_id)
                    continue
                try:
                    self.apply(worker_id, batch)
                except Exception:  # one bad batch must not stop the feed for every worker
                    logger.exception("applying a KV event batch from %s failed", worker_id)

    def apply(self, worker_id: str, batch: KVEventBatch) -> ApplyResult | None:
        """Feed one batch (live or a dump) from a worker; None when it is not routable."""
        stats = self._stats.get(worker_id)
        if stats is None or not stats.routable:
            return None
        model = self._models[stats.model]
        result = model.state.apply_events(worker_id, batch)
        model.ledger.observe_events(batch)
        stats.num_event_batches += 1
        stats.num_blocks_stored += result.num_stored
        stats.num_blocks_removed += result.num_removed
        if result.num_rejected:
            stats.num_blocks_rejected += result.num_rejected
            logger.error(
                "worker %s sent %d blocks of another block size than the router's %d",
                worker_id,
                result.num_rejected,
                model.block_size,
            )
        if result.needs_dump:
            stats.num_gaps += 1
            logger.info("KV events of %s: %s; asking for a dump", worker_id, result.reason)
            self.request_dump(worker_id)
        elif result.status is ApplyStatus.AWAITING_DUMP:
            self.request_dump(worker_id, only_if_due=True)
        return result

    def request_dump(self, worker_id: str, only_if_due: bool = False) -> None:
        """Ask the worker for every block it caches (one task at a time per worker)."""
        stats = self._stats.get(worker_id)
        if stats is None or not stats.kv_events or worker_id in self._dumps:
            return
        if self.config.policy.approximate:
            return  # the approximate index ignores events, dumps included
        if only_if_due and self.clock() - stats.last_dump_at < DUMP_RETRY_S:
            return
        task = asyncio.create_task(self._dump(worker_id))
        self._dumps[worker_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._dumps.get(worker_id) is t:
                del self._dumps[worker_id]

        task.add_done_callback(done)

    async def _dump(self, worker_id: str) -> None:
        info = self._workers.get(worker_id)
        for attempt in range(MAX_DUMP_ATTEMPTS):
            stats = self._stats.get(worker_id)
            if info is None or stats is None or self._workers.get(worker_id) != info:
                return  # left or restarted: the new instance gets its own dump
            stats.num_dumps_requested += 1
            stats.last_dump_at = self.clock()
            try:
                batch = await self._fetch_dump(info)
            except (PeerUnavailableError, RemoteError, msgspec.DecodeError) as exc:
                stats.num_dumps_failed += 1
                logger.warning("KV dump from %s failed (%s)", worker_id, exc)
                await asyncio.sleep(DUMP_RETRY_S * (attempt + 1))
                continue
            if self._workers.get(worker_id) != info:
                return  # a reply from an instance that is gone
            stats.num_dumps_applied += 1
            result = self.apply(worker_id, batch)
            if result is None or not result.needs_dump:
                return

    async def _fetch_dump(self, info: WorkerInfo) -> KVEventBatch:
        pieces = []
        stream = self.runtime.call(
            info.address, ENDPOINT_KV_DUMP, b"", idle_timeout_s=DUMP_TIMEOUT_S
        )
        try:
            async for piece in stream:
                pieces.append(piece)
        finally:
            await stream.aclose()
        return decode_batch(b"".join(pieces))

    # -- requests --------------------------------------------------------------------------
    def ticket(
        self,
        request_id: str,
        model: str,
        prompt_token_ids: Sequence[int],
        *,
        workload: str | None = None,
        policy: RouterPolicy | None = None,
        cache_salt: str | None = None,
    ) -> RouteTicket:
        """A request's ticket; the prompt is hashed on its first `route`."""
        label = self.workloads.label(workload)
        return RouteTicket(request_id, model, prompt_token_ids, label, policy, cache_salt)

    def route(self, ticket: RouteTicket, allowed: Collection[str]) -> str:
        """Choose one of `allowed` (live workers with room) for the ticket; returns its id.
        A retry releases the previous choice first. Raises ServiceUnavailableError."""
        model = self._models.get(ticket.model)
        if model is None:
            raise ServiceUnavailableError(f"no worker of {ticket.model!r} joined the router")
        self.release(ticket)
        if ticket.block_size != model.block_size:
            extra = extra_keys_bytes(ticket.cache_salt)
            ticket.block_hashes = hash_blocks(ticket.prompt_token_ids, model.block_size, extra)
            ticket.block_size = model.block_size
        candidates = [w for w in allowed if w in self._stats and self._stats[w].routable]
        if not candidates:
            raise ServiceUnavailableError(self._no_candidate_reason(ticket.model, allowed))
        num_tokens = len(ticket.prompt_token_ids)
        decision = model.state.route(
            ticket.request_id,
            ticket.block_hashes,
            num_tokens,
            policy=ticket.policy,
            allowed=candidates,
        )
        ticket.decision = decision
        ticket.prediction = model.ledger.predict(
            ticket.request_id,
            ticket.block_hashes,
            num_tokens,
            decision,
            model=ticket.model,
            workload=ticket.workload,
        )
        return decision.worker_id

    def _no_candidate_reason(self, model: str, allowed: Collection[str]) -> str:
        refused = [
            f"{w} (block size {s.block_size})"
            for w in allowed
            if (s := self._stats.get(w)) is not None and not s.routable
        ]
        if refused:
            bs = self._models[model].block_size
            return (
                f"every worker of {model!r} has a block size other than the router's {bs}: "
                f"{', '.join(refused)}; restart them with the same --block-size"
            )
        return f"no worker of {model!r} has joined the router yet; retry shortly"

    def place(
        self,
        ticket: RouteTicket,
        prefill_workers: Sequence[WorkerInfo],
        queued_tokens: Callable[[str], int],
        kv_bytes_per_block: int,
    ) -> Placement:
        """Local or remote prefill for a routed ticket (`router.placement.place`), with the
        index's overlaps for the decode worker and each prefill worker; kept on the ticket."""
        decision = ticket.decision
        assert decision is not None, "place() after route()"
        model = self._models[ticket.model]
        bs = model.block_size
        overlaps = model.state.overlap(ticket.block_hashes)
        candidates = [
            PrefillCandidate(
                w.worker_id, overlaps.get(w.worker_id, 0) * bs, queued_tokens(w.worker_id)
            )
            for w in prefill_workers
            if w.worker_id in self._stats and self._stats[w.worker_id].routable
        ]
        load = model.state.load(decision.worker_id)  # includes this request's own prefill
        own_blocks = decision.num_prompt_blocks - decision.num_predicted_blocks
        num_tokens = len(ticket.prompt_token_ids)
        inp = PlacementInput(
            num_prompt_tokens=num_tokens,
            block_size=bs,
            num_decode_cached_tokens=decision.num_predicted_blocks * bs,
            num_decode_queued_tokens=max(0, load.num_queued_prefill_blocks - own_blocks) * bs,
            kv_bytes_per_block=kv_bytes_per_block,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            transfer_bytes_per_s=self.transfer_bytes_per_s,
            candidates=candidates,
        )
        ticket.placement = place(inp, self.config.placement)
        return ticket.placement

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        """A finished remote prefill's transfer (bytes over its wall time): the bandwidth
        estimate placement uses (EWMA)."""
        if num_bytes > 0 and seconds > 0:
            rate = num_bytes / seconds
            self.transfer_bytes_per_s = 0.8 * self.transfer_bytes_per_s + 0.2 * rate

    def observe_prefill(self, num_computed_tokens: int, prefill_s: float | None) -> None:
        """A local prefill's speed (tokens computed over the engine's prefill time; EWMA)."""
        if prefill_s and prefill_s > 0 and num_computed_tokens >= 64:
            rate = num_computed_tokens / prefill_s
            self.prefill_tokens_per_s = 0.8 * self.prefill_tokens_per_s + 0.2 * rate

    def on_first_token(self, ticket: RouteTicket) -> None:
        """Prefill done on the chosen worker: its queued prefill becomes decode load."""
        if ticket.decision is not None and not ticket.first_token:
            ticket.first_token = True
            self._state(ticket).on_first_token(ticket.request_id)

    def finish(
        self, ticket: RouteTicket, num_cached_tokens: int, prefill_s: float | None = None
    ) -> LedgerRow | None:
        """Close the ticket with the engine's realized hits (prompt tokens served from its
        cache): the ledger row, also kept on the ticket; None when it was never routed."""
        prediction = ticket.prediction
        if prediction is None or ticket.row is not None:
            return ticket.row
        model = self._models[ticket.model]
        model.state.on_finished(ticket.request_id)
        realized = {"device": num_cached_tokens}
        ticket.row = model.ledger.record(prediction, realized, prefill_s)
        return ticket.row

    def release(self, ticket: RouteTicket) -> None:
        """Drop the ticket's load without a ledger row (failed, aborted before its prefill
        finished, or about to be routed again)."""
        if ticket.decision is None or ticket.row is not None:
            return
        self._state(ticket).on_finished(ticket.request_id)
        ticket.decision = None
        ticket.prediction = None
        ticket.first_token = False

    def _state(self, ticket: RouteTicket) -> RouterState:
        return self._models[ticket.model].state

    # -- views -----------------------------------------------------------------------------
    def worker_view(self, worker_id: str) -> dict[str, Any] | None:
        """What the router knows of a worker, for `/kvrelay/workers` (None: unknown)."""
        stats = self._stats.get(worker_id)
        if stats is None:
            return None
        model = self._models[stats.model]
        state = model.state
        load = state.load(worker_id)
        exact = state.index if isinstance(state.index, PrefixIndex) else None
        last = exact.last_event_id(worker_id) if exact is not None else None
        awaiting = exact is not None and exact.awaiting_dump(worker_id)
        return {
            **{k: v for k, v in dataclasses.asdict(stats).items() if k != "last_dump_at"},
            "router_block_size": model.block_size,
            "last_event_id": last,
            "awaiting_dump": awaiting,
            "num_indexed_blocks": state.index.num_blocks(worker_id) if stats.routable else 0,
            "num_queued_prefill_blocks": load.num_queued_prefill_blocks,
            "num_active_decode_blocks": load.num_active_decode_blocks,
            "num_requests": load.num_requests,
        }

    def summary(self) -> dict[str, Any]:
        """The policy and, per model, the block size and index size."""
        return {
            "policy": self.policy.value,
            "models": {
                name: {"block_size": m.block_size, "num_workers": len(m.state.workers)}
                for name, m in self._models.items()
            },
        }

    def event_stats(self) -> Iterator[tuple[str, str, WorkerEventStats, int]]:
        """(model, worker, stats, indexed blocks) per known worker, for the exporter."""
        for wid, stats in self._stats.items():
            state = self._models[stats.model].state
            indexed = state.index.num_blocks(wid) if stats.routable else 0
            yield stats.model, wid, stats, indexed

    def metric_samples(self) -> Iterator[MetricSample]:
        """Every model's ledger counters (names without the `kvrelay_` prefix)."""
        for model in self._models.values():
            yield from model.ledger.metric_samples()

    def check_integrity(self) -> None:
        for model in self._models.values():
            model.state.check_integrity()


__all__ = ["RouteTicket", "RouterConfig", "RouterService", "WorkerEventStats"]
