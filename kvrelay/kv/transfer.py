"""KV block transfer: the wire format, its checks, and the `Transport` protocol.

A transfer moves runs of consecutive prompt blocks for one request from a prefill engine to
a decode engine. Each run is a small typed header (`RunHeader`, msgpack) followed by the
run's raw KV bytes, block-major: block j of the run occupies bytes
[j * bytes_per_block, (j + 1) * bytes_per_block) laid out as `KVLayout.block_shape`
(num_layers, 2 = K/V, num_kv_heads, block_size, head_dim) in the engine's dtype, native
(little-endian) byte order. An `EndHeader` closes a transfer; an `AbortHeader` fails it.

Every run is checked on arrival — layout, byte length, XXH3-64 checksum of the payload, and
that the runs are contiguous — and a run that fails is never handed on: the inbox raises a
typed `TransferError` instead. Pure Python (msgspec, xxhash), no torch, no sockets: the
in-process and TCP transports live in `inproc_transport.py` and `tcp_transport.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import xxhash

from kvrelay.errors import CorruptTransferError, TransferError, TransferTimeoutError

logger = logging.getLogger(__name__)

Payload = bytes | bytearray | memoryview
MAX_HEADER_BYTES = 4 << 20  # a run header lists its block hashes: ~9 bytes per block
MAX_RUN_BYTES = 2 << 30
DEFAULT_TIMEOUT_S = 10.0  # silence from the peer longer than this fails the transfer


class KVLayout(msgspec.Struct, frozen=True):
    """Shape and dtype of one KV block as the engine stores it; both sides must agree."""

    dtype: str  # "float32", "bfloat16", ...
    itemsize: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """(num_layers, 2, num_kv_heads, block_size, head_dim): one block's bytes, in order."""
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return (
            2
            * self.num_layers
            * self.num_kv_heads
            * self.block_size
            * self.head_dim
            * (self.itemsize)
        )


class RunHeader(msgspec.Struct, tag="run", frozen=True):
    """Precedes `num_bytes` raw payload bytes: blocks [first_block, first_block + n) of the
    request's prompt, n = len(block_hashes)."""

    request_id: str
    first_block: int
    block_hashes: list[int]
    layout: KVLayout
    num_bytes: int
    checksum: int  # XXH3-64 of the payload (`checksum()`)
    version: int = 1  # of this format


class EndHeader(msgspec.Struct, tag="end", frozen=True):
    """The transfer is complete: `num_blocks` blocks were sent in all."""

    request_id: str
    num_blocks: int


class AbortHeader(msgspec.Struct, tag="abort", frozen=True):
    """The sender gave up (its prefill failed or was cancelled); the reason says why."""

    request_id: str
    reason: str


Header = RunHeader | EndHeader | AbortHeader

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def encode_header(header: Header) -> bytes:
    return _encoder.encode(header)


