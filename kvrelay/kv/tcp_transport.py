"""TCP KV transfer: one connection per request, runs streamed as raw bytes after a header.

Wire format of a connection (sender -> receiver), repeated until an end or abort frame:

    u32 little-endian header length | msgpack header (`kv.transfer.Header`) | payload bytes

A `RunHeader` is followed by exactly `num_bytes` payload bytes; `EndHeader` and
`AbortHeader` by none. After an `EndHeader` the receiver answers one byte (`ACK`) so the
sender's `finish()` confirms delivery.

The data path stays off the event loop: each connection has one thread on each side doing
blocking socket calls with a timeout (`recv_into` a pooled buffer, feeding the checksum
slice by slice while the bytes are hot in cache; `sendall` of the payload's memoryview), and
hands runs to the inbox thread-safely. Per-run hops through the loop and an executor cost
milliseconds on a busy host and halved the rate; a thread per live transfer is cheap. No
copies besides the kernel's, no per-element loops, nothing is pickled. A connection that
ends early, a wrong length or checksum, or a silence longer than the timeout fails the
request's inbox with a typed `TransferError`; the connection is then closed.

Owns `TcpTransport` (receiving side and `open`); the sending stream is `kv.tcp_send`. Pure
Python (sockets, threads, numpy buffers); no torch. Imports `kv.transfer`, `kv.buffers`,
`kv.tcp_send` and `errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from urllib.parse import urlsplit

import xxhash

from kvrelay.errors import CorruptTransferError, TransferError, TransferTimeoutError
from kvrelay.kv.buffers import BufferPool
from kvrelay.kv.tcp_send import ACK, FRAME_LEN, TcpSendStream
from kvrelay.kv.transfer import (
    DEFAULT_TIMEOUT_S,
    MAX_HEADER_BYTES,
    AbortHeader,
    BlockRun,
    EndHeader,
    Header,
    Inbox,
    KVLayout,
    Transport,
    check_payload,
    check_run_header,
    checksummer,
    decode_header,
)

logger = logging.getLogger(__name__)

SCHEME = "tcp"
_RECV_SLICE = 4 << 20  # bytes per recv_into; the checksum is fed slice by slice

__all__ = ["ACK", "SCHEME", "TcpSendStream", "TcpTransport", "parse_address"]


def parse_address(address: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port)."""
    parts = urlsplit(address)
    if parts.scheme != SCHEME or not parts.hostname or parts.port is None:
        raise TransferError(f"expected a KV receiver address tcp://host:port, got {address!r}")
    return parts.hostname, parts.port


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
        self._lock = threading.Lock()  # _inboxes and _connections, shared with threads
        self._connections: dict[socket.socket, threading.Thread] = {}

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
        with self._lock:
            if request_id in self._inboxes:
                raise TransferError(f"request {request_id}: a transfer is already expected")
            inbox = Inbox(request_id, layout)
            self._inboxes[request_id] = inbox
        inbox.on_close(lambda: self._forget(request_id, inbox))
        return inbox

    def _forget(self, request_id: str, inbox: Inbox) -> None:
        with self._lock:
            if self._inboxes.get(request_id) is inbox:
                del self._inboxes[request_id]

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
            raise TransferError(f"cannot reach KV receiver {address}: {exc!r}") from None
        return TcpSendStream(sock, request_id, layout, timeout_s)

    async def close(self) -> None:
        """Stop listening, fail every open inbox and drop every connection."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            inboxes, connections = list(self._inboxes.values()), dict(self._connections)
        for inbox in inboxes:
            inbox.put_error(TransferError(f"KV receiver {self.address} closed"))
            inbox.close()
        for conn, thread in connections.items():
            _shutdown(conn)
            await asyncio.to_thread(thread.join, self.timeout_s)

    # -- receiving -------------------------------------------------------------------------
    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.settimeout(self.timeout_s)  # blocking, each call bounded: used by a thread
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-recv", daemon=True)
            with self._lock:
                self._connections[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        """(thread) Read one request's frames into its inbox until the end, an abort or a
        failure, then close the connection."""
        reader = _Reader(conn, self.buffers, self.timeout_s)
        inbox: Inbox | None = None
        try:
            while (header := reader.header(allow_eof=inbox is None)) is not None:
                if inbox is None:
                    inbox = self._bind(header, conn)
                if header.request_id != inbox.request_id:
                    raise CorruptTransferError(
                        f"connection for {inbox.request_id} sent a frame for {header.request_id}"
                    )
                if not self._handle(header, inbox, reader, conn):
                    break
        except TransferError as exc:
            if inbox is not None and not inbox.closed:
                logger.warning("KV receive failed: %s", exc)
                inbox.put_error(exc)
        finally:
            conn.close()
            with self._lock:
                self._connections.pop(conn, None)

    def _bind(self, header: Header, conn: socket.socket) -> Inbox:
        with self._lock:
            inbox = self._inboxes.get(header.request_id)
        if inbox is None or inbox.closed:
            raise TransferError(f"request {header.request_id}: no transfer expected here")
        inbox.on_close(lambda: _shutdown(conn))  # the consumer gave up: unblock the thread
        return inbox

    def _handle(self, header: Header, inbox: Inbox, reader: _Reader, conn: socket.socket) -> bool:
        """Apply one frame; False when the connection is done."""
        if isinstance(header, EndHeader):
            with contextlib.suppress(OSError):  # before the consumer can close the socket
                conn.sendall(ACK)
            inbox.put_end(header.num_blocks)
            return False
        if isinstance(header, AbortHeader):
            reason = f"request {header.request_id}: sender aborted: {header.reason}"
            inbox.put_error(TransferError(reason))
            return False
        check_run_header(header, inbox.layout, inbox.next_block)
        payload, give_back = self.buffers.take(header.num_bytes)
        try:
            digest = reader.payload_into(payload)
            check_payload(header, payload, digest)
        except BaseException:
            give_back()
            raise
        inbox.put_run(
            BlockRun(header.request_id, header.first_block, header.block_hashes, payload, give_back)
        )
        return True


def _is_transport(transport: TcpTransport) -> Transport:  # mypy checks the protocol here
    return transport


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Reader:
    """Exact-size blocking reads; each `recv_into` waits at most the socket's timeout."""

    def __init__(self, conn: socket.socket, buffers: BufferPool, timeout_s: float) -> None:
        self._conn = conn
        self._buffers = buffers
        self._timeout_s = timeout_s

    def header(self, allow_eof: bool) -> Header | None:
        """The next frame's header; None on a clean EOF where one is allowed."""
        size = bytearray(FRAME_LEN.size)
        if self._read_into(memoryview(size), eof_ok=allow_eof) == 0:
            return None
        (length,) = FRAME_LEN.unpack(size)
        if not 0 < length <= MAX_HEADER_BYTES:
            raise CorruptTransferError(f"transfer header of {length} bytes")
        data = bytearray(length)
        self._read_into(memoryview(data))
        return decode_header(data)

    def payload_into(self, buf: memoryview) -> int:
        """Fill `buf` with the run's payload; its checksum, computed on the way in."""
        digest = checksummer()
        self._read_into(buf, digest)
        return digest.intdigest()

    def _read_into(
        self, view: memoryview, digest: xxhash.xxh3_64 | None = None, eof_ok: bool = False
    ) -> int:
        """Fill `view` (feeding `digest` as it goes); returns the byte count."""
        got, total = 0, view.nbytes
        while got < total:
            try:
                n = self._conn.recv_into(view[got : got + _RECV_SLICE])
            except TimeoutError:
                raise TransferTimeoutError(
                    f"sender silent for {self._timeout_s:g} s ({got} of {total} bytes read)"
                ) from None
            except OSError as exc:
                raise CorruptTransferError(f"connection lost: {exc!r}") from None
            if n == 0:
                if eof_ok and got == 0:
                    return 0
                raise CorruptTransferError(f"stream truncated after {got} of {total} bytes")
            if digest is not None:
                digest.update(view[got : got + n])
            got += n
        return got
