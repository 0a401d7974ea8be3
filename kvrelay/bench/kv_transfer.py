"""KV transfer bandwidth: the TCP transfer path against a raw loopback socket copy.

Owns the reusable measurements behind `benchmarks/kv_transfer.py` (and the transfer part of
the disaggregation benchmark): `measure_raw_loopback` (a child process `sendall`s the bytes,
this one `recv_into`s a preallocated buffer: the upper bound), `measure_tcp_transfer` (a
child process streams the same bytes as block runs through `TcpTransport`: headers,
XXH3 checksums on both sides, fresh receive buffers, the end acknowledgement) and
`measure_engine_copy` (the runner's gather into / scatter from a block-major payload).
Each transfer is timed in this process from the "go" sent to the sender until the last byte
is in (raw) or the inbox has verified the end (TCP), and both processes report the CPU time
they spent (CPU nanoseconds per byte on each side: what the path costs, independent of
neighbours on a shared host). torch is imported only by `measure_engine_copy`.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import numpy as np

from kvrelay.kv.tcp_transport import TcpTransport
from kvrelay.kv.transfer import BlockRun, KVLayout

# SmolLM2-135M (the default model) in float32: 30 layers x 3 KV heads x 64 dims, 16 tokens
SMOLLM2_LAYOUT = KVLayout(
    dtype="float32", itemsize=4, num_layers=30, num_kv_heads=3, block_size=16, head_dim=64
)


@dataclass(frozen=True)
class TransferBenchConfig:
    """How much KV to move, in runs of how many blocks, how many times."""

    total_mb: int = 256
    run_blocks: int = 16  # blocks per run: one prefill chunk of 256 tokens
    repeats: int = 3
    layout: KVLayout = field(default_factory=lambda: SMOLLM2_LAYOUT)

    @property
    def num_blocks(self) -> int:
        return max(1, (self.total_mb << 20) // self.layout.bytes_per_block)

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block


@dataclass(frozen=True)
class TransferSample:
    """One transfer: wall seconds (receiver side) and each side's CPU seconds."""

    seconds: float
    sender_cpu_s: float
    receiver_cpu_s: float


