"""Embedded runtime: one host, loopback TCP, no external service.

Owns: `EmbeddedHub` (a tiny publish/subscribe broker: the event plane, and so discovery)
and `EmbeddedRuntime` (a process's connection to the hub plus its own request-plane
server). Calls go straight from caller to server over one loopback TCP connection per
call, so the hub never carries tokens; closing the connection cancels the call.
Frames are length-prefixed msgpack (`frames.py`). Imports L0 and `runtime.base/frames`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

import msgspec

from kvrelay.errors import PeerUnavailableError, TransportError
from kvrelay.runtime.base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    Handler,
    Message,
    Runtime,
    Subscription,
    subject_matches,
)
from kvrelay.runtime.frames import (
    Call,
    Msg,
    Pub,
    Sub,
    Unsub,
    decode_call,
    decode_hub,
    frame_bytes,
    iterate_stream,
    pump_call,
    read_frame,
    write_frame,
)

logger = logging.getLogger(__name__)

SCHEME = "embedded"
MAX_PENDING_PER_SUBSCRIBER = 100_000  # hub drops (and logs) beyond this per slow client


def parse_tcp_address(address: str) -> tuple[str, int]:
    """`scheme://host:port` -> (host, port)."""
    parts = urlsplit(address)
    if not parts.hostname or parts.port is None:
        raise TransportError(f"expected scheme://host:port, got {address!r}")
    return parts.hostname, parts.port


class _HubClient:
    """One connection to the hub: its subscriptions and its outgoing queue."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.subs: dict[int, str] = {}
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(MAX_PENDING_PER_SUBSCRIBER)
        self.num_dropped = 0

    async def flush_forever(self) -> None:
        while True:
            data = await self.outbox.get()
            self.writer.write(data)
            await self.writer.drain()


