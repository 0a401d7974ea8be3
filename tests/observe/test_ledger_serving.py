"""The hit-rate ledger in the request path, against the real stack in-process: the OpenAI app,
the worker pool and its KV-aware router, worker services over the embedded runtime, and real
engines (the tiny Llama, small KV caches). Each loss cause is produced on purpose:
evicting a prompt everywhere -> capacity, a forced round-robin -> routing, lost KV events ->
stale index; and a repeat predicts exactly what the engine realizes. Also the `kvrelay`
request extension, the JSONL request log and the ledger's /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvrelay.config import CacheConfig, EngineConfig
from kvrelay.engine.core import EngineCore
from kvrelay.frontend.app import FrontendConfig, create_app
from kvrelay.frontend.workers import WorkerPool
from kvrelay.kv.events import KVEventBatch
from kvrelay.observe import names
from kvrelay.observe.request_log import RequestLog
from kvrelay.protocol import WorkerInfo
from kvrelay.runtime import make_runtime
from kvrelay.runtime.embedded import EmbeddedHub
from kvrelay.worker.service import WorkerIdentity, WorkerService
from tests.tiny_models import make_tiny_model_dir
from tests.tiny_tokenizer import add_tiny_tokenizer

pytestmark = pytest.mark.anyio
BS = 16
NUM_KV_BLOCKS = 16  # 256 tokens per worker: one long prompt evicts everything else
MODEL = "tiny-llama"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / MODEL
    make_tiny_model_dir(path, kind="llama")
    add_tiny_tokenizer(path)
    return path


class DroppingEngine:
    """A real EngineCore whose KV event batches can be silently lost (`drop = True`)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.max_model_len = core.max_model_len
        self.drop = False

    def take_kv_events(self) -> KVEventBatch | None:
        batch = self.core.take_kv_events()
        return None if self.drop else batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)


