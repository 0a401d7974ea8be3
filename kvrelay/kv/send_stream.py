"""The pipelined sending half of a KV transfer, shared by the in-process and TCP transports.

Owns `PipelinedSendStream`: checksumming, ordering checks, a bounded queue of runs and the
writer task that puts them on the wire. Pure asyncio; no torch, no sockets (subclasses do
the writing). Imports only `kv.transfer` and `errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kvrelay.errors import TransferError
from kvrelay.kv.transfer import (
    AbortHeader,
    BlockRun,
    EndHeader,
    Header,
    KVLayout,
    run_header,
)

logger = logging.getLogger(__name__)

_THREAD_CHECKSUM_BYTES = 4 << 20  # smaller payloads are checksummed on the event loop


class PipelinedSendStream:
    """`KVSendStream` skeleton both transports share: `send` checksums a run (in a thread when
    large, so the loop keeps moving bytes) and queues it; one writer task puts queued runs
    on the wire in order, so checksumming run i+1 overlaps writing run i. Subclasses
    implement `_write` (a header and, for a run, the run) and `_close`."""

    def __init__(
        self, request_id: str, layout: KVLayout, timeout_s: float, max_queued_runs: int = 4
    ) -> None:
        self.request_id = request_id
        self.layout = layout
        self.timeout_s = timeout_s
        self.num_blocks = 0
        self.num_bytes = 0
        self._next_block = -1
        self._queue: asyncio.Queue[tuple[Header, BlockRun | None] | None] = asyncio.Queue(
            max_queued_runs
        )
        self._error: TransferError | None = None
        self._ended = False
        self._writer = asyncio.get_running_loop().create_task(self._pump())

    async def _write(self, header: Header, run: BlockRun | None) -> None:
        raise NotImplementedError

    async def _close(self) -> TransferError | None:
        """Release the connection once everything queued was written; the error that
        stopped the writing, if any."""
        raise NotImplementedError

    async def send(self, run: BlockRun) -> None:
        self._check_open()
        first_block, block_hashes = run.first_block, run.block_hashes
        if self._next_block >= 0 and first_block != self._next_block:
            raise TransferError(
                f"request {self.request_id}: run at block {first_block} after block "
                f"{self._next_block - 1}; runs must be sent in block order"
            )
        view = run.payload
        if view.nbytes >= _THREAD_CHECKSUM_BYTES:
            header = await asyncio.to_thread(
                run_header, self.request_id, first_block, block_hashes, self.layout, view
            )
        else:
            header = run_header(self.request_id, first_block, block_hashes, self.layout, view)
        self._next_block = first_block + len(block_hashes)
        self.num_blocks += len(block_hashes)
        self.num_bytes += view.nbytes
        await self._enqueue((header, run))

    async def finish(self) -> None:
        self._check_open()
        self._ended = True
        await self._enqueue((EndHeader(self.request_id, self.num_blocks), None))
        await self._enqueue(None)
        await self._writer
        if self._error is not None:
            raise self._error

    async def abort(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        while not self._queue.empty():  # drop queued runs: they will not be used
            item = self._queue.get_nowait()
            if item is not None and item[1] is not None:
                item[1].release()
        with contextlib.suppress(TransferError):
            await self._enqueue((AbortHeader(self.request_id, reason), None))
            await self._enqueue(None)
        await self._writer

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._ended:
            raise TransferError(f"request {self.request_id}: stream already finished")

    async def _enqueue(self, item: tuple[Header, BlockRun | None] | None) -> None:
        """Queue an item, or raise the writer's error if it stopped (even while waiting)."""
        if not self._writer.done():
            if self._queue.full():
                put = asyncio.ensure_future(self._queue.put(item))
                await asyncio.wait({put, self._writer}, return_when=asyncio.FIRST_COMPLETED)
                if put.done():
                    return
                put.cancel()
            else:
                self._queue.put_nowait(item)
                return
        if self._error is not None:
            raise self._error
        raise TransferError(f"request {self.request_id}: stream closed")

    async def _pump(self) -> None:
        try:
            while (item := await self._queue.get()) is not None:
                await self._write(*item)
        except TransferError as exc:
            self._error = exc
            logger.warning("KV send for %s failed: %s", self.request_id, exc)
        except Exception as exc:  # a socket error: fail the stream, never the caller's loop
            self._error = TransferError(f"request {self.request_id}: send failed: {exc!r}")
            logger.warning("KV send for %s failed: %r", self.request_id, exc)
        finally:
            error = await self._close()
            if self._error is None and error is not None:
                self._error = error
                logger.warning("KV send for %s failed: %s", self.request_id, error)
