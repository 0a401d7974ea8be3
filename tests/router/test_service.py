"""RouterService over the embedded runtime with fake-engine workers: dumps on joining and on
an event-id gap, routing that follows the workers' caches, ledger rows that predict exactly
what the engine realizes, block-size mismatches refused loudly, restarts and departures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import pytest

from kvrelay.errors import ServiceUnavailableError
from kvrelay.kv.events import KVEventBatch
from kvrelay.kv.hashing import hash_blocks
from kvrelay.observe.ledger import LedgerRow
from kvrelay.protocol import GenerateRequest, RequestOutput, SamplingParams
from kvrelay.router.policy import RouterPolicy
from kvrelay.router.service import RouterConfig, RouterService
from kvrelay.runtime import make_runtime
from kvrelay.runtime.discovery import DiscoveryWatcher
from kvrelay.runtime.embedded import EmbeddedHub
from kvrelay.worker.service import WorkerIdentity, WorkerService
from tests.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio
BS = 16


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class LossyEngine(FakeEngine):
    """Loses the next `drop` event batches (their ids are used up: the next one is a gap)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = 0

    def take_kv_events(self) -> KVEventBatch | None:
        batch = super().take_kv_events()
        if batch is not None and self.drop:
            self.drop -= 1
            return None
        return batch


@dataclass
class Cluster:
    router: RouterService
    engines: dict[str, LossyEngine]
    services: dict[str, WorkerService]


@contextlib.asynccontextmanager
async def cluster(
    num_workers: int = 2,
    config: RouterConfig | None = None,
    warm: dict[str, list[int]] | None = None,
) -> AsyncIterator[Cluster]:
    """Workers w0..w{n-1}; `warm` prompts are cached before the router exists."""
    hub = EmbeddedHub()
    url = await hub.start()
    engines, services = {}, {}
    for i in range(num_workers):
        wid = f"w{i}"
        engine = LossyEngine()
        if warm and wid in warm:
            engine._store_prefix(warm[wid])
            engine.take_kv_events()  # published before anyone listened
        rt = make_runtime(url)
        await rt.start()
        services[wid] = WorkerService(rt, engine, WorkerIdentity(wid, "fake", block_size=BS))
        await services[wid].start()
        engines[wid] = engine
    rt = make_runtime(url)
    await rt.start()
    watcher = DiscoveryWatcher(rt)
    router = RouterService(rt, watcher, config)
    await router.start()
    await watcher.start()
    await watcher.wait_for(num_workers, timeout_s=3)
    try:
        yield Cluster(router, engines, services)
    finally:
        await router.close()
        await watcher.close()
        for service in services.values():
            await service.shutdown(drain_timeout_s=0.5)
        await rt.close()
        await hub.close()


