"""WorkerService over the embedded runtime with a fake engine: streaming, errors, aborts on
caller disconnect, load reports, KV events, model card, draining and step failures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from kvrelay.errors import RemoteError
from kvrelay.kv.events import AllBlocksCleared, BlockStored, decode_batch
from kvrelay.kv.hashing import hash_blocks
from kvrelay.protocol import GenerateChunk, GenerateRequest, LoadReport, SamplingParams
from kvrelay.runtime import Runtime, make_runtime
from kvrelay.runtime.base import (
    ENDPOINT_GENERATE,
    ENDPOINT_KV_DUMP,
    ENDPOINT_STATS,
    call_once,
    kv_events_subject,
)
from kvrelay.runtime.embedded import EmbeddedHub
from kvrelay.worker.engine_loop import error_kind
from kvrelay.worker.service import WorkerIdentity, WorkerService
from tests.fake_engine import FakeEngine, expected_token

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def worker(
    engine: FakeEngine, tokenizer: object = None, kv_events: bool = True
) -> AsyncIterator[tuple[WorkerService, Runtime, str]]:
    hub = EmbeddedHub()
    url = await hub.start()
    worker_rt, client_rt = make_runtime(url), make_runtime(url)
    await worker_rt.start()
    await client_rt.start()
    identity = WorkerIdentity("w0", "fake", num_kv_blocks=256, kv_events=kv_events)
    service = WorkerService(worker_rt, engine, identity, tokenizer)
    info = await service.start()
    try:
        yield service, client_rt, info.address
    finally:
        await service.shutdown(drain_timeout_s=1)
        await client_rt.close()
        await hub.close()


def request(rid: str, prompt: list[int], max_tokens: int = 4) -> bytes:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return msgspec.msgpack.encode(
        GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, model="fake")
    )


async def chunks(rt: Runtime, address: str, payload: bytes) -> list[GenerateChunk]:
    return [
        msgspec.msgpack.decode(raw, type=GenerateChunk)
        async for raw in rt.call(address, ENDPOINT_GENERATE, payload)
    ]


async def test_generate_streams_every_token_once() -> None:
    engine = FakeEngine(step_delay_s=0.002)
    prompt = list(range(10, 50))
    async with worker(engine) as (_, rt, address):
        got = await chunks(rt, address, request("r1", prompt, max_tokens=6))
    tokens = [t for c in got for t in c.new_token_ids]
    assert tokens == [expected_token(prompt, k, 512) for k in range(6)]
    last = got[-1]
    assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 6
    assert last.num_prompt_tokens == 40 and last.worker_id == "w0"
    assert last.metrics is not None and last.error is None


async def test_second_identical_prompt_reports_cached_tokens() -> None:
    prompt = list(range(10, 50))  # 40 tokens: 2 full blocks of 16
    async with worker(FakeEngine()) as (_, rt, address):
        first = await chunks(rt, address, request("a", prompt))
        second = await chunks(rt, address, request("b", prompt))
    assert first[-1].num_cached_tokens == 0
    assert second[-1].num_cached_tokens == 32


async def test_errors_come_back_as_wire_errors() -> None:
    async with worker(FakeEngine(max_model_len=32)) as (_, rt, address):
        too_long = await chunks(rt, address, request("a", list(range(40))))
        bad_token = await chunks(rt, address, request("b", [10**6]))
        garbage = await chunks(rt, address, b"\x01\x02")
    assert too_long[-1].error is not None and too_long[-1].error.kind == "prompt_too_long"
    assert bad_token[-1].error is not None and bad_token[-1].error.kind == "invalid_request"
    assert garbage[-1].error is not None and garbage[-1].error.kind == "invalid_request"


async def test_caller_leaving_aborts_the_request_and_frees_blocks() -> None:
    engine = FakeEngine(step_delay_s=0.01)
    async with worker(engine) as (service, rt, address):
        stream = rt.call(address, ENDPOINT_GENERATE, request("long", list(range(20)), 400))
        await stream.__anext__()
        assert service.load_report().num_running == 1
        await stream.aclose()
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        report = service.load_report()
    assert engine.aborted == ["long"]
    assert report.num_running == 0 and report.num_inflight == 0
    assert report.num_free_blocks == report.num_kv_blocks


async def test_stats_endpoint_load_reports_and_kv_events() -> None:
    async with worker(FakeEngine()) as (_, rt, address):
        kv_sub = await rt.subscribe(kv_events_subject("w0"))
        load_sub = await rt.subscribe("kvrelay.load.*")
        await chunks(rt, address, request("a", list(range(40))))
        batch = decode_batch((await asyncio.wait_for(kv_sub.next(), 2)).data)
        report = msgspec.msgpack.decode(
            (await asyncio.wait_for(load_sub.next(), 2)).data, type=LoadReport
        )
        stats = msgspec.msgpack.decode(
            await call_once(rt, address, ENDPOINT_STATS, b""), type=LoadReport
        )
    assert batch.event_id == 0 and len(batch.events) == 1
    assert report.worker_id == "w0" and report.num_kv_blocks == 256
    assert stats.num_prefix_query_tokens == 40


async def test_kv_dump_lists_the_cache_and_reports_the_last_event_id() -> None:
    prompt = list(range(3, 43))  # 2 full blocks of 16
    async with worker(FakeEngine()) as (service, rt, address):
        await chunks(rt, address, request("a", prompt))
        await asyncio.sleep(0.1)
        dump = decode_batch(b"".join([p async for p in rt.call(address, ENDPOINT_KV_DUMP, b"")]))
        report = service.load_report()
    assert dump.event_id == 0 == report.last_kv_event_id
    assert isinstance(dump.events[0], AllBlocksCleared)
    stored = [h for ev in dump.events if isinstance(ev, BlockStored) for h in ev.block_hashes]
    assert stored == hash_blocks(prompt, 16)


async def test_no_kv_events_publishes_nothing_and_refuses_dumps() -> None:
    async with worker(FakeEngine(), kv_events=False) as (service, rt, address):
        kv_sub = await rt.subscribe(kv_events_subject("w0"))
        await chunks(rt, address, request("a", list(range(3, 43))))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(kv_sub.next(), 0.3)
        with pytest.raises(RemoteError, match="--no-kv-events"):
            await call_once(rt, address, ENDPOINT_KV_DUMP, b"")
        assert service.registrar is not None and not service.registrar.info.kv_events


async def test_model_card_carries_a_working_tokenizer(tmp_path: Path) -> None:
    from kvrelay.engine.models.tokenizer import Tokenizer
    from kvrelay.frontend.workers import WorkerPool
    from tests.tiny_tokenizer import add_tiny_tokenizer

    tokenizer = Tokenizer.from_hf_dir(add_tiny_tokenizer(tmp_path))
    assert tokenizer is not None
    async with worker(FakeEngine(), tokenizer) as (_, rt, _address):
        pool = WorkerPool(rt)
        await pool.start()
        await pool.watcher.wait_for(1, timeout_s=2)
        state = await pool.model_state("fake")
        await pool.close()
    assert state.card.max_model_len == 512
    assert state.tokenizer is not None
    text = "def fibonacci(n):"
    assert state.tokenizer.encode(text) == tokenizer.encode(text)
    assert state.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith(
        "<|assistant|>\n"
    )


async def test_draining_worker_refuses_new_requests() -> None:
    async with worker(FakeEngine()) as (service, rt, address):
        service._draining = True
        got = await chunks(rt, address, request("a", [5, 6, 7]))
    assert got[-1].error is not None and got[-1].error.kind == "draining"


async def test_a_failed_step_fails_in_flight_requests_only() -> None:
    engine = FakeEngine(step_delay_s=0.01)
    async with worker(engine) as (_, rt, address):
        engine.fail_next_step = True
        failed = await chunks(rt, address, request("a", [5, 6, 7], 50))
        ok = await chunks(rt, address, request("b", [5, 6, 7], 3))
    assert failed[-1].error is not None and failed[-1].error.kind == "internal"
    assert ok[-1].finished and ok[-1].error is None


def test_error_kinds() -> None:
    from kvrelay.errors import InvalidSamplingParamsError, PromptTooLongError

    assert error_kind(PromptTooLongError("x")) == "prompt_too_long"
    assert error_kind(InvalidSamplingParamsError("x")) == "invalid_sampling"
    assert error_kind(RuntimeError("x")) == "internal"
