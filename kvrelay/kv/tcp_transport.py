"""TCP KV transfer: one connection per request, runs streamed as raw bytes after a header.

Wire format of a connection (sender -> receiver), repeated until an end or abort frame:

    u32 little-endian header length | msgpack header (`kv.transfer.Header`) | payload bytes

A `RunHeader` is followed by exactly `num_bytes` payload bytes; `EndHeader` and
`AbortHeader` by none. After an `EndHeader` the receiver answers one byte (`ACK`) so the
sender's `finish()` confirms delivery. The receiver reads each payload straight into a
pooled buffer with `sock_recv_into` and updates the checksum slice by slice while the bytes
are hot in cache; the sender hands its memoryview to `sock_sendall` in slices (no copies, no
per-element loops, nothing is pickled). A connection that ends early, a wrong length or
checksum, or a silence longer than the timeout fails the request's inbox with a typed
`TransferError`; the connection is then closed.

Owns `TcpTransport` and its send stream. Pure Python (asyncio sockets, numpy for
uninitialised buffers); no torch. Imports `kv.transfer`, `kv.send_stream` and `errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import xxhash

from kvrelay.errors import (
    CorruptTransferError,
    PeerUnavailableError,
    TransferError,
    TransferTimeoutError,
)
from kvrelay.kv.send_stream import PipelinedSendStream
from kvrelay.kv.transfer import (
    DEFAULT_TIMEOUT_S,
    MAX_HEADER_BYTES,
    AbortHeader,
    BlockRun,
    EndHeader,
    Header,
    Inbox,
    KVLayout,
    Payload,
    RunHeader,
    check_payload,
    check_run_header,
    checksummer,
    decode_header,
    encode_header,
)

logger = logging.getLogger(__name__)

SCHEME = "tcp"
ACK = b"\x01"
_LEN = struct.Struct("<I")
_RECV_SLICE = 1 << 18  # checksum each slice right after it lands, while it is in cache
_SEND_SLICE = 4 << 20  # the send timeout restarts after each slice


def parse_address(address: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port)."""
    parts = urlsplit(address)
    if parts.scheme != SCHEME or not parts.hostname or parts.port is None:
        raise PeerUnavailableError(f"expected tcp://host:port, got {address!r}")
    return parts.hostname, parts.port


class BufferPool:
    """Receive buffers, reused once their run is released.

    A fresh buffer costs a page fault per 4 KiB page on first touch, which on some hosts
    (VMs, sandboxes) is several times the cost of copying the bytes into it: a receiver
    that allocated per run ran at a fifth of loopback speed. Buffers are kept up to
    `max_bytes` in all; a request for n bytes takes the smallest free buffer of n to 2n.
    Thread-safe: runs are often released from the engine's thread.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: list[np.ndarray[Any, np.dtype[np.uint8]]] = []
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, num_bytes: int) -> tuple[memoryview, Callable[[], None]]:
        """A buffer of exactly `num_bytes` and the callback that gives it back (once)."""
        with self._lock:
            fits = [b for b in self._free if num_bytes <= b.nbytes <= 2 * num_bytes]
            buf = min(fits, key=lambda b: b.nbytes) if fits else None
            if buf is not None:
                self._free = [b for b in self._free if b is not buf]
                self._free_bytes -= buf.nbytes
        if buf is None:
            buf = np.empty(num_bytes, dtype=np.uint8)
        return buf.data.cast("B")[:num_bytes], functools.partial(self._give, buf, [False])

    def _give(self, buf: np.ndarray[Any, np.dtype[np.uint8]], given: list[bool]) -> None:
        with self._lock:
            if not given[0] and self._free_bytes + buf.nbytes <= self.max_bytes:
                self._free.append(buf)
                self._free_bytes += buf.nbytes
            given[0] = True


class TcpTransport:
    """`Transport` over TCP. `host` is where the receiver listens (loopback by default;
    a routable address for multi-host); `timeout_s` bounds every silence of a peer."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.buffers = BufferPool()
        self.address = ""
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._inboxes: dict[str, Inbox] = {}
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        if self._listener is not None:
            return self.address
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        host, port = sock.getsockname()[:2]
        self.address = f"{SCHEME}://{host}:{port}"
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever(sock))
        logger.info("KV transfer receiver on %s", self.address)
        return self.address

    def expect(self, request_id: str, layout: KVLayout) -> Inbox:
        if request_id in self._inboxes:
            raise TransferError(f"request {request_id}: a transfer is already expected")
        inbox = Inbox(request_id, layout)
        self._inboxes[request_id] = inbox
        inbox.on_close(lambda: self._inboxes.pop(request_id, None))
        return inbox

    async def open(
        self,
        address: str,
        request_id: str,
        layout: KVLayout,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TcpSendStream:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout_s):
                await loop.sock_connect(sock, (host, port))
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise PeerUnavailableError(f"cannot reach KV receiver {address}: {exc!r}") from None
        return TcpSendStream(sock, request_id, layout, timeout_s)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for inbox in list(self._inboxes.values()):
            inbox.put_error(TransferError(f"KV receiver {self.address} closed"))
            inbox.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # -- receiving -------------------------------------------------------------------------
    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """Read one request's frames into its inbox until the end, an abort or a failure."""
        reader = _Reader(conn, self.timeout_s, self.buffers)
        inbox: Inbox | None = None
        try:
            while True:
                header = await reader.header(allow_eof=inbox is None)
                if header is None:
                    return
                if inbox is None:
                    inbox = self._bind(header, conn)
                if header.request_id != inbox.request_id:
                    raise CorruptTransferError(
                        f"connection for {inbox.request_id} sent a frame for {header.request_id}"
                    )
                if not await self._handle(header, inbox, reader, conn):
                    return
        except TransferError as exc:
            logger.warning("KV receive failed: %s", exc)
            if inbox is not None:
                inbox.put_error(exc)
        except asyncio.CancelledError:
            pass  # the inbox closed (consumer gave up) or the transport shut down
        finally:
            conn.close()

    def _bind(self, header: Header, conn: socket.socket) -> Inbox:
        inbox = self._inboxes.get(header.request_id)
        if inbox is None or inbox.closed:
            raise TransferError(f"request {header.request_id}: no transfer expected here")
        task = asyncio.current_task()
        if task is not None:
            inbox.on_close(task.cancel)
        return inbox

    async def _handle(
        self, header: Header, inbox: Inbox, reader: _Reader, conn: socket.socket
    ) -> bool:
        """Apply one frame; False when the connection is done."""
        if isinstance(header, EndHeader):
            inbox.put_end(header.num_blocks)
            with contextlib.suppress(OSError):
                conn.send(ACK)
            return False
        if isinstance(header, AbortHeader):
            inbox.put_error(TransferError(f"request {header.request_id}: sender aborted: "
                                          f"{header.reason}"))  # fmt: skip
            return False
        check_run_header(header, inbox.layout, inbox.next_block)
        payload, digest, give_back = await reader.payload(header)
        try:
            check_payload(header, payload, digest)
        except TransferError:
            give_back()
            raise
        run = BlockRun(header.request_id, header.first_block, header.block_hashes, payload)
        inbox.put_run(dataclasses.replace(run, on_release=give_back))
        return True