@dataclass
class Stack:
    client: httpx.AsyncClient
    pool: WorkerPool
    engines: dict[str, DroppingEngine]
    services: dict[str, WorkerService]
    log_path: Path

    def force(self, worker_id: str | None) -> None:
        """Send the next requests to `worker_id` (None: let the router decide)."""

        def chooser(
            ws: Sequence[WorkerInfo], _inflight: Mapping[str, int], _p: Sequence[int]
        ) -> WorkerInfo | None:
            return next(w for w in ws if w.worker_id == worker_id)

        self.pool.chooser = None if worker_id is None else chooser

    def synced(self) -> bool:
        """Every worker's published events have reached the router (or were dropped)."""
        for wid, service in self.services.items():
            view = self.pool.router.worker_view(wid)
            assert service.loop is not None
            if view is None or view["awaiting_dump"] or view["num_dumps_applied"] < 1:
                return False
            last = service.loop.stats.last_kv_event_id
            if not self.engines[wid].drop and view["last_event_id"] != last:
                return False
        return True

    async def complete(self, prompt: list[int], router: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        body["temperature"] = 0
        if router is not None:
            body["kvrelay"] = {"router": router}
        resp = await self.client.post(
            "/v1/completions", json=body, headers={"x-kvrelay-workload": "tests"}
        )
        assert resp.status_code == 200, resp.text
        await until(self.synced)
        row = resp.json()["kvrelay"]["ledger"]
        assert isinstance(row, dict)
        return row


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def stack(tiny_model: Path, tmp_path: Path, num_workers: int = 2) -> AsyncIterator[Stack]:
    hub = EmbeddedHub()
    url = await hub.start()
    engines, services = {}, {}
    for i in range(num_workers):
        wid = f"w{i}"
        config = EngineConfig(
            model=str(tiny_model),
            num_threads=1,
            cache=CacheConfig(block_size=BS, num_blocks=NUM_KV_BLOCKS),
        )
        engines[wid] = DroppingEngine(EngineCore(config))
        rt = make_runtime(url)
        await rt.start()
        identity = WorkerIdentity(wid, MODEL, block_size=BS, num_kv_blocks=NUM_KV_BLOCKS)
        tokenizer = engines[wid].core.model.tokenizer
        services[wid] = WorkerService(rt, engines[wid], identity, tokenizer)
        await services[wid].start()
    rt = make_runtime(url)
    await rt.start()
    pool = WorkerPool(rt)
    await pool.start()
    await pool.watcher.wait_for(num_workers, timeout_s=3)
    log_path = tmp_path / "requests.jsonl"
    request_log = RequestLog(log_path)
    app = create_app(pool, FrontendConfig(), request_log=request_log)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        s = Stack(client, pool, engines, services, log_path)
        try:
            await until(s.synced)
            yield s
        finally:
            request_log.close()
            await pool.close()
            for service in services.values():
                await service.shutdown(drain_timeout_s=0.5)
            await rt.close()
            await hub.close()


def tokens(seed: int, n: int) -> list[int]:
    return [3 + (seed * 7919 + i * 131) % 500 for i in range(n)]


def assert_funnel(row: dict[str, Any]) -> None:
    f = [row[k] for k in ("num_prompt_tokens", "num_seen_tokens", "num_reachable_tokens")]
    f += [row["num_predicted_tokens"], row["num_realized_tokens"]]
    assert f == sorted(f, reverse=True), row
    losses = ("cold", "capacity", "routing", "stale_index")
    assert sum(row[f"lost_{c}_tokens"] for c in losses) == f[0] - f[4]


async def test_repeat_is_predicted_exactly_and_logged(tiny_model: Path, tmp_path: Path) -> None:
    async with stack(tiny_model, tmp_path) as s:
        prompt = tokens(1, 6 * BS + 5)
        first = await s.complete(prompt)
        assert first["lost_cold_tokens"] == first["num_prompt_tokens"]
        second = await s.complete(prompt)
        assert second["worker_id"] == first["worker_id"]
        assert second["num_predicted_tokens"] == second["num_realized_tokens"] == 6 * BS
        assert second["route_reason"] == "best_overlap" and second["workload"] == "tests"
        for row in (first, second):
            assert_funnel(row)
        metrics = (await s.client.get("/metrics")).text
        lines = [json.loads(line) for line in s.log_path.read_text().splitlines()]
    assert [r["request_id"] for r in lines] == [first["request_id"], second["request_id"]]
    assert lines[1]["num_realized_tokens"] == 6 * BS and lines[1]["outcome"] == "ok"
    labels = f'model="{MODEL}",worker="{first["worker_id"]}",workload="tests"'
    assert f"{names.LEDGER_REALIZED_TOKENS_TOTAL}{{{labels}}} {6 * BS}.0" in metrics
    assert f"{names.LEDGER_PROMPT_TOKENS_TOTAL}{{{labels}}} {2 * (6 * BS + 5)}.0" in metrics
    assert f"{names.REQUEST_HIT_RATIO}_count{{{labels}}} 2.0" in metrics


async def test_evicted_everywhere_is_capacity_loss(tiny_model: Path, tmp_path: Path) -> None:
    async with stack(tiny_model, tmp_path) as s:
        prompt = tokens(2, 5 * BS + 3)
        await s.complete(prompt)
        for i, wid in enumerate(s.engines):  # fill every cache with another long prompt
            s.force(wid)
            await s.complete(tokens(10 + i, 15 * BS))
        s.force(None)
        row = await s.complete(prompt)
    assert_funnel(row)
    assert row["num_seen_tokens"] == 5 * BS  # computed before ...
    assert row["lost_capacity_tokens"] == 5 * BS  # ... but evicted from every worker
    assert row["num_predicted_tokens"] == row["num_realized_tokens"] == 0


async def test_forced_round_robin_is_routing_loss(tiny_model: Path, tmp_path: Path) -> None:
    async with stack(tiny_model, tmp_path) as s:
        prompt = tokens(3, 5 * BS + 3)
        cached_on = (await s.complete(prompt))["worker_id"]
        rows = [await s.complete(prompt, router="round_robin") for _ in range(2)]
    elsewhere = [r for r in rows if r["worker_id"] != cached_on]
    assert elsewhere, "two round-robin turns over two workers visit both"
    row = elsewhere[0]
    assert_funnel(row)
    assert row["policy"] == "round_robin" and row["best_worker_id"] == cached_on
    assert row["lost_routing_tokens"] == 5 * BS and row["num_realized_tokens"] == 0


async def test_lost_events_are_stale_index_loss(tiny_model: Path, tmp_path: Path) -> None:
    async with stack(tiny_model, tmp_path) as s:
        prompt = tokens(4, 5 * BS + 3)
        wid = (await s.complete(prompt))["worker_id"]
        s.engines[wid].drop = True  # from now on this worker's events are lost
        s.force(wid)
        await s.complete(tokens(20, 15 * BS))  # evicts the prompt; nobody hears about it
        s.force(None)
        row = await s.complete(prompt)
    assert_funnel(row)
    assert row["worker_id"] == wid and row["num_predicted_tokens"] == 5 * BS
    assert row["lost_stale_index_tokens"] == 5 * BS and row["num_realized_tokens"] == 0


async def test_unknown_router_override_is_a_400(tiny_model: Path, tmp_path: Path) -> None:
    async with stack(tiny_model, tmp_path, num_workers=1) as s:
        resp = await s.client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": [5, 6, 7], "kvrelay": {"router": "fastest"}},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "kvrelay.router"
    assert "round_robin" in resp.json()["error"]["message"]


async def test_stream_carries_the_row_in_its_last_chunk(tiny_model: Path, tmp_path: Path) -> None:
    async with stack(tiny_model, tmp_path, num_workers=1) as s:
        body = {"model": MODEL, "prompt": tokens(5, 3 * BS), "max_tokens": 3, "stream": True}
        for extra in ({}, {"stream_options": {"include_usage": True}}):
            resp = await s.client.post("/v1/completions", json={**body, **extra})
            events = [
                json.loads(line[6:])
                for line in resp.text.splitlines()
                if line.startswith("data: {")
            ]
            rows = [e["kvrelay"]["ledger"] for e in events if "kvrelay" in e]
            assert len(rows) == 1 and "kvrelay" in events[-1]
            assert rows[0]["num_prompt_tokens"] == 3 * BS
            await until(s.synced)
    assert rows[0]["num_realized_tokens"] == 2 * BS  # the second time: a hit, predicted
    assert rows[0]["num_predicted_tokens"] == 2 * BS