def _payload(num_bytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(0).integers(0, 256, num_bytes, dtype=np.uint8)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# -- raw loopback -----------------------------------------------------------------------------
def _raw_sender(port: int, num_bytes: int, go: Connection) -> None:
    data = _payload(num_bytes).data
    with socket.create_connection(("127.0.0.1", port)) as sock:
        go.send("ready")
        go.recv()
        cpu0 = time.process_time()
        sock.sendall(data)
        go.send(time.process_time() - cpu0)


def measure_raw_loopback(num_bytes: int, repeats: int) -> list[TransferSample]:
    """Copies of `num_bytes` over a plain loopback TCP socket into a pre-faulted buffer."""
    out = np.zeros(num_bytes, dtype=np.uint8)
    out.fill(1)  # fault the pages in: the bound should not pay for them
    view = out.data
    samples = []
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as server:
            ours, theirs = mp.Pipe()
            child = mp.get_context("spawn").Process(
                target=_raw_sender, args=(server.getsockname()[1], num_bytes, theirs)
            )
            child.start()
            conn, _ = server.accept()
            assert ours.recv() == "ready"
            t0, cpu0 = _clocks()
            ours.send("go")
            got = 0
            while got < num_bytes:
                got += conn.recv_into(view[got:], num_bytes - got) or _eof(got, num_bytes)
            t1, cpu1 = _clocks()
            samples.append(TransferSample(t1 - t0, ours.recv(), cpu1 - cpu0))
            conn.close()
            child.join()
    return samples


def _eof(got: int, total: int) -> int:
    raise RuntimeError(f"raw sender closed after {got} of {total} bytes")


# -- the TCP transfer path ----------------------------------------------------------------------
def _tcp_sender(address: str, config: TransferBenchConfig, go: Connection) -> None:
    asyncio.run(_tcp_send(address, config, go))


async def _tcp_send(address: str, config: TransferBenchConfig, go: Connection) -> None:
    data = _payload(config.num_bytes).data
    bpb, n = config.layout.bytes_per_block, config.num_blocks
    go.send("ready")
    await asyncio.to_thread(go.recv)
    cpu0 = time.process_time()
    stream = await TcpTransport().open(address, "bench", config.layout, timeout_s=60)
    for first in range(0, n, config.run_blocks):
        last = min(n, first + config.run_blocks)
        payload = data[first * bpb : last * bpb]
        await stream.send(BlockRun("bench", first, list(range(first, last)), payload))
    await stream.finish()
    go.send(time.process_time() - cpu0)


async def _tcp_receive_once(rx: TcpTransport, config: TransferBenchConfig) -> TransferSample:
    inbox = rx.expect("bench", config.layout)
    ours, theirs = mp.Pipe()
    child = mp.get_context("spawn").Process(target=_tcp_sender, args=(rx.address, config, theirs))
    child.start()
    assert await asyncio.to_thread(ours.recv) == "ready"
    t0, cpu0 = _clocks()
    ours.send("go")
    num_bytes = 0
    async for run in inbox.runs(timeout_s=60):
        num_bytes += run.payload.nbytes
        run.release()  # as a decode worker does once the run is imported
    t1, cpu1 = _clocks()
    assert num_bytes == config.num_bytes
    sender_cpu = await asyncio.to_thread(ours.recv)
    await asyncio.to_thread(child.join)
    return TransferSample(t1 - t0, sender_cpu, cpu1 - cpu0)


async def _tcp_receive(config: TransferBenchConfig, warmup: bool) -> list[TransferSample]:
    rx = TcpTransport(timeout_s=60)
    await rx.start()
    try:
        if warmup:  # a long-lived receiver's buffer pool is warm; the raw bound's buffer too
            await _tcp_receive_once(rx, config)
        return [await _tcp_receive_once(rx, config) for _ in range(config.repeats)]
    finally:
        await rx.close()


def measure_tcp_transfer(config: TransferBenchConfig, warmup: bool = True) -> list[TransferSample]:
    """Transfers of `config.num_bytes` through one `TcpTransport` receiver, end to end (after
    one untimed transfer that warms its buffer pool, unless `warmup` is False)."""
    return asyncio.run(_tcp_receive(config, warmup))


# -- engine gather / scatter ----------------------------------------------------------------------
def measure_engine_copy(layout: KVLayout, num_blocks: int, repeats: int = 3) -> dict[str, float]:
    """GB/s of `KVCache.read_blocks` into a reused host buffer (export gather) and
    `write_blocks` from it (import scatter), for `num_blocks` scattered blocks of a cache
    twice that size, on CPU (best of `repeats`, after the first use faulted the buffer)."""
    import torch

    from kvrelay.engine.runner.attention import KVCache
    from kvrelay.engine.runner.model_runner import parse_dtype

    dtype = parse_dtype(layout.dtype)
    cache = KVCache(layout.num_layers, 2 * num_blocks, layout.block_size,
                    layout.num_kv_heads, layout.head_dim, dtype, torch.device("cpu"))  # fmt: skip
    cache.data.normal_()
    ids = torch.randperm(2 * num_blocks)[:num_blocks]
    staging = torch.empty(num_blocks, *layout.block_shape, dtype=dtype)
    read, write = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        cache.read_blocks(ids, out=staging)
        t1 = time.perf_counter()
        cache.write_blocks(ids, staging)
        read.append(t1 - t0)
        write.append(time.perf_counter() - t1)
    num_bytes = num_blocks * layout.bytes_per_block
    return {
        "num_bytes": num_bytes,
        "export_gb_s": num_bytes / min(read[1:]) / 1e9,
        "import_gb_s": num_bytes / min(write[1:]) / 1e9,
        "export_first_gb_s": num_bytes / read[0] / 1e9,  # into fresh (page-faulting) memory
    }


def _summary(num_bytes: int, samples: list[TransferSample]) -> dict[str, Any]:
    rates = [num_bytes / s.seconds / 1e9 for s in samples]
    return {
        "samples": [asdict(s) for s in samples],
        "wall_gb_s": rates,
        "median_gb_s": statistics.median(rates),
        "best_gb_s": max(rates),
        "sender_cpu_ns_per_byte": statistics.median(s.sender_cpu_s for s in samples)
        * 1e9
        / num_bytes,
        "receiver_cpu_ns_per_byte": statistics.median(s.receiver_cpu_s for s in samples)
        * 1e9
        / num_bytes,
    }


def run_transfer_benchmark(config: TransferBenchConfig) -> dict[str, Any]:
    """Raw and TCP-path transfers, interleaved so machine noise hits both alike."""
    raw_samples: list[TransferSample] = []
    tcp_samples: list[TransferSample] = []
    one = TransferBenchConfig(config.total_mb, config.run_blocks, 1, config.layout)
    for _ in range(config.repeats):
        raw_samples += measure_raw_loopback(config.num_bytes, 1)
        tcp_samples += measure_tcp_transfer(one)
    raw, tcp = _summary(config.num_bytes, raw_samples), _summary(config.num_bytes, tcp_samples)
    return {
        "config": {
            **asdict(config),
            "layout": msgspec.to_builtins(config.layout),
            "num_blocks": config.num_blocks,
            "num_bytes": config.num_bytes,
            "bytes_per_block": config.layout.bytes_per_block,
        },
        "raw_loopback": raw,
        "tcp_transfer": tcp,
        "ratio_median": tcp["median_gb_s"] / raw["median_gb_s"],
        "ratio_best": tcp["best_gb_s"] / raw["best_gb_s"],
    }
