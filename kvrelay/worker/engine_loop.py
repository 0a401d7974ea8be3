"""The engine loop: one EngineCore driven by its own thread, fed from asyncio.

Owns: `EngineLoop` — a command queue (add / abort / KV dump) into the engine thread, per-request
asyncio queues of `RequestOutput`s back out, KV event batches handed to a callback, and a
stats snapshot the asyncio side can read without touching the engine. The engine is only
ever called from the loop thread. Imports protocol, errors and kv events; must not import
the frontend or the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvrelay.errors import (
    InvalidRequestError,
    InvalidSamplingParamsError,
    OutOfKVMemoryError,
    PromptTooLongError,
)
from kvrelay.kv.events import KVEventBatch
from kvrelay.protocol import GenerateRequest, RequestOutput, SamplingParams, WireError

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


class EngineLike(Protocol):
    """The part of `EngineCore` the worker uses (a fake implements it in tests)."""

    max_model_len: int

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str | None = None,
    ) -> Any: ...

    def step(self) -> list[RequestOutput]: ...

    def abort_request(self, request_id: str) -> RequestOutput | None: ...

    def has_unfinished(self) -> bool: ...

    def take_kv_events(self) -> KVEventBatch | None: ...

    def kv_dump(self) -> KVEventBatch: ...

    def stats(self) -> Any: ...


@dataclass(frozen=True)
class LoopStats:
    """What the worker reports about its engine; read from any thread."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_preempted: int = 0
    num_inflight: int = 0
    num_steps: int = 0
    last_kv_event_id: int = -1  # id of the last KV event batch the engine emitted


Item = RequestOutput | WireError


@dataclass
class _Add:
    request: GenerateRequest
    outputs: asyncio.Queue[Item]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Dump:
    result: asyncio.Future[KVEventBatch]


@dataclass
class _Call:
    """Run `fn(engine)` on the engine thread between two steps (KV import, prefill jobs)."""

    fn: Callable[[Any], Any]
    result: asyncio.Future[Any]


@dataclass
class _AddPrefill:
    request_id: str
    add: Callable[[Any], Any]  # fn(engine): calls add_prefill_request
    exports: asyncio.Queue[Any]  # KVExport items, or one WireError


def error_kind(exc: BaseException) -> str:
    """The WireError kind for an exception raised by `add_request`."""
    if isinstance(exc, PromptTooLongError | OutOfKVMemoryError):
        return "prompt_too_long"
    if isinstance(exc, InvalidSamplingParamsError):
        return "invalid_sampling"
    if isinstance(exc, InvalidRequestError):
        return "invalid_request"
    return "internal"


