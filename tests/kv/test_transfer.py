"""KV transfer plane: round trips over both transports, and every way a transfer can go wrong
(corrupt, truncated, mislabelled, out of order, aborted, a sender that dies or stalls, a
receiver that stalls) ends in a typed TransferError, never in a run handed on."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
import numpy as np
import pytest

from kvrelay.errors import (
    CorruptTransferError,
    TransferError,
    TransferTimeoutError,
)
from kvrelay.kv.inproc_transport import InProcessHub, InProcessTransport
from kvrelay.kv.tcp_transport import ACK, TcpTransport, parse_address
from kvrelay.kv.transfer import (
    BlockRun,
    EndHeader,
    Inbox,
    KVLayout,
    RunHeader,
    Transport,
    checksum,
    decode_header,
    encode_header,
    run_header,
)

LAYOUT = KVLayout(
    dtype="float32", itemsize=4, num_layers=2, num_kv_heads=2, block_size=4, head_dim=8
)
BPB = LAYOUT.bytes_per_block  # 512


def blocks(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n * BPB, dtype=np.uint8).tobytes()


def mkrun(
    first: int, hashes: list[int], data: bytes, release: Callable[[], None] | None = None
) -> BlockRun:
    return BlockRun("ignored", first, hashes, memoryview(data), release)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))


@asynccontextmanager
async def pair(kind: str, timeout_s: float = 5.0) -> AsyncIterator[tuple[Transport, Transport]]:
    if kind == "tcp":
        rx_tcp, tx_tcp = TcpTransport(timeout_s=timeout_s), TcpTransport(timeout_s=timeout_s)
        await rx_tcp.start()
        yield rx_tcp, tx_tcp
        await rx_tcp.close()
        return
    hub = InProcessHub()
    rx, tx = InProcessTransport(hub), InProcessTransport(hub)
    await rx.start()
    yield rx, tx
    await rx.close()


async def collect(inbox: Inbox, timeout_s: float = 5.0) -> list[BlockRun]:
    return [r async for r in inbox.runs(timeout_s)]


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_round_trip_in_order_and_byte_exact(kind: str) -> None:
    async def body() -> None:
        async with pair(kind) as (rx, tx):
            address = await rx.start()
            inbox = rx.expect("r1", LAYOUT)
            sizes = [1, 3, 64, 2]  # the 64-block run (32 KiB) is checksummed in one go
            payloads = [blocks(n, seed=i) for i, n in enumerate(sizes)]
            stream = await tx.open(address, "r1", LAYOUT)
            receiving = asyncio.create_task(collect(inbox))
            first = 5
            for i, (n, data) in enumerate(zip(sizes, payloads, strict=True)):
                await stream.send(mkrun(first, [1000 * i + j for j in range(n)], data))
                first += n
            await stream.finish()
            runs = await receiving
            assert [r.first_block for r in runs] == [5, 6, 9, 73]
            assert [bytes(r.payload) for r in runs] == payloads
            assert runs[2].block_hashes == [2000 + j for j in range(64)]
            assert inbox.closed and inbox.num_blocks == sum(sizes)
            assert {r.request_id for r in runs} == {"r1"}

    run(body)


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_payload_buffers_are_released(kind: str) -> None:
    """TCP: the sender releases a run once written, the receiver's pool reuses released
    buffers. In-process: the payload itself travels, and the consumer's release is the
    sender's."""

    async def body() -> None:
        async with pair(kind) as (rx, tx):
            released: list[int] = []
            inbox = rx.expect("r", LAYOUT)
            stream = await tx.open(await rx.start(), "r", LAYOUT)
            for i in range(3):
                await stream.send(mkrun(i, [i], blocks(1, i), lambda i=i: released.append(i)))
            await stream.finish()
            runs = await collect(inbox)
            if kind == "tcp":
                assert released == [0, 1, 2]
                assert isinstance(rx, TcpTransport)
                first = runs[0].payload
                runs[0].release()
                runs[0].release()  # idempotent
                buf, _ = rx.buffers.take(BPB)
                assert buf.obj is first.obj  # reused
            else:
                assert released == []
                for r in runs:
                    r.release()
                assert released == [0, 1, 2]

    run(body)


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_large_run_round_trip(kind: str) -> None:
    async def body() -> None:
        async with pair(kind) as (rx, tx):
            inbox = rx.expect("big", LAYOUT)
            data = blocks(8192)  # 4 MiB: checksummed in a thread, received in slices
            stream = await tx.open(await rx.start(), "big", LAYOUT)
            receiving = asyncio.create_task(collect(inbox))
            await stream.send(mkrun(0, list(range(8192)), data))
            await stream.finish()
            (got,) = await receiving
            assert got.payload.nbytes == len(data) and bytes(got.payload) == data

    run(body)


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_abort_fails_the_inbox(kind: str) -> None:
    async def body() -> None:
        async with pair(kind) as (rx, tx):
            inbox = rx.expect("r", LAYOUT)
            stream = await tx.open(await rx.start(), "r", LAYOUT)
            await stream.send(mkrun(0, [1], blocks(1)))
            await asyncio.sleep(0.05)  # let the run go out; abort drops runs still queued
            await stream.abort("prefill cancelled")
            assert (await inbox.next_run()) is not None  # the verified run before the abort
            with pytest.raises(TransferError, match="prefill cancelled"):
                await inbox.next_run()

    run(body)


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_sender_rejects_bad_runs(kind: str) -> None:
    async def body() -> None:
        async with pair(kind) as (rx, tx):
            rx.expect("r", LAYOUT)
            stream = await tx.open(await rx.start(), "r", LAYOUT)
            with pytest.raises(TransferError, match="does not hold"):
                await stream.send(mkrun(0, [1, 2], blocks(1)))
            await stream.send(mkrun(0, [1], blocks(1)))
            with pytest.raises(TransferError, match="block order"):
                await stream.send(mkrun(3, [4], blocks(1)))
            await stream.abort("done")

    run(body)


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
def test_receiver_times_out_when_nothing_arrives(kind: str) -> None:
    async def body() -> None:
        async with pair(kind) as (rx, _):
            inbox = rx.expect("r", LAYOUT)
            with pytest.raises(TransferTimeoutError):
                await inbox.next_run(timeout_s=0.2)
            assert inbox.closed
            rx.expect("r", LAYOUT)  # a closed inbox frees the request id

    run(body)