def decode_header(data: Payload) -> Header:
    """Decode one header; malformed bytes raise CorruptTransferError."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptTransferError(f"malformed transfer header: {exc}") from None


def checksum(payload: Payload) -> int:
    """XXH3-64 of the payload: ~20 GB/s, so verifying costs a fraction of moving the bytes
    (zlib's CRC-32 runs at ~3 GB/s, slower than a loopback copy)."""
    return xxhash.xxh3_64_intdigest(payload)


def checksummer() -> xxhash.xxh3_64:
    """An incremental `checksum`: `update()` slices as they arrive, then `intdigest()`."""
    return xxhash.xxh3_64()


def run_header(
    request_id: str,
    first_block: int,
    block_hashes: Sequence[int],
    layout: KVLayout,
    payload: Payload,
) -> RunHeader:
    """The header for a payload, checked against the layout (a sender-side bug otherwise)."""
    num_bytes = memoryview(payload).nbytes
    if num_bytes != len(block_hashes) * layout.bytes_per_block:
        raise TransferError(
            f"payload of {num_bytes} bytes does not hold {len(block_hashes)} blocks of "
            f"{layout.bytes_per_block} bytes"
        )
    return RunHeader(
        request_id, first_block, list(block_hashes), layout, num_bytes, checksum(payload)
    )


def check_run_header(header: RunHeader, layout: KVLayout, next_block: int) -> None:
    """Reject a run before reading its payload: wrong layout, length or position."""
    if header.layout != layout:
        raise CorruptTransferError(
            f"request {header.request_id}: run layout {header.layout} differs from the "
            f"receiver's {layout}"
        )
    expected = len(header.block_hashes) * layout.bytes_per_block
    if header.num_bytes != expected or not 0 < header.num_bytes <= MAX_RUN_BYTES:
        raise CorruptTransferError(
            f"request {header.request_id}: run claims {header.num_bytes} bytes for "
            f"{len(header.block_hashes)} blocks ({expected} expected)"
        )
    if next_block >= 0 and header.first_block != next_block:
        raise CorruptTransferError(
            f"request {header.request_id}: run starts at block {header.first_block}, "
            f"expected {next_block} (runs must be contiguous)"
        )


def check_payload(header: RunHeader, payload: Payload, digest: int | None = None) -> None:
    """Length and checksum of a received payload (`digest` when computed while receiving)."""
    num_bytes = memoryview(payload).nbytes
    if num_bytes != header.num_bytes:
        raise CorruptTransferError(
            f"request {header.request_id}: run truncated at {num_bytes} of {header.num_bytes} bytes"
        )
    actual = checksum(payload) if digest is None else digest
    if actual != header.checksum:
        raise CorruptTransferError(
            f"request {header.request_id}: checksum mismatch on blocks from "
            f"{header.first_block} ({actual:#018x} != {header.checksum:#018x})"
        )


@dataclass(frozen=True, slots=True)
class BlockRun:
    """Verified KV of consecutive prompt blocks [first_block, first_block + n).

    A received payload may live in a pooled buffer: call `release()` once its bytes have
    been copied out (e.g. after `EngineCore.import_kv`) so the next run reuses the memory;
    the payload must not be read after that. Not releasing is safe, only slower.
    """

    request_id: str
    first_block: int
    block_hashes: list[int]
    payload: memoryview  # block-major bytes, see the module docstring
    on_release: Callable[[], None] | None = None

    def release(self) -> None:
        if self.on_release is not None:
            self.on_release()


class KVSendStream(Protocol):
    """One request's outgoing transfer. `send` may return before the bytes are on the wire
    (the transport pipelines); `finish` waits until everything was sent and raises the
    first error. The stream takes ownership of each run: it calls `run.release()` once the
    payload is no longer needed (after writing it, or, in-process, after the receiver's
    consumer has imported it) — do not modify the payload after `send`.
    """

    async def send(self, run: BlockRun) -> None:
        """Queue a run of consecutive blocks (runs must be sent in block order; the run's
        request id is not used, the stream's is)."""
        ...

    async def finish(self) -> None:
        """Send the end marker and wait for every queued run to be sent."""
        ...

    async def abort(self, reason: str) -> None:
        """Tell the receiver the transfer failed; drops runs not yet sent."""
        ...


class Transport(Protocol):
    """Moves KV block runs between engines. A receiver `start`s and publishes its address,
    registers an inbox per request with `expect` *before* asking a peer to send, then
    reads verified runs from it; a sender `open`s a stream to that address."""

    async def start(self) -> str:
        """Start receiving; returns the address peers send to."""
        ...

    def expect(self, request_id: str, layout: KVLayout) -> Inbox:
        """Register the inbox for one request's incoming transfer."""
        ...

    async def open(
        self,
        address: str,
        request_id: str,
        layout: KVLayout,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> KVSendStream:
        """Open a stream to the receiver at `address` for one request."""
        ...

    async def close(self) -> None:
        """Stop receiving and fail every open inbox."""
        ...


@dataclass(frozen=True, slots=True)
class _End:
    num_blocks: int


class Inbox:
    """Where one request's verified runs arrive, in order; shared by every transport.

    Producers call `put_run` / `put_end` / `put_error` from the inbox's event loop or from
    any thread; the consumer awaits `next_run`, which returns None once the transfer ended
    and raises the first error (or a timeout) — runs after an error are dropped.
    """

    def __init__(self, request_id: str, layout: KVLayout) -> None:
        self.request_id = request_id
        self.layout = layout
        self.num_blocks = 0  # blocks delivered to the consumer so far
        self.next_block = -1  # first_block the next run must have (-1: not known yet)
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[BlockRun | _End | TransferError] = asyncio.Queue()
        self._done = False
        self._on_close: list[Callable[[], object]] = []
        self._lock = threading.Lock()  # closed / _on_close: transports call in from threads

    def _put(self, item: BlockRun | _End | TransferError) -> None:
        if self.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._queue.put_nowait(item)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def put_run(self, run: BlockRun) -> None:
        self.next_block = run.first_block + len(run.block_hashes)
        self._put(run)

    def put_end(self, num_blocks: int) -> None:
        self._put(_End(num_blocks))

    def put_error(self, error: TransferError) -> None:
        self._put(error)

    def on_close(self, callback: Callable[[], object]) -> None:
        """Call `callback` when the inbox closes (the transport drops it and its socket);
        at once if it is closed already. Any thread."""
        with self._lock:
            if not self.closed:
                self._on_close.append(callback)
                return
        callback()

    async def next_run(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> BlockRun | None:
        """The next verified run, or None when the transfer is complete."""
        if self._done:
            return None
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            self.close()
            raise TransferTimeoutError(
                f"request {self.request_id}: no KV from the sender for {timeout_s:g} s "
                f"after {self.num_blocks} blocks"
            ) from None
        return self._take(item)

    def _take(self, item: BlockRun | _End | TransferError) -> BlockRun | None:
        if isinstance(item, TransferError):
            self.close()
            raise item
        if isinstance(item, _End):
            self._done = True
            self.close()
            if item.num_blocks != self.num_blocks:
                raise CorruptTransferError(
                    f"request {self.request_id}: sender ended after {item.num_blocks} blocks, "
                    f"{self.num_blocks} arrived"
                )
            return None
        self.num_blocks += len(item.block_hashes)
        return item

    async def runs(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> AsyncIterator[BlockRun]:
        """Every run until the end marker; `timeout_s` bounds each wait."""
        while (run := await self.next_run(timeout_s)) is not None:
            yield run

    def close(self) -> None:
        """Stop taking runs (idempotent); the transport drops the inbox and its connection."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()
