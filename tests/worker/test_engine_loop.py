"""EngineLoop ordering: the KV events of a step reach the event loop before its outputs."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.kv.events import BlockStored, KVEventBatch
from kvrelay.protocol import GenerateRequest, SamplingParams
from kvrelay.worker.engine_loop import EngineLoop
from tests.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_kv_events_of_a_step_come_before_its_outputs() -> None:
    """A client that sends its next turn as soon as an answer arrives must find the router
    already told about the blocks that answer's step cached: when the events callback runs,
    the final output is not yet on the request's queue."""
    seen: list[tuple[KVEventBatch, int]] = []
    outputs: asyncio.Queue[object] | None = None

    def on_kv_events(batch: KVEventBatch) -> None:
        assert outputs is not None
        seen.append((batch, outputs.qsize()))

    loop = EngineLoop(FakeEngine(), asyncio.get_running_loop(), on_kv_events)
    loop.start()
    try:
        sampling = SamplingParams(max_tokens=1, temperature=0)
        request = GenerateRequest(
            request_id="a", prompt_token_ids=list(range(40)), sampling=sampling, model="fake"
        )
        outputs = loop.submit(request)
        final = await asyncio.wait_for(outputs.get(), 5)
    finally:
        loop.stop()
    assert getattr(final, "finished", False)
    assert len(seen) == 1
    batch, queued_outputs = seen[0]
    assert isinstance(batch.events[0], BlockStored)
    assert queued_outputs == 0  # the events were handed over first