def test_inproc_detects_corrupt_payload() -> None:
    async def body() -> None:
        async with pair("inproc") as (rx, _):
            assert isinstance(rx, InProcessTransport)
            inbox = rx.expect("r", LAYOUT)
            header = run_header("r", 0, [1, 2], LAYOUT, blocks(2))
            bad = bytearray(blocks(2))
            bad[700] ^= 1
            with pytest.raises(CorruptTransferError, match="checksum"):
                rx.deliver(header, mkrun(0, [1, 2], bytes(bad)))
            with pytest.raises(CorruptTransferError, match="checksum"):
                await inbox.next_run()

    run(body)


# -- TCP, with hand-made frames ---------------------------------------------------------------
def frame(header: RunHeader | EndHeader) -> bytes:
    data = encode_header(header)
    return len(data).to_bytes(4, "little") + data


async def raw_send(address: str, *chunks: bytes, close: bool = True) -> socket.socket:
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    sock = socket.create_connection((host, port))
    sock.setblocking(False)
    for chunk in chunks:
        await loop.sock_sendall(sock, chunk)
    if close:
        sock.close()
    return sock


async def tcp_receive_error(*chunks: bytes, wait_s: float = 5.0) -> TransferError:
    rx = TcpTransport()
    address = await rx.start()
    try:
        inbox = rx.expect("r", LAYOUT)
        await raw_send(address, *chunks)
        with pytest.raises(TransferError) as info:
            await collect(inbox, wait_s)
        return info.value
    finally:
        await rx.close()


def good_run(first: int = 0, n: int = 2, **changes: object) -> tuple[RunHeader, bytes]:
    data = blocks(n, seed=first)
    header = run_header("r", first, list(range(first, first + n)), LAYOUT, data)
    return msgspec.structs.replace(header, **changes), data


def test_tcp_detects_corrupt_payload() -> None:
    header, data = good_run()
    bad = bytearray(data)
    bad[-1] ^= 0x80

    async def body() -> None:
        err = await tcp_receive_error(frame(header), bytes(bad))
        assert isinstance(err, CorruptTransferError) and "checksum" in str(err)

    run(body)


def test_tcp_detects_truncated_payload_and_missing_end() -> None:
    header, data = good_run()

    async def body() -> None:
        err = await tcp_receive_error(frame(header), data[:100])
        assert isinstance(err, CorruptTransferError) and "truncated" in str(err)
        err = await tcp_receive_error(frame(header), data)  # complete run, then EOF
        assert isinstance(err, CorruptTransferError) and "truncated" in str(err)
        err = await tcp_receive_error(frame(header), data, frame(EndHeader("r", 5)))
        assert isinstance(err, CorruptTransferError) and "ended after 5 blocks" in str(err)

    run(body)


