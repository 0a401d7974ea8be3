"""The runtime contract, run against both backends: embedded (loopback hub) and NATS (a real
nats-server). Event plane, request plane (streaming, errors, cancellation, lost peers) and
discovery (heartbeat, leave, TTL expiry)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import pytest

from kvrelay.errors import PeerUnavailableError, RemoteError
from kvrelay.protocol import WorkerInfo
from kvrelay.runtime import Runtime, make_runtime
from kvrelay.runtime.base import Handler, call_once, subject_matches
from kvrelay.runtime.discovery import DiscoveryWatcher, Registrar
from kvrelay.runtime.embedded import EmbeddedHub
from kvrelay.runtime.nats_backend import NatsRuntime
from tests.nats_server import find_nats_server, running_nats_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    if find_nats_server() is None:
        pytest.skip("nats-server binary not installed")
    with running_nats_server() as url:
        yield url


@pytest.fixture(params=["embedded", "nats"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def runtimes(
    backend: str, request: pytest.FixtureRequest, n: int = 2
) -> AsyncIterator[list[Runtime]]:
    hub: EmbeddedHub | None = None
    if backend == "embedded":
        hub = EmbeddedHub()
        url = await hub.start()
    else:
        url = request.getfixturevalue("nats_url")
    started = [make_runtime(url) for _ in range(n)]
    for rt in started:
        await rt.start()
    try:
        yield started
    finally:
        for rt in started:
            await rt.close()
        if hub is not None:
            await hub.close()


def info(worker_id: str, address: str = "x", instance: str = "i1") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        instance_id=instance,
        model="m",
        block_size=16,
        num_kv_blocks=8,
        max_model_len=128,
        address=address,
    )


def test_subject_matching() -> None:
    assert subject_matches("a.b", "a.b")
    assert subject_matches("a.*", "a.b")
    assert not subject_matches("a.*", "a.b.c")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.c")


async def test_publish_subscribe_with_wildcards(
    backend: str, request: pytest.FixtureRequest
) -> None:
    async with runtimes(backend, request) as (a, b):
        sub = await b.subscribe("kvrelay.load.*")
        exact = await b.subscribe("kvrelay.load.w1")
        await asyncio.sleep(0.05)  # subscriptions reach the broker before the publish
        await a.publish("kvrelay.load.w1", b"one")
        await a.publish("kvrelay.other.w1", b"ignored")
        await a.publish("kvrelay.load.w2", b"two")
        got = [await asyncio.wait_for(sub.next(), 2) for _ in range(2)]
        assert [(m.subject, m.data) for m in got] == [
            ("kvrelay.load.w1", b"one"),
            ("kvrelay.load.w2", b"two"),
        ]
        assert (await asyncio.wait_for(exact.next(), 2)).data == b"one"


async def test_streaming_call_and_errors(backend: str, request: pytest.FixtureRequest) -> None:
    async def handler(endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        if endpoint == "boom":
            raise ValueError("bad input")
        for i in range(3):
            yield payload + str(i).encode()

    async with runtimes(backend, request) as (server, client):
        address = await server.serve("svc", handler)
        frames = [f async for f in client.call(address, "echo", b"x")]
        assert frames == [b"x0", b"x1", b"x2"]
        assert await call_once(client, address, "echo", b"y") == b"y0"
        with pytest.raises(RemoteError, match="bad input"):
            async for _ in client.call(address, "boom", b""):
                pass


def counter(cleaned: asyncio.Event) -> Handler:
    """A handler that streams a count for ~1000 s and sets `cleaned` when it is closed."""

    async def handler(endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        try:
            for i in range(100_000):
                yield str(i).encode()
                await asyncio.sleep(0.01)
        finally:
            cleaned.set()

    return handler


async def test_closing_a_call_cancels_the_handler(
    backend: str, request: pytest.FixtureRequest
) -> None:
    cleaned = asyncio.Event()
    async with runtimes(backend, request) as (server, client):
        address = await server.serve("svc", counter(cleaned))
        stream = client.call(address, "count", b"")
        assert await stream.__anext__() == b"0"
        await stream.aclose()
        await asyncio.wait_for(cleaned.wait(), 3)


async def test_a_nats_caller_that_vanishes_cancels_the_handler(
    request: pytest.FixtureRequest,
) -> None:
    """Over NATS the caller's connection dies mid-stream without a Cancel (a frontend killed
    with -9): the server's probes find its inbox gone and the handler's cleanup runs. (With
    the embedded backend the call's own TCP connection closes with the caller.)"""
    cleaned = asyncio.Event()
    async with runtimes("nats", request) as (server, client):
        address = await server.serve("svc", counter(cleaned))
        stream = client.call(address, "count", b"")
        assert await stream.__anext__() == b"0"
        assert isinstance(client, NatsRuntime)
        await client.nc.close()  # no Cancel goes out
        await asyncio.wait_for(cleaned.wait(), 5)


async def test_slow_handler_is_kept_alive(backend: str, request: pytest.FixtureRequest) -> None:
    async def handler(endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        await asyncio.sleep(1.6)  # longer than the idle timeout: keepalives must flow
        yield b"late"

    async with runtimes(backend, request) as (server, client):
        address = await server.serve("svc", handler)
        frames = [f async for f in client.call(address, "slow", b"", idle_timeout_s=1.2)]
        assert frames == [b"late"]


async def test_unreachable_service(backend: str, request: pytest.FixtureRequest) -> None:
    async with runtimes(backend, request, n=1) as (client,):
        address = "tcp://127.0.0.1:9" if backend == "embedded" else "kvrelay.rpc.nobody.x"
        with pytest.raises(PeerUnavailableError):
            async for _ in client.call(address, "generate", b""):
                pass


async def test_discovery_register_leave_and_expire(
    backend: str, request: pytest.FixtureRequest
) -> None:
    async with runtimes(backend, request) as (worker_rt, frontend_rt):
        watcher = DiscoveryWatcher(frontend_rt, ttl_s=0.6)
        await watcher.start()
        changes: list[tuple[str, bool]] = []
        watcher.add_listener(lambda wid, i: changes.append((wid, i is not None)))
        leaving = Registrar(worker_rt, info("w-leave"), heartbeat_s=0.1)
        silent = Registrar(worker_rt, info("w-silent"), heartbeat_s=0.1)
        await leaving.start()
        await silent.start()
        live = await watcher.wait_for(2, timeout_s=3)
        assert sorted(w.worker_id for w in live) == ["w-leave", "w-silent"]
        await leaving.close()  # announces the departure: gone without waiting for the TTL
        await asyncio.sleep(0.2)
        assert [w.worker_id for w in watcher.workers()] == ["w-silent"]
        for task in silent._tasks:  # a crashed worker: heartbeats stop, no leave message
            task.cancel()
        await asyncio.sleep(1.2)
        assert watcher.workers() == []
        assert ("w-silent", False) in changes
        await watcher.close()


async def test_watcher_started_late_learns_workers_by_probe(
    backend: str, request: pytest.FixtureRequest
) -> None:
    async with runtimes(backend, request) as (worker_rt, frontend_rt):
        registrar = Registrar(worker_rt, info("w0"), heartbeat_s=30)  # no beat during the test
        await registrar.start()
        await asyncio.sleep(0.1)
        watcher = DiscoveryWatcher(frontend_rt)
        await watcher.start()
        assert [w.worker_id for w in await watcher.wait_for(1, 3)] == ["w0"]
        await registrar.close()
        await watcher.close()


async def test_embedded_runtime_reports_a_lost_hub() -> None:
    hub = EmbeddedHub()
    url = await hub.start()
    rt = make_runtime(url)
    await rt.start()
    sub = await rt.subscribe("a.b")
    await hub.close()
    with pytest.raises(PeerUnavailableError):
        await asyncio.wait_for(sub.next(), 2)
    assert rt.lost
    await rt.close()


async def test_embedded_runtime_without_a_hub() -> None:
    with pytest.raises(PeerUnavailableError):
        await make_runtime("embedded://127.0.0.1:9").start()


async def test_a_service_is_callable_as_soon_as_serve_returns(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """nats-py can answer a flush before the server has a just-made subscription (its PING
    overtakes the queued SUB); that race failed ~2 in 1000 calls made right after serve()."""

    async def handler(endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        yield payload

    async with runtimes(backend, request) as (server, client):
        for i in range(2000):
            address = await server.serve(f"svc{i}", handler)
            assert await call_once(client, address, "echo", b"x") == b"x"