class _Reader:
    """Exact-size reads from a non-blocking socket; the timeout restarts on every progress."""

    def __init__(self, conn: socket.socket, timeout_s: float, buffers: BufferPool) -> None:
        self._conn = conn
        self._timeout_s = timeout_s
        self._buffers = buffers
        self._loop = asyncio.get_running_loop()

    async def header(self, allow_eof: bool) -> Header | None:
        """The next frame's header; None on a clean EOF where one is allowed."""
        size = bytearray(_LEN.size)
        got = await self._read_into(memoryview(size), eof_ok=allow_eof)
        if got == 0:
            return None
        (length,) = _LEN.unpack(size)
        if not 0 < length <= MAX_HEADER_BYTES:
            raise CorruptTransferError(f"transfer header of {length} bytes")
        data = bytearray(length)
        await self._read_into(memoryview(data))
        return decode_header(data)

    async def payload(self, header: RunHeader) -> tuple[memoryview, int, Callable[[], None]]:
        """The run's payload in a pooled buffer, its checksum computed on the way in, and
        the callback that returns the buffer to the pool."""
        buf, give_back = self._buffers.take(header.num_bytes)
        digest = checksummer()
        try:
            await self._read_into(buf, digest)
        except BaseException:
            give_back()
            raise
        return buf, digest.intdigest(), give_back

    async def _read_into(
        self, view: memoryview, digest: xxhash.xxh3_64 | None = None, eof_ok: bool = False
    ) -> int:
        """Fill `view` (feeding `digest` as it goes); returns the byte count."""
        got, total = 0, view.nbytes
        try:
            async with asyncio.timeout(self._timeout_s) as deadline:
                while got < total:
                    n = await self._recv(view[got : got + _RECV_SLICE])
                    if n == 0:
                        if eof_ok and got == 0:
                            return 0
                        raise CorruptTransferError(f"stream truncated after {got} of {total} bytes")
                    if digest is not None:
                        digest.update(view[got : got + n])
                    got += n
                    deadline.reschedule(self._loop.time() + self._timeout_s)
        except TimeoutError:
            raise TransferTimeoutError(
                f"sender silent for {self._timeout_s:g} s ({got} of {total} bytes read)"
            ) from None
        return got

    async def _recv(self, view: memoryview) -> int:
        try:
            return await self._loop.sock_recv_into(self._conn, view)
        except OSError as exc:
            raise CorruptTransferError(f"connection lost: {exc!r}") from None


class TcpSendStream(PipelinedSendStream):
    """One request's frames over one connection; see the module docstring for the format."""

    def __init__(
        self, sock: socket.socket, request_id: str, layout: KVLayout, timeout_s: float
    ) -> None:
        super().__init__(request_id, layout, timeout_s)
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    async def _write(self, header: Header, payload: Payload | None) -> None:
        data = encode_header(header)
        try:
            await self._send(memoryview(_LEN.pack(len(data)) + data))
            if payload is not None:
                await self._send(memoryview(payload).cast("B"))
            if isinstance(header, EndHeader):
                await self._wait_ack()
        except TimeoutError:
            raise TransferTimeoutError(
                f"request {self.request_id}: receiver stalled for {self.timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise PeerUnavailableError(
                f"request {self.request_id}: KV receiver connection lost: {exc!r}"
            ) from None

    async def _send(self, view: memoryview) -> None:
        async with asyncio.timeout(self.timeout_s) as deadline:
            for start in range(0, view.nbytes, _SEND_SLICE):
                await self._loop.sock_sendall(self._sock, view[start : start + _SEND_SLICE])
                deadline.reschedule(self._loop.time() + self.timeout_s)

    async def _wait_ack(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            reply = await self._loop.sock_recv(self._sock, 1)
        if reply != ACK:
            raise TransferError(f"request {self.request_id}: the receiver rejected the transfer")

    async def _close(self) -> None:
        self._sock.close()