class EmbeddedHub:
    """Publish/subscribe broker on 127.0.0.1; forwards each Pub to every matching Sub."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._clients: set[_HubClient] = set()

    @property
    def url(self) -> str:
        return f"{SCHEME}://{self.host}:{self.port}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve_client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("embedded hub listening on %s", self.url)
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for client in list(self._clients):
                client.writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = _HubClient(writer)
        self._clients.add(client)
        flusher = asyncio.create_task(client.flush_forever())
        try:
            while True:
                frame = decode_hub(await read_frame(reader))
                if isinstance(frame, Sub):
                    client.subs[frame.sid] = frame.pattern
                elif isinstance(frame, Unsub):
                    client.subs.pop(frame.sid, None)
                elif isinstance(frame, Pub):
                    self._route(frame)
        except (PeerUnavailableError, TransportError, ConnectionError, asyncio.CancelledError):
            pass  # a top-level connection task: ending quietly is the right thing on cancel
        finally:
            self._clients.discard(client)
            flusher.cancel()
            writer.close()

    def _route(self, pub: Pub) -> None:
        for client in self._clients:
            for sid, pattern in client.subs.items():
                if not subject_matches(pattern, pub.subject):
                    continue
                try:
                    client.outbox.put_nowait(frame_bytes(Msg(sid, pub.subject, pub.data)))
                except asyncio.QueueFull:
                    client.num_dropped += 1
                    if client.num_dropped % 1000 == 1:
                        logger.warning("hub dropping messages for a slow subscriber")


class _QueueSubscription(Subscription):
    def __init__(self, runtime: EmbeddedRuntime, sid: int) -> None:
        self._runtime = runtime
        self.sid = sid
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()

    async def next(self) -> Message:
        msg = await self.queue.get()
        if msg is None:
            self.queue.put_nowait(None)  # keep failing for later callers too
            raise PeerUnavailableError("embedded hub connection lost")
        return msg

    async def unsubscribe(self) -> None:
        await self._runtime._unsubscribe(self.sid)


class EmbeddedRuntime(Runtime):
    """A process's runtime over an `EmbeddedHub` at `hub_url` (embedded://host:port)."""

    def __init__(self, hub_url: str, host: str = "127.0.0.1") -> None:
        self.hub_host, self.hub_port = parse_tcp_address(hub_url)
        self.host = host
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._subs: dict[int, _QueueSubscription] = {}
        self._sids = itertools.count(1)
        self._dispatcher: asyncio.Task[None] | None = None
        self._servers: list[asyncio.Server] = []
        self._lost = False
        self._closed = False

    @property
    def lost(self) -> bool:
        return self._lost and not self._closed

    async def start(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.hub_host, self.hub_port), DEFAULT_CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise PeerUnavailableError(
                f"cannot reach the embedded hub at {self.hub_host}:{self.hub_port}: {exc}"
            ) from exc
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        if self._writer is not None:
            self._writer.close()
        for sub in self._subs.values():
            sub.queue.put_nowait(None)

    async def _dispatch(self) -> None:
        assert self._reader is not None
        try:
            while True:
                frame = decode_hub(await read_frame(self._reader))
                if isinstance(frame, Msg) and (sub := self._subs.get(frame.sid)) is not None:
                    sub.queue.put_nowait(Message(frame.subject, frame.data))
        except (PeerUnavailableError, TransportError) as exc:
            if not self._closed:
                logger.warning("lost the embedded hub: %s", exc)
            self._lost = True
            for sub in self._subs.values():
                sub.queue.put_nowait(None)

    async def _send(self, frame: msgspec.Struct) -> None:
        if self._writer is None or self._lost:
            raise PeerUnavailableError("not connected to the embedded hub")
        async with self._write_lock:
            try:
                await write_frame(self._writer, frame)
            except ConnectionError as exc:
                self._lost = True
                raise PeerUnavailableError(f"embedded hub write failed: {exc}") from exc

    async def publish(self, subject: str, data: bytes) -> None:
        await self._send(Pub(subject, data))

    async def subscribe(self, pattern: str) -> Subscription:
        sub = _QueueSubscription(self, next(self._sids))
        self._subs[sub.sid] = sub
        await self._send(Sub(sub.sid, pattern))
        return sub

    async def _unsubscribe(self, sid: int) -> None:
        if self._subs.pop(sid, None) is not None and not self._lost and not self._closed:
            await self._send(Unsub(sid))

    # -- request plane ---------------------------------------------------------------------
    async def serve(self, service_id: str, handler: Handler) -> str:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.CancelledError):  # top-level task: end quietly
                await _serve_connection(handler, reader, writer)

        server = await asyncio.start_server(on_connect, self.host, 0)
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        logger.info("%s serving calls on tcp://%s:%d", service_id, self.host, port)
        return f"tcp://{self.host}:{port}"

    async def call(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        *,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> AsyncGenerator[bytes, None]:
        host, port = parse_tcp_address(address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), DEFAULT_CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise PeerUnavailableError(f"cannot connect to {address}: {exc}") from exc
        try:
            await write_frame(writer, Call(uuid.uuid4().hex, endpoint, payload))
            async for data in iterate_stream(lambda: read_frame(reader), idle_timeout_s, address):
                yield data
        except ConnectionError as exc:
            raise PeerUnavailableError(f"{address}: {exc}") from exc
        finally:
            writer.close()  # closing early is the cancel signal


async def _serve_connection(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Run one call; the caller closing its end (or sending anything) cancels it."""
    try:
        call = decode_call(await read_frame(reader))
    except (PeerUnavailableError, TransportError):
        writer.close()
        return
    if not isinstance(call, Call):
        writer.close()
        return

    async def send(frame: msgspec.Struct) -> None:
        await write_frame(writer, frame)

    pump = asyncio.create_task(pump_call(handler(call.endpoint, call.payload), send))
    watch = asyncio.create_task(_wait_for_hangup(reader))
    try:
        await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, watch):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        writer.close()


async def _wait_for_hangup(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        await reader.read(1)  # EOF (b"") or any byte (a Cancel frame) ends the call
