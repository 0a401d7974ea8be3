"""Discovery over the event plane: registrations with a heartbeat and a TTL.

Owns: `Registrar` (a worker announcing its `WorkerInfo` every heartbeat, answering probes
and leaving on close) and `DiscoveryWatcher` (the live set: a worker is dropped when it
leaves, when nothing was heard from it for `ttl_s`, or when a caller reports it dead).
Backend-independent: uses only `Runtime.publish/subscribe`. Imports L0 and runtime.base.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from kvrelay.errors import PeerUnavailableError
from kvrelay.protocol import WorkerInfo
from kvrelay.runtime.base import (
    DISCOVERY_HEARTBEAT,
    DISCOVERY_LEAVE,
    DISCOVERY_PROBE,
    Runtime,
    Subscription,
)

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 0.5
DEFAULT_TTL_S = 2.0

_info_decoder = msgspec.msgpack.Decoder(WorkerInfo)


class Registrar:
    """Keeps one worker registered until `close` (which announces the departure)."""

    def __init__(
        self, runtime: Runtime, info: WorkerInfo, heartbeat_s: float = DEFAULT_HEARTBEAT_S
    ) -> None:
        self.runtime = runtime
        self.info = info
        self.heartbeat_s = heartbeat_s
        self._payload = msgspec.msgpack.encode(info)
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_sub: Subscription | None = None

    async def start(self) -> None:
        self._probe_sub = await self.runtime.subscribe(DISCOVERY_PROBE)
        await self.runtime.publish(DISCOVERY_HEARTBEAT, self._payload)
        self._tasks = [
            asyncio.create_task(self._beat()),
            asyncio.create_task(self._answer_probes(self._probe_sub)),
        ]

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(PeerUnavailableError):
                await self.runtime.publish(DISCOVERY_HEARTBEAT, self._payload)

    async def _answer_probes(self, sub: Subscription) -> None:
        with contextlib.suppress(PeerUnavailableError):
            async for _ in sub:
                await self.runtime.publish(DISCOVERY_HEARTBEAT, self._payload)

    async def close(self) -> None:
        """Stop heartbeats and tell watchers right away (no TTL wait)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        with contextlib.suppress(PeerUnavailableError):
            if self._probe_sub is not None:
                await self._probe_sub.unsubscribe()
            await self.runtime.publish(DISCOVERY_LEAVE, self._payload)


Listener = Callable[[str, WorkerInfo | None], None]
"""Called with (worker_id, info) on add or change and (worker_id, None) on removal."""


class DiscoveryWatcher:
    """The live workers as heard through heartbeats; expired after `ttl_s` of silence."""

    def __init__(self, runtime: Runtime, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.runtime = runtime
        self.ttl_s = ttl_s
        self._workers: dict[str, WorkerInfo] = {}
        self._last_seen: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        beats = await self.runtime.subscribe(DISCOVERY_HEARTBEAT)
        leaves = await self.runtime.subscribe(DISCOVERY_LEAVE)
        self._tasks = [
            asyncio.create_task(self._consume(beats, leaving=False)),
            asyncio.create_task(self._consume(leaves, leaving=True)),
            asyncio.create_task(self._expire()),
        ]
        await self.runtime.publish(DISCOVERY_PROBE, b"")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    async def wait_for(self, count: int, timeout_s: float) -> list[WorkerInfo]:
        """Wait until at least `count` workers are live (or the timeout); returns them."""
        deadline = time.monotonic() + timeout_s
        while len(self._workers) < count and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        return self.workers()

    def forget(self, worker_id: str, instance_id: str | None = None) -> None:
        """Drop a worker a caller found dead; its next heartbeat (if alive) re-adds it."""
        info = self._workers.get(worker_id)
        if info is None or (instance_id is not None and info.instance_id != instance_id):
            return
        self._remove(worker_id, "reported unreachable")

    async def _consume(self, sub: Subscription, leaving: bool) -> None:
        with contextlib.suppress(PeerUnavailableError):
            async for msg in sub:
                try:
                    info = _info_decoder.decode(msg.data)
                except msgspec.DecodeError:
                    logger.warning("ignoring a malformed registration on %s", msg.subject)
                    continue
                if leaving:
                    current = self._workers.get(info.worker_id)
                    if current is not None and current.instance_id == info.instance_id:
                        self._remove(info.worker_id, "left")
                else:
                    self._upsert(info)

    def _upsert(self, info: WorkerInfo) -> None:
        self._last_seen[info.worker_id] = time.monotonic()
        if self._workers.get(info.worker_id) == info:
            return
        logger.info("worker %s (%s) registered at %s", info.worker_id, info.model, info.address)
        self._workers[info.worker_id] = info
        self._notify(info.worker_id, info)

    def _remove(self, worker_id: str, why: str) -> None:
        if self._workers.pop(worker_id, None) is None:
            return
        self._last_seen.pop(worker_id, None)
        logger.info("worker %s removed from discovery: %s", worker_id, why)
        self._notify(worker_id, None)

    def _notify(self, worker_id: str, info: WorkerInfo | None) -> None:
        self._changed.set()
        for listener in self._listeners:
            try:
                listener(worker_id, info)
            except Exception:
                logger.exception("discovery listener failed")

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 4)
            now = time.monotonic()
            for worker_id, seen in list(self._last_seen.items()):
                if now - seen > self.ttl_s:
                    self._remove(worker_id, f"no heartbeat for {self.ttl_s:.1f}s")
