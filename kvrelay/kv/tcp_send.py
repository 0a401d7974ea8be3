"""The sending half of a TCP KV transfer (format: see `kv.tcp_transport`).

Owns `TcpSendStream`: the pipelined stream whose frames a dedicated writer thread puts on
the socket with blocking `sendall`s (each slice bounded by the timeout), so a payload costs
what a plain `sendall` costs and runs follow each other without an event-loop hop. Pure
Python (sockets, threads); no torch. Imports `kv.send_stream`, `kv.transfer` and `errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import struct
import threading
from typing import Any

from kvrelay.errors import TransferError, TransferTimeoutError
from kvrelay.kv.send_stream import PipelinedSendStream
from kvrelay.kv.transfer import BlockRun, EndHeader, Header, KVLayout, encode_header

logger = logging.getLogger(__name__)

ACK = b"\x01"  # the receiver's answer to an EndHeader
FRAME_LEN = struct.Struct("<I")  # the length prefix of every header
_SEND_SLICE = 4 << 20  # sendall's timeout covers one slice
_MAX_FRAMES_IN_THREAD = 2  # frames handed to the writer thread and not yet written

_Frame = tuple[bytes, BlockRun | None, bool]  # header frame, run, wait for the ACK after


class TcpSendStream(PipelinedSendStream):
    """One request's frames over one connection, written by the stream's own thread."""

    def __init__(
        self, sock: socket.socket, request_id: str, layout: KVLayout, timeout_s: float
    ) -> None:
        super().__init__(request_id, layout, timeout_s)
        sock.settimeout(timeout_s)  # blocking, each call bounded: used by the thread only
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._frames: queue.SimpleQueue[_Frame | None] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(_MAX_FRAMES_IN_THREAD)
        self._done: asyncio.Future[TransferError | None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._write_forever, name="kv-send", daemon=True)
        self._thread.start()

    async def _write(self, header: Header, run: BlockRun | None) -> None:
        """Hand a frame to the writer thread (waiting while it has enough queued)."""
        if self._room.locked():
            acquire = asyncio.ensure_future(self._room.acquire())
            either: set[asyncio.Future[Any]] = {acquire, self._done}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                acquire.cancel()
        else:
            await self._room.acquire()
        if self._done.done():
            raise self._done.result() or TransferError(f"{self.request_id}: writer stopped")
        data = encode_header(header)
        frame = FRAME_LEN.pack(len(data)) + data
        self._frames.put((frame, run, isinstance(header, EndHeader)))

    async def _close(self) -> TransferError | None:
        self._frames.put(None)
        error = await self._done
        self._sock.close()
        return error

    # -- the writer thread -----------------------------------------------------------------
    def _write_forever(self) -> None:
        error: TransferError | None = None
        try:
            while (item := self._frames.get()) is not None:
                self._write_frame(*item)
                self._call(self._room.release)
        except TimeoutError:
            error = TransferTimeoutError(
                f"request {self.request_id}: receiver stalled for {self.timeout_s:g} s"
            )
        except OSError as exc:
            error = TransferError(f"request {self.request_id}: connection lost: {exc!r}")
        except TransferError as exc:
            error = exc
        finally:
            self._call(self._resolve, error)

    def _write_frame(self, frame: bytes, run: BlockRun | None, wait_ack: bool) -> None:
        self._sock.sendall(frame)
        if run is not None:
            view = run.payload
            for start in range(0, view.nbytes, _SEND_SLICE):
                self._sock.sendall(view[start : start + _SEND_SLICE])
            run.release()  # the bytes are in the socket: the buffer may be reused
        if wait_ack and self._sock.recv(1) != ACK:
            raise TransferError(f"request {self.request_id}: the receiver rejected the transfer")

    def _resolve(self, error: TransferError | None) -> None:
        if not self._done.done():
            self._done.set_result(error)

    def _call(self, fn: object, *args: object) -> None:
        """Run `fn(*args)` on the stream's event loop (from the writer thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]