class EngineLoop:
    """Runs `engine.step()` in a thread while any request is unfinished."""

    def __init__(
        self,
        engine: EngineLike,
        loop: asyncio.AbstractEventLoop,
        on_kv_events: Callable[[KVEventBatch], None] | None = None,
    ) -> None:
        self.engine = engine
        self._loop = loop
        self._on_kv_events = on_kv_events
        self._commands: queue.SimpleQueue[_Add | _Abort | _Dump | _Call | _AddPrefill] = (
            queue.SimpleQueue()
        )
        self._outputs: dict[str, asyncio.Queue[Item]] = {}  # engine thread only
        self._exports: dict[str, asyncio.Queue[Any]] = {}  # prefill jobs; engine thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stats = LoopStats()
        self._num_steps = 0
        self._last_kv_event_id = -1

    @property
    def stats(self) -> LoopStats:
        return self._stats

    def start(self) -> None:
        self._refresh_stats()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def submit(self, request: GenerateRequest) -> asyncio.Queue[Item]:
        """Queue a request; its outputs (cumulative) or one WireError arrive on the queue."""
        outputs: asyncio.Queue[Item] = asyncio.Queue()
        self._commands.put(_Add(request, outputs))
        return outputs

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (no-op when it already finished)."""
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(engine)` on the engine thread between two steps; its result or exception."""
        result: asyncio.Future[Any] = self._loop.create_future()
        self._commands.put(_Call(fn, result))
        return await result

    def submit_prefill(self, request_id: str, add: Callable[[Any], Any]) -> asyncio.Queue[Any]:
        """Start a prefill-only request (`add(engine)` calls `add_prefill_request`); its
        `KVExport`s (the last with done=True), or one WireError, arrive on the queue."""
        exports: asyncio.Queue[Any] = asyncio.Queue()
        self._commands.put(_AddPrefill(request_id, add, exports))
        return exports

    async def kv_dump(self) -> KVEventBatch:
        """A full dump of the engine's cached blocks, taken on the engine thread between two
        steps, so it is consistent with the event ids already handed out."""
        result: asyncio.Future[KVEventBatch] = self._loop.create_future()
        self._commands.put(_Dump(result))
        return await result

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        warm_up = getattr(self.engine, "warm_up", None)
        if warm_up is not None:
            try:
                warm_up()
            except Exception:  # the first request pays the one-time costs instead
                logger.exception("engine warm-up failed")
        while not self._stop.is_set():
            self._apply_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()
            self._emit_kv_events()  # those of commands: aborts, imports, resets
            self._refresh_stats()
        for request_id in list(self._outputs):
            self._finish_with_error(request_id, WireError(kind="draining", message="stopped"))

    def _apply_commands(self, block: bool) -> None:
        try:
            command = (
                self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Dump):
                self._dump(command.result)
            elif isinstance(command, _Call):
                self._run_call(command)
            elif isinstance(command, _AddPrefill):
                self._add_prefill(command)
            else:
                self._abort(command.request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, command: _Add) -> None:
        req = command.request
        try:
            self.engine.add_request(
                req.request_id, req.prompt_token_ids, req.sampling, cache_salt=req.cache_salt
            )
        except Exception as exc:
            if error_kind(exc) == "internal":
                logger.exception("add_request failed for %s", req.request_id)
            self._call_soon(
                command.outputs.put_nowait, WireError(kind=error_kind(exc), message=str(exc))
            )
            return
        self._outputs[req.request_id] = command.outputs

    def _run_call(self, command: _Call) -> None:
        try:
            value = command.fn(self.engine)
        except Exception as exc:
            self._call_soon(_settle_any, command.result, None, exc)
            return
        self._call_soon(_settle_any, command.result, value, None)

    def _add_prefill(self, command: _AddPrefill) -> None:
        try:
            command.add(self.engine)
        except Exception as exc:
            if error_kind(exc) == "internal":
                logger.exception("add_prefill_request failed for %s", command.request_id)
            error = WireError(kind=error_kind(exc), message=str(exc))
            self._call_soon(command.exports.put_nowait, error)
            return
        self._exports[command.request_id] = command.exports
        self._dispatch_exports()

    def _dispatch_exports(self) -> None:
        if not self._exports:
            return
        take: Callable[[], list[Any]] = getattr(self.engine, "take_kv_exports")  # noqa: B009
        for export in take():
            target = self._exports.get(export.request_id)
            if target is None:
                if export.run is not None:
                    export.run.release()
                continue
            if export.done or export.run is None:
                del self._exports[export.request_id]
            self._call_soon(target.put_nowait, export)

    def _dump(self, result: asyncio.Future[KVEventBatch]) -> None:
        try:
            batch = self.engine.kv_dump()
        except Exception as exc:
            logger.exception("KV dump failed")
            self._call_soon(_settle, result, None, exc)
            return
        self._call_soon(_settle, result, batch, None)

    def _abort(self, request_id: str) -> None:
        job = self._exports.pop(request_id, None) is not None
        if self._outputs.pop(request_id, None) is not None or job:
            self.engine.abort_request(request_id)
            logger.debug("aborted %s", request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing every in-flight request")
            for request_id in list(self._outputs):
                try:
                    self.engine.abort_request(request_id)
                except Exception:
                    logger.exception("abort after a failed step also failed")
                self._finish_with_error(
                    request_id, WireError(kind="internal", message=f"engine step failed: {exc}")
                )
            for request_id, job in list(self._exports.items()):
                with contextlib.suppress(Exception):
                    self.engine.abort_request(request_id)
                error = WireError(kind="internal", message=f"engine step failed: {exc}")
                self._call_soon(job.put_nowait, error)
            self._exports.clear()
            return
        self._num_steps += 1
        # Events before outputs: a client that sends its next turn as soon as this answer
        # arrives must find the router already knowing the blocks this step cached.
        self._emit_kv_events()
        self._dispatch_exports()
        for out in outputs:
            target = self._outputs.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._outputs[out.request_id]
            self._call_soon(target.put_nowait, out)

    def _emit_kv_events(self) -> None:
        batch = self.engine.take_kv_events()
        if batch is not None:
            self._last_kv_event_id = batch.event_id
            if self._on_kv_events is not None:
                self._call_soon(self._on_kv_events, batch)

    def _finish_with_error(self, request_id: str, error: WireError) -> None:
        target = self._outputs.pop(request_id, None)
        if target is not None:
            self._call_soon(target.put_nowait, error)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the event loop is closed, the worker is shutting down.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _refresh_stats(self) -> None:
        s = self.engine.stats()
        prefix = s.prefix_cache
        self._stats = LoopStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_kv_blocks=s.num_blocks,
            num_free_blocks=s.num_free_blocks,
            kv_usage=s.kv_usage,
            num_prefix_query_tokens=prefix.num_query_tokens,
            num_prefix_hit_tokens=prefix.num_hit_tokens,
            num_preempted=prefix.num_preempted,
            num_inflight=len(self._outputs) + len(self._exports),
            num_steps=self._num_steps,
            last_kv_event_id=self._last_kv_event_id,
        )


def _settle_any(future: asyncio.Future[Any], value: Any, exc: Exception | None) -> None:
    if future.done():  # the caller gave up
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _settle(
    future: asyncio.Future[KVEventBatch], batch: KVEventBatch | None, exc: Exception | None
) -> None:
    if future.done():  # the caller gave up
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert batch is not None
        future.set_result(batch)