async def until(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def prompt(seed: int, num_tokens: int) -> list[int]:
    return [3 + (seed * 7919 + i * 31) % 500 for i in range(num_tokens)]


def synced(c: Cluster) -> bool:
    """The router's index equals every engine's cache (after events and dumps landed)."""
    for wid, engine in c.engines.items():
        view = c.router.worker_view(wid)
        if view is None or view["awaiting_dump"] or view["num_dumps_applied"] < 1:
            return False
        if view["num_indexed_blocks"] != len(engine.cached):
            return False
    return True


async def generate_on(c: Cluster, worker: str, tokens: list[int], rid: str) -> int:
    """Run a request on one worker, bypassing the router; returns its cached tokens."""
    service = c.services[worker]
    assert service.loop is not None
    request = GenerateRequest(
        request_id=rid, prompt_token_ids=tokens, sampling=SamplingParams(max_tokens=1)
    )
    out = await asyncio.wait_for(service.loop.submit(request).get(), 3)
    assert isinstance(out, RequestOutput)
    return out.num_cached_tokens


async def serve(
    c: Cluster, tokens: list[int], rid: str, policy: RouterPolicy | None = None
) -> LedgerRow:
    """Route, run on the chosen worker, close the ticket, wait for the index to catch up."""
    ticket = c.router.ticket(rid, "fake", tokens, workload="test", policy=policy)
    worker = c.router.route(ticket, list(c.engines))
    num_cached = await generate_on(c, worker, tokens, rid)
    c.router.on_first_token(ticket)
    row = c.router.finish(ticket, num_cached)
    assert row is not None and row.request_id == rid
    await until(lambda: synced(c))
    return row


async def test_a_new_worker_is_dumped_and_routing_follows_its_cache() -> None:
    warm = prompt(1, 10 * BS)
    async with cluster(warm={"w1": warm}) as c:
        await until(lambda: synced(c))
        assert c.router.worker_view("w1")["num_indexed_blocks"] == 10  # type: ignore[index]
        row = await serve(c, warm + prompt(2, 3), "r1")
        assert row.worker_id == "w1" and row.route_reason == "best_overlap"
        assert row.num_predicted_tokens == row.num_realized_tokens == 10 * BS
        assert row.lost_stale_index_tokens == 0 and row.num_unpredicted_hit_tokens == 0
        c.router.check_integrity()


async def test_an_event_gap_is_healed_by_a_dump() -> None:
    async with cluster() as c:
        await until(lambda: synced(c))
        lost, seen = prompt(3, 6 * BS), prompt(4, 6 * BS)
        c.engines["w0"].drop = 1
        await generate_on(c, "w0", lost, "lost")  # its BlockStored batch never arrives
        await asyncio.sleep(0.1)
        assert c.router.worker_view("w0")["num_indexed_blocks"] == 0  # type: ignore[index]
        await generate_on(c, "w0", seen, "seen")  # the next batch reveals the gap
        await until(lambda: synced(c))
        view = c.router.worker_view("w0")
        assert view is not None and view["num_gaps"] == 1 and view["num_dumps_applied"] == 2
        row = await serve(c, lost, "again")
        assert row.worker_id == "w0" and row.route_reason == "best_overlap"
        assert row.num_predicted_tokens == row.num_realized_tokens == 5 * BS


async def test_block_size_mismatch_is_refused_with_a_clear_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with cluster(config=RouterConfig(block_size=32)) as c:
        view = c.router.worker_view("w0")
        assert view is not None and not view["routable"] and view["router_block_size"] == 32
        ticket = c.router.ticket("r", "fake", prompt(7, 100))
        with pytest.raises(ServiceUnavailableError, match="block size other than the router's"):
            c.router.route(ticket, ["w0", "w1"])
    assert "block size 16 but the router hashes prompts in blocks of 32" in caplog.text


async def test_restart_resets_a_worker_and_departure_drops_it() -> None:
    warm = prompt(8, 4 * BS)
    async with cluster(warm={"w0": warm}) as c:
        await until(lambda: synced(c))
        info = c.router.watcher.get("w0")
        assert info is not None
        restarted = msgspec.structs.replace(info, instance_id="new")
        c.engines["w0"].cached.clear()  # the new instance starts cold
        c.router.on_worker_change("w0", restarted)
        view = c.router.worker_view("w0")
        assert view is not None and view["num_indexed_blocks"] == 0
        c.router.on_worker_change("w0", None)
        assert c.router.worker_view("w0") is None
        ticket = c.router.ticket("r", "fake", warm)
        assert c.router.route(ticket, ["w0", "w1"]) == "w1"
        c.router.check_integrity()


async def test_ticket_hashes_once_and_release_frees_the_load() -> None:
    async with cluster() as c:
        await until(lambda: synced(c))
        tokens = prompt(9, 5 * BS + 1)
        ticket = c.router.ticket("r", "fake", tokens, workload="Code Review!")
        assert ticket.workload == "code_review_"
        c.router.route(ticket, ["w0"])
        assert ticket.block_hashes == hash_blocks(tokens, BS)
        assert c.router.worker_view("w0")["num_requests"] == 1  # type: ignore[index]
        c.router.route(ticket, ["w1"])  # a retry elsewhere releases the first choice
        assert c.router.worker_view("w0")["num_requests"] == 0  # type: ignore[index]
        c.router.release(ticket)
        assert c.router.worker_view("w1")["num_requests"] == 0  # type: ignore[index]
        assert ticket.decision is None and c.router.finish(ticket, 0) is None
        c.router.check_integrity()
