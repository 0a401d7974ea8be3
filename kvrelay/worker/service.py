"""Worker service: one engine behind the runtime.

Owns: `WorkerService` — registers the worker (model, role, block size, KV capacity,
address, KV transfer address), serves the `generate` / `prefill` / `stats` / `model_card` /
`kv_dump` endpoints (a decode worker runs a request's remote prefill first, a prefill worker
streams KV: `worker/disagg.py`), publishes KV
events (unless disabled) and load reports on the event plane, aborts a request (freeing its
blocks) when its caller goes away, and drains on shutdown. Imports runtime, protocol, kv and
the engine loop; must not import the frontend or the HTTP framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from kvrelay.errors import InvalidRequestError, PeerUnavailableError
from kvrelay.kv.events import KVEventBatch, encode_batch
from kvrelay.kv.transfer import KVLayout, Transport
from kvrelay.protocol import (
    ROLE_AGGREGATED,
    ROLE_DECODE,
    ROLE_PREFILL,
    DisaggInfo,
    GenerateChunk,
    GenerateRequest,
    LoadReport,
    ModelCard,
    PrefillRequest,
    RequestOutput,
    WireError,
    WorkerInfo,
)
from kvrelay.runtime.base import (
    ENDPOINT_GENERATE,
    ENDPOINT_KV_DUMP,
    ENDPOINT_MODEL_CARD,
    ENDPOINT_STATS,
    Runtime,
    kv_events_subject,
    load_subject,
)
from kvrelay.runtime.discovery import DEFAULT_HEARTBEAT_S, Registrar
from kvrelay.worker.disagg import ENDPOINT_PREFILL, fetch_remote_prefill, serve_prefill
from kvrelay.worker.engine_loop import EngineLike, EngineLoop

logger = logging.getLogger(__name__)

PIECE_BYTES = 256 << 10  # model cards and KV dumps go in pieces: NATS' payload limit is 1 MiB
LOAD_REPORT_INTERVAL_S = 0.25


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    model: str
    role: str = ROLE_AGGREGATED
    block_size: int = 16
    num_kv_blocks: int = 0
    kv_events: bool = True  # False: publish no KV events and refuse dumps (`--no-kv-events`)


class WorkerService:
    """Serves one engine until `stop`; `run_until_stopped` is the process's main coroutine."""

    def __init__(
        self,
        runtime: Runtime,
        engine: EngineLike,
        identity: WorkerIdentity,
        tokenizer: Any = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        transport: Transport | None = None,
    ) -> None:
        self.runtime = runtime
        self.transport = transport  # KV transfer plane: prefill and decode roles
        self.transfer_address = ""
        self._layout: KVLayout | None = None
        self._queued_prefill_tokens = 0
        self.engine = engine
        self.identity = identity
        self.tokenizer = tokenizer
        self.heartbeat_s = heartbeat_s
        self.instance_id = uuid.uuid4().hex[:12]
        self.loop: EngineLoop | None = None
        self.registrar: Registrar | None = None
        self._kv_batches: asyncio.Queue[KVEventBatch] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._stopped = asyncio.Event()
        self._model_card: bytes | None = None

    async def start(self) -> WorkerInfo:
        self.loop = EngineLoop(self.engine, asyncio.get_running_loop(), self._kv_batches.put_nowait)
        self.loop.start()
        address = await self.runtime.serve(self.identity.worker_id, self.handle)
        bytes_per_block = 0
        if self.transport is not None:
            self.transfer_address = await self.transport.start()
            kv_layout = getattr(self.engine, "kv_layout", None)
            if kv_layout is not None:
                self._layout = kv_layout()
                bytes_per_block = self._layout.bytes_per_block
        info = WorkerInfo(
            worker_id=self.identity.worker_id,
            instance_id=self.instance_id,
            model=self.identity.model,
            role=self.identity.role,
            block_size=self.identity.block_size,
            num_kv_blocks=self.identity.num_kv_blocks,
            max_model_len=self.engine.max_model_len,
            address=address,
            pid=os.getpid(),
            started_at=time.time(),
            kv_events=self.identity.kv_events,
            transfer_address=self.transfer_address,
            kv_bytes_per_block=bytes_per_block,
        )
        self._tasks = [
            asyncio.create_task(self._publish_kv_events()),
            asyncio.create_task(self._publish_load()),
        ]
        self.registrar = Registrar(self.runtime, info, self.heartbeat_s)
        await self.registrar.start()
        logger.info(
            "worker %s ready (%s, instance %s)", info.worker_id, info.model, self.instance_id
        )
        return info

    def request_stop(self) -> None:
        self._stopped.set()

    async def run_until_stopped(self, drain_timeout_s: float = 30.0) -> None:
        """Serve until `request_stop` or the runtime is lost; then drain and close."""
        while not self._stopped.is_set() and not self.runtime.lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), 0.5)
        if self.runtime.lost:
            logger.error("lost the runtime; exiting")
        await self.shutdown(drain_timeout_s)

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Leave discovery, refuse new requests, let in-flight ones finish, stop."""
        self._draining = True
        if self.registrar is not None:
            await self.registrar.close()
        deadline = time.monotonic() + drain_timeout_s
        while (
            self.loop is not None and self.loop.stats.num_inflight and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        if self.loop is not None:
            self.loop.stop()
        if self.transport is not None:
            await self.transport.close()
        await self.runtime.close()

    def _num_inflight(self) -> int:
        return 0 if self.loop is None else self.loop.stats.num_inflight

    # -- request plane ---------------------------------------------------------------------
    async def handle(self, endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        if endpoint == ENDPOINT_GENERATE:
            async for frame in self._generate(payload):
                yield frame
        elif endpoint == ENDPOINT_PREFILL:
            async for frame in self._prefill(payload):
                yield frame
        elif endpoint == ENDPOINT_STATS:
            yield msgspec.msgpack.encode(self.load_report())
        elif endpoint == ENDPOINT_MODEL_CARD:
            card = self.model_card_bytes()
            for start in range(0, len(card), PIECE_BYTES):
                yield card[start : start + PIECE_BYTES]
        elif endpoint == ENDPOINT_KV_DUMP:
            dump = await self._kv_dump()
            for start in range(0, len(dump), PIECE_BYTES):
                yield dump[start : start + PIECE_BYTES]
        else:
            raise ValueError(f"unknown endpoint {endpoint!r}")

    async def _prefill(self, payload: bytes) -> AsyncGenerator[bytes, None]:
        if self.identity.role != ROLE_PREFILL or self.transport is None or self._layout is None:
            raise InvalidRequestError(f"{self.identity.worker_id} is not a prefill worker")
        assert self.loop is not None
        num_tokens = 0  # the queue depth counts the tokens of the blocks asked for
        with contextlib.suppress(msgspec.DecodeError):
            ask = msgspec.msgpack.decode(payload, type=PrefillRequest)
            num_tokens = len(ask.block_hashes) * self.identity.block_size
        self._queued_prefill_tokens += num_tokens
        try:
            async for frame in serve_prefill(
                self.loop, self.transport, self._layout, self.identity.worker_id, payload
            ):
                yield frame
        finally:
            self._queued_prefill_tokens -= num_tokens

    async def _kv_dump(self) -> bytes:
        """The engine's cached blocks as one encoded full-dump batch."""
        assert self.loop is not None
        if not self.identity.kv_events:
            raise InvalidRequestError(
                f"{self.identity.worker_id} runs with KV events disabled (--no-kv-events)"
            )
        return encode_batch(await self.loop.kv_dump())

    async def _generate(self, payload: bytes) -> AsyncGenerator[bytes, None]:
        assert self.loop is not None
        try:
            request = msgspec.msgpack.decode(payload, type=GenerateRequest)
        except msgspec.DecodeError as exc:  # includes ValidationError (bad sampling values)
            yield self._error_chunk("", WireError(kind="invalid_request", message=str(exc)))
            return
        if self._draining:
            error = WireError(kind="draining", message=f"{self.identity.worker_id} is stopping")
            yield self._error_chunk(request.request_id, error)
            return
        disagg = await self._remote_prefill(request)
        outputs = self.loop.submit(request)
        finished = False
        num_sent = 0
        try:
            while not finished:
                item = await outputs.get()
                while isinstance(item, RequestOutput) and not item.finished and not outputs.empty():
                    item = outputs.get_nowait()  # coalesce: send only the newest state
                if isinstance(item, WireError):
                    finished = True
                    yield self._error_chunk(request.request_id, item)
                    return
                finished = item.finished
                chunk = self._chunk(item, num_sent)
                if finished:
                    chunk.disagg = disagg
                num_sent = len(item.output_token_ids)
                yield msgspec.msgpack.encode(chunk)
        finally:
            if not finished:  # the caller went away (disconnect, stop string, cancel)
                self.loop.abort(request.request_id)

    async def _remote_prefill(self, request: GenerateRequest) -> DisaggInfo | None:
        """Decode role: import the prompt's KV from the named prefill worker first."""
        if request.remote_prefill is None or self.transport is None:
            return None
        if self.identity.role != ROLE_DECODE:
            return None
        assert self.loop is not None
        return await fetch_remote_prefill(
            self.loop, self.runtime, self.transport, self.transfer_address, request
        )

    def _chunk(self, out: RequestOutput, num_sent: int) -> GenerateChunk:
        return GenerateChunk(
            request_id=out.request_id,
            new_token_ids=out.output_token_ids[num_sent:],
            num_output_tokens=len(out.output_token_ids),
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            finished=out.finished,
            finish_reason=out.finish_reason,
            metrics=out.metrics if out.finished else None,
            worker_id=self.identity.worker_id,
        )

    def _error_chunk(self, request_id: str, error: WireError) -> bytes:
        chunk = GenerateChunk(
            request_id=request_id, finished=True, worker_id=self.identity.worker_id, error=error
        )
        return msgspec.msgpack.encode(chunk)

    # -- reports ---------------------------------------------------------------------------
    def load_report(self) -> LoadReport:
        assert self.loop is not None
        s = self.loop.stats
        return LoadReport(
            worker_id=self.identity.worker_id,
            instance_id=self.instance_id,
            ts=time.time(),
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_kv_blocks=s.num_kv_blocks,
            num_free_blocks=s.num_free_blocks,
            kv_usage=s.kv_usage,
            num_prefix_query_tokens=s.num_prefix_query_tokens,
            num_prefix_hit_tokens=s.num_prefix_hit_tokens,
            num_preempted=s.num_preempted,
            num_inflight=s.num_inflight,
            last_kv_event_id=s.last_kv_event_id,
            num_queued_prefill_tokens=self._queued_prefill_tokens,
        )

    def model_card_bytes(self) -> bytes:
        if self._model_card is None:
            card = ModelCard(
                model=self.identity.model,
                max_model_len=self.engine.max_model_len,
                block_size=self.identity.block_size,
                eos_token_ids=list(getattr(self.tokenizer, "eos_token_ids", ()) or ()),
                tokenizer_files=tokenizer_files(self.tokenizer),
            )
            self._model_card = msgspec.msgpack.encode(card)
        return self._model_card

    async def _publish_kv_events(self) -> None:
        subject = kv_events_subject(self.identity.worker_id)
        while True:
            batch = await self._kv_batches.get()
            if not self.identity.kv_events:
                continue  # drained, never published
            with contextlib.suppress(PeerUnavailableError):
                await self.runtime.publish(subject, encode_batch(batch))

    async def _publish_load(self) -> None:
        subject = load_subject(self.identity.worker_id)
        while True:
            with contextlib.suppress(PeerUnavailableError):
                await self.runtime.publish(subject, msgspec.msgpack.encode(self.load_report()))
            await asyncio.sleep(LOAD_REPORT_INTERVAL_S)


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer as Hugging Face files (name -> bytes), via `Tokenizer.save`."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="kvrelay-tok-") as tmp:
        tokenizer.save(Path(tmp))
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