def test_tcp_rejects_mislabelled_runs_before_reading_them() -> None:
    async def body() -> None:
        other = msgspec.structs.replace(LAYOUT, dtype="bfloat16", itemsize=2)
        header, data = good_run(layout=other)
        err = await tcp_receive_error(frame(header), data)
        assert "layout" in str(err)
        header, data = good_run(num_bytes=BPB * 3)
        err = await tcp_receive_error(frame(header), data)
        assert "claims" in str(err)
        first, d1 = good_run(0, 2)
        gap, d2 = good_run(3, 1)
        err = await tcp_receive_error(frame(first), d1, frame(gap), d2)
        assert "contiguous" in str(err)
        # a malformed header names no request: the connection is dropped, the inbox waits
        err = await tcp_receive_error(b"\x05\x00\x00\x00garbage", wait_s=0.3)
        assert isinstance(err, TransferTimeoutError)

    run(body)


def test_tcp_sender_that_stalls_times_out_the_receiver() -> None:
    header, data = good_run(n=64)

    async def body() -> None:
        rx = TcpTransport(timeout_s=0.3)
        address = await rx.start()
        inbox = rx.expect("r", LAYOUT)
        sock = await raw_send(address, frame(header), data[:1000], close=False)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            await collect(inbox, timeout_s=5.0)
        assert time.monotonic() - t0 < 2.0
        sock.close()
        await rx.close()

    run(body)


SENDER_SCRIPT = textwrap.dedent(
    """
    import socket, sys, time
    host, port, data = sys.argv[1], int(sys.argv[2]), sys.stdin.buffer.read()
    sock = socket.create_connection((host, port))
    sock.sendall(data)
    print("sent", flush=True)
    time.sleep(60)
    """
)


def test_tcp_sender_process_killed_mid_transfer() -> None:
    header, data = good_run(n=64)
    partial = frame(header) + data[: len(data) // 2]

    async def body() -> None:
        rx = TcpTransport(timeout_s=30.0)
        address = await rx.start()
        inbox = rx.expect("r", LAYOUT)
        host, port = parse_address(address)
        proc = subprocess.Popen(
            [sys.executable, "-c", SENDER_SCRIPT, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(partial)
        proc.stdin.close()
        assert await asyncio.to_thread(proc.stdout.readline) == b"sent\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with pytest.raises(CorruptTransferError, match="truncated"):
            await collect(inbox, timeout_s=5.0)
        await rx.close()

    run(body)


def test_tcp_sender_errors() -> None:
    async def body() -> None:
        tx = TcpTransport()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        # a receiver that accepts and never reads: the sender times out
        stream = await tx.open(f"tcp://127.0.0.1:{port}", "r", LAYOUT, timeout_s=0.3)
        await stream.send(mkrun(0, list(range(131072)), blocks(131072)))  # 64 MiB
        with pytest.raises(TransferTimeoutError):
            await stream.finish()
        listener.close()
        with pytest.raises(TransferError, match="cannot reach"):
            await tx.open(f"tcp://127.0.0.1:{port}", "r", LAYOUT, timeout_s=1.0)
        # a receiver that expects nothing: the transfer is not acknowledged
        rx = TcpTransport()
        stream = await tx.open(await rx.start(), "unknown", LAYOUT)
        await stream.send(mkrun(0, [1], blocks(1)))
        with pytest.raises(TransferError):
            await stream.finish()
        await rx.close()

    run(body)


def test_header_codec_and_checksum() -> None:
    header, data = good_run(n=3)
    assert decode_header(encode_header(header)) == header
    assert header.checksum == checksum(data) == checksum(data[:7] + data[7:])
    assert header.block_hashes == [0, 1, 2]
    big = 2**64 - 1  # block hashes are unsigned 64-bit
    h = msgspec.structs.replace(header, block_hashes=[big, 0, 1])
    assert decode_header(encode_header(h)).block_hashes[0] == big
    assert ACK == b"\x01"


def test_inproc_sender_on_another_thread_and_loop() -> None:
    """An engine thread with its own event loop sends; the receiver's loop gets the runs."""
    import threading

    async def body() -> None:
        hub = InProcessHub()
        rx = InProcessTransport(hub)
        address = await rx.start()
        inbox = rx.expect("r", LAYOUT)

        async def send_all() -> None:
            stream = await InProcessTransport(hub).open(address, "r", LAYOUT)
            for i in range(5):
                await stream.send(mkrun(i, [i], blocks(1, i)))
            await stream.finish()

        thread = threading.Thread(target=lambda: asyncio.run(send_all()))
        thread.start()
        runs = await collect(inbox)
        thread.join()
        assert [bytes(r.payload) for r in runs] == [blocks(1, i) for i in range(5)]

    run(body)
