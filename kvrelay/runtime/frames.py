"""Frames of the runtime's own wire protocol and length-prefixed framing over asyncio streams.

Owns: the msgspec frame types (calls, stream frames, hub pub/sub) and `read_frame` /
`write_frame`, and the call pump / stream reader both backends share. Frames are msgpack;
nothing is ever unpickled. Imports L0 (errors) and `runtime.base`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import msgspec

from kvrelay.errors import PeerUnavailableError, RemoteError, TransportError
from kvrelay.runtime.base import KEEPALIVE_INTERVAL_S

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20
_LEN = struct.Struct(">I")


class Call(msgspec.Struct, tag="call", frozen=True):
    """Start a streaming call. reply_to is used by message-bus backends only."""

    call_id: str
    endpoint: str
    payload: bytes
    reply_to: str = ""


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    call_id: str


class Accept(msgspec.Struct, tag="accept", frozen=True):
    """The server took the call (lets bus backends detect a missing server quickly)."""


class Data(msgspec.Struct, tag="data", frozen=True):
    data: bytes


class End(msgspec.Struct, tag="end", frozen=True):
    pass


class Fail(msgspec.Struct, tag="fail", frozen=True):
    message: str


class KeepAlive(msgspec.Struct, tag="ka", frozen=True):
    pass


class Sub(msgspec.Struct, tag="sub", frozen=True):
    sid: int
    pattern: str


class Unsub(msgspec.Struct, tag="unsub", frozen=True):
    sid: int


class Pub(msgspec.Struct, tag="pub", frozen=True):
    subject: str
    data: bytes


class Msg(msgspec.Struct, tag="msg", frozen=True):
    sid: int
    subject: str
    data: bytes


StreamFrame = Accept | Data | End | Fail | KeepAlive
CallFrame = Call | Cancel
HubFrame = Sub | Unsub | Pub | Msg

_stream_decoder = msgspec.msgpack.Decoder(StreamFrame)
_call_decoder = msgspec.msgpack.Decoder(CallFrame)
_hub_decoder = msgspec.msgpack.Decoder(HubFrame)
_encoder = msgspec.msgpack.Encoder()


def encode(frame: msgspec.Struct) -> bytes:
    return _encoder.encode(frame)


def decode_stream(data: bytes) -> StreamFrame:
    try:
        return _stream_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise TransportError(f"malformed stream frame: {exc}") from exc


def decode_call(data: bytes) -> CallFrame:
    try:
        return _call_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise TransportError(f"malformed call frame: {exc}") from exc


def decode_hub(data: bytes) -> HubFrame:
    try:
        return _hub_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise TransportError(f"malformed hub frame: {exc}") from exc


def frame_bytes(frame: msgspec.Struct) -> bytes:
    """The length-prefixed wire form of one frame."""
    body = _encoder.encode(frame)
    return _LEN.pack(len(body)) + body


async def write_frame(writer: asyncio.StreamWriter, frame: msgspec.Struct) -> None:
    writer.write(frame_bytes(frame))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One frame's body; PeerUnavailableError on EOF or a reset connection."""
    try:
        header = await reader.readexactly(_LEN.size)
        (size,) = _LEN.unpack(header)
        if size > MAX_FRAME_BYTES:
            raise TransportError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise PeerUnavailableError("connection closed by peer") from exc


Send = Callable[[msgspec.Struct], Awaitable[None]]


async def pump_call(frames: AsyncGenerator[bytes, None], send: Send) -> None:
    """Server side of one call: send Data per frame, then End, or Fail on an exception.

    A KeepAlive goes out whenever the handler is silent for KEEPALIVE_INTERVAL_S so the
    caller can tell a slow request from a dead server. Cancelling this coroutine closes
    `frames`, which runs the handler's `finally` (e.g. abort the request, free its blocks).
    """
    lock = asyncio.Lock()
    last_sent = [time.monotonic()]

    async def locked_send(frame: msgspec.Struct) -> None:
        async with lock:
            await send(frame)
            last_sent[0] = time.monotonic()

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S / 2)
            if time.monotonic() - last_sent[0] >= KEEPALIVE_INTERVAL_S:
                await locked_send(KeepAlive())

    ticker = asyncio.create_task(keepalive())
    try:
        async for item in frames:
            await locked_send(Data(item))
        await locked_send(End())
    except (PeerUnavailableError, ConnectionError):
        logger.debug("caller went away mid-call")
    except Exception as exc:
        logger.exception("handler failed")
        with contextlib.suppress(PeerUnavailableError, ConnectionError):
            await locked_send(Fail(f"{type(exc).__name__}: {exc}"))
    finally:
        ticker.cancel()
        await frames.aclose()


async def iterate_stream(
    next_frame: Callable[[], Awaitable[bytes]], idle_timeout_s: float, peer: str
) -> AsyncGenerator[bytes, None]:
    """Client side: yield Data payloads until End; Fail -> RemoteError; silence or a
    closed connection -> PeerUnavailableError."""
    while True:
        try:
            raw = await asyncio.wait_for(next_frame(), idle_timeout_s)
        except TimeoutError as exc:
            raise PeerUnavailableError(f"{peer} silent for {idle_timeout_s:.1f}s") from exc
        frame = decode_stream(raw)
        if isinstance(frame, Data):
            yield frame.data
        elif isinstance(frame, End):
            return
        elif isinstance(frame, Fail):
            raise RemoteError(f"{peer}: {frame.message}")
