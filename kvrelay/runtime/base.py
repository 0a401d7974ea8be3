"""The runtime interface: event plane (publish/subscribe), request plane (streaming calls)
and the subject names every component agrees on. Discovery is built on the event plane in
`discovery.py`, so both backends share it.

Owns: `Runtime` (the interface both backends implement), `Message`, `Subscription`,
`Handler` and the subject scheme. Imports only L0 (errors). Must not import NATS, the
engine, the worker or the frontend.

Rules every backend keeps:
- `publish` is fire-and-forget and ordered per publisher and subject.
- Subjects are dot-separated tokens; `*` matches one token, `>` the rest (NATS style).
- `call` yields the handler's frames in order. Closing the iterator early cancels the call:
  the server side closes the handler's async generator, so its `finally` runs.
- A lost peer (refused, closed, silent past `idle_timeout_s`) raises PeerUnavailableError;
  a handler exception raises RemoteError with its message.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from kvrelay.errors import RemoteError

# Subjects. Worker ids never contain dots.
DISCOVERY_HEARTBEAT = "kvrelay.discovery.heartbeat"  # WorkerInfo, every heartbeat_s
DISCOVERY_LEAVE = "kvrelay.discovery.leave"  # WorkerInfo of a worker leaving on purpose
DISCOVERY_PROBE = "kvrelay.discovery.probe"  # a watcher asks every worker to announce now
KV_EVENTS_PREFIX = "kvrelay.kv_events"  # .<worker_id>: encoded KVEventBatch
LOAD_PREFIX = "kvrelay.load"  # .<worker_id>: LoadReport

# Request-plane endpoints served by a worker.
ENDPOINT_GENERATE = "generate"
ENDPOINT_STATS = "stats"
ENDPOINT_MODEL_CARD = "model_card"
ENDPOINT_KV_DUMP = "kv_dump"  # every cached block as one KVEventBatch (kv.events.full_dump_batch)

DEFAULT_IDLE_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 3.0
KEEPALIVE_INTERVAL_S = 1.0

Handler = Callable[[str, bytes], AsyncGenerator[bytes, None]]
"""Serves one call: (endpoint, payload) -> frames. Cancellation closes the generator."""


def kv_events_subject(worker_id: str) -> str:
    return f"{KV_EVENTS_PREFIX}.{worker_id}"


def load_subject(worker_id: str) -> str:
    return f"{LOAD_PREFIX}.{worker_id}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS-style match: `*` is one token, a trailing `>` one or more tokens."""
    pat = pattern.split(".")
    sub = subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(pat) == len(sub)


@dataclass(frozen=True)
class Message:
    subject: str
    data: bytes


class Subscription(abc.ABC):
    """Messages on a subject pattern, in arrival order, until `unsubscribe`."""

    @abc.abstractmethod
    async def next(self) -> Message:
        """The next message; raises PeerUnavailableError when the runtime closed."""

    @abc.abstractmethod
    async def unsubscribe(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            yield await self.next()


class Runtime(abc.ABC):
    """One process's connection to the cluster: event plane plus request plane."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raises PeerUnavailableError when the backend cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving, drop subscriptions, disconnect. Idempotent."""

    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, pattern: str) -> Subscription: ...

    @abc.abstractmethod
    async def serve(self, service_id: str, handler: Handler) -> str:
        """Start answering calls for `service_id`; returns the address callers use."""

    @abc.abstractmethod
    def call(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        *,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> AsyncGenerator[bytes, None]:
        """Stream the frames the service at `address` returns for (endpoint, payload)."""

    @property
    def lost(self) -> bool:
        """True once the connection to the backend is gone for good (process should exit)."""
        return False


async def call_once(
    runtime: Runtime, address: str, endpoint: str, payload: bytes, timeout_s: float = 10.0
) -> bytes:
    """A unary call: the first frame of the stream."""
    stream = runtime.call(address, endpoint, payload, idle_timeout_s=timeout_s)
    try:
        async for frame in stream:
            return frame
    finally:
        await stream.aclose()
    raise RemoteError(f"{endpoint} at {address} returned no data")
