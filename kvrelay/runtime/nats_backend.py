"""NATS runtime: the event plane, discovery and the request plane through a NATS server, so
frontends and workers can run on different hosts.

Owns: `NatsRuntime`. A served service subscribes to `kvrelay.rpc.<service_id>.<nonce>` (its
address); a call publishes a `Call` there with a private inbox as reply subject and reads
Data / KeepAlive / End / Fail frames from the inbox (the Call goes as a NATS request whose
reply is an Accept, so a missing server is known at once). Leaving a call early publishes
a `Cancel` to the address; a caller that dies without one is found by the server's probes
(a KeepAlive sent to the inbox as a request each KEEPALIVE_INTERVAL_S: NATS answers "no
responders" once the inbox is gone, and the call is cancelled). The only module that imports
`nats` (nats-py). Imports L0 and runtime.base/frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg

from kvrelay.errors import PeerUnavailableError, TransportError
from kvrelay.runtime.base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    KEEPALIVE_INTERVAL_S,
    Handler,
    Message,
    Runtime,
    Subscription,
)
from kvrelay.runtime.frames import (
    Accept,
    Call,
    Cancel,
    KeepAlive,
    decode_call,
    decode_stream,
    encode,
    iterate_stream,
    pump_call,
)

logger = logging.getLogger(__name__)

RPC_PREFIX = "kvrelay.rpc"
MAX_RECONNECT_ATTEMPTS = 60  # about 30 s of trying before the runtime reports itself lost


class _NatsSubscription(Subscription):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self.sub: Any = None

    async def on_msg(self, msg: NatsMsg) -> None:
        self.queue.put_nowait(Message(msg.subject, msg.data))
        if msg.reply:  # a server's probe: answering tells it this caller is still here
            with contextlib.suppress(Exception):
                await msg.respond(b"")

    async def next(self) -> Message:
        msg = await self.queue.get()
        if msg is None:
            self.queue.put_nowait(None)
            raise PeerUnavailableError("NATS connection closed")
        return msg

    async def unsubscribe(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


class NatsRuntime(Runtime):
    """A process's runtime over the NATS server at `url` (nats://host:port)."""

    def __init__(self, url: str, name: str = "kvrelay") -> None:
        self.url = url
        self.name = name
        self._nc: NatsClient | None = None
        self._subs: list[_NatsSubscription] = []
        self._calls: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self._lost = False

    @property
    def lost(self) -> bool:
        return self._lost and not self._closed

    @property
    def nc(self) -> NatsClient:
        if self._nc is None or self._lost:
            raise PeerUnavailableError(f"not connected to NATS at {self.url}")
        return self._nc

    async def start(self) -> None:
        async def on_closed() -> None:
            self._lost = True
            for sub in self._subs:
                sub.queue.put_nowait(None)

        async def on_error(exc: Exception) -> None:
            logger.warning("NATS: %s", exc)

        try:
            self._nc = await nats.connect(
                self.url,
                name=self.name,
                connect_timeout=DEFAULT_CONNECT_TIMEOUT_S,
                max_reconnect_attempts=MAX_RECONNECT_ATTEMPTS,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                closed_cb=on_closed,
                error_cb=on_error,
            )
        except Exception as exc:
            raise PeerUnavailableError(f"cannot connect to NATS at {self.url}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._calls.values():
            task.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        for sub in self._subs:
            sub.queue.put_nowait(None)

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except PeerUnavailableError:
            raise
        except Exception as exc:
            raise PeerUnavailableError(f"NATS publish failed: {exc}") from exc

    async def subscribe(self, pattern: str) -> Subscription:
        sub = _NatsSubscription()
        sub.sub = await self.nc.subscribe(pattern, cb=sub.on_msg)
        self._subs.append(sub)
        await self._synced()  # the server has the subscription before we return
        return sub

    async def _synced(self) -> None:
        """Return once the server has processed everything this connection sent so far.

        nats-py writes a flush's PING straight to the socket, ahead of commands still queued
        for its flusher task (a SUB just made), so one flush can return before the server
        has the subscription: a caller right after then got "no responders" (2 in 1000
        here). By the first PONG the flusher has written the SUB; the second PING follows it.
        """
        await self.nc.flush()
        await self.nc.flush()

    # -- request plane ---------------------------------------------------------------------
    async def serve(self, service_id: str, handler: Handler) -> str:
        address = f"{RPC_PREFIX}.{service_id}.{uuid.uuid4().hex[:12]}"

        async def on_msg(msg: NatsMsg) -> None:
            try:
                frame = decode_call(msg.data)
            except TransportError:
                logger.warning("ignoring a malformed call frame on %s", address)
                return
            if isinstance(frame, Cancel):
                task = self._calls.get(frame.call_id)
                if task is not None:
                    task.cancel()
            elif frame.reply_to:
                if msg.reply:
                    await msg.respond(encode(Accept()))
                task = asyncio.create_task(self._run_call(handler, frame))
                self._calls[frame.call_id] = task
                task.add_done_callback(lambda _t: self._calls.pop(frame.call_id, None))

        await self.nc.subscribe(address, cb=on_msg)
        await self._synced()  # callers may call as soon as the address is registered
        logger.info("%s serving calls on NATS subject %s", service_id, address)
        return address

    async def _run_call(self, handler: Handler, call: Call) -> None:
        async def send(frame: msgspec.Struct) -> None:
            await self.publish(call.reply_to, encode(frame))

        pump = asyncio.create_task(pump_call(handler(call.endpoint, call.payload), send))
        probe = asyncio.create_task(self._probe_caller(call.reply_to, pump))
        try:
            await pump
        finally:
            probe.cancel()
            pump.cancel()  # no-op once done; on a Cancel frame it stops the handler

    async def _probe_caller(self, inbox: str, pump: asyncio.Task[None]) -> None:
        """Cancel `pump` once the caller's inbox is gone (its process died or it dropped the
        call without a Cancel), so the handler's cleanup runs (abort, free KV blocks) instead
        of generating for nobody until max_tokens. Slow or failed probes change nothing."""
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            try:
                await self.nc.request(inbox, encode(KeepAlive()), timeout=10 * KEEPALIVE_INTERVAL_S)
            except nats.errors.NoRespondersError:
                logger.info("caller of a call on %s is gone: cancelling the call", inbox)
                pump.cancel()
                return
            except (nats.errors.Error, TimeoutError, PeerUnavailableError):
                continue

    async def call(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        *,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> AsyncGenerator[bytes, None]:
        inbox = self.nc.new_inbox()
        sub = _NatsSubscription()
        sub.sub = await self.nc.subscribe(inbox, cb=sub.on_msg)
        call_id = uuid.uuid4().hex
        done = False
        try:
            await self._start_call(address, Call(call_id, endpoint, payload, reply_to=inbox))
            async for data in iterate_stream(lambda: _next_data(sub), idle_timeout_s, address):
                yield data
            done = True
        finally:
            if not done and not self._lost and not self._closed:
                with contextlib.suppress(Exception):
                    await self.nc.publish(address, encode(Cancel(call_id)))
            await sub.unsubscribe()

    async def _start_call(self, address: str, call: Call) -> None:
        """Send the call as a NATS request: the server's Accept is the reply, and NATS
        answers "no responders" at once when nobody serves `address`."""
        try:
            reply = await self.nc.request(address, encode(call), timeout=DEFAULT_CONNECT_TIMEOUT_S)
        except nats.errors.NoRespondersError as exc:
            raise PeerUnavailableError(f"no service at {address}") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise PeerUnavailableError(f"no answer from {address}") from exc
        except nats.errors.Error as exc:
            raise PeerUnavailableError(f"call to {address} failed: {exc}") from exc
        if not isinstance(decode_stream(reply.data), Accept):
            raise TransportError(f"{address} answered a call without accepting it")


async def _next_data(sub: _NatsSubscription) -> bytes:
    return (await sub.next()).data
