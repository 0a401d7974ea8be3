"""The OpenAI app in-process (httpx ASGI transport) over the embedded runtime, with workers
running a fake engine: response shapes, streaming, usage, stop strings, n, errors, auth,
saturation, retries and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from kvrelay.engine.models.tokenizer import Tokenizer
from kvrelay.frontend.app import FrontendConfig, create_app
from kvrelay.frontend.workers import WorkerPool
from kvrelay.protocol import WorkerInfo
from kvrelay.runtime import make_runtime
from kvrelay.runtime.discovery import Registrar
from kvrelay.runtime.embedded import EmbeddedHub
from kvrelay.worker.service import WorkerIdentity, WorkerService
from tests.fake_engine import FakeEngine, expected_token
from tests.tiny_tokenizer import add_tiny_tokenizer

pytestmark = pytest.mark.anyio
MODEL = "fake"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    tok = Tokenizer.from_hf_dir(add_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    assert tok is not None
    return tok


@dataclass
class Stack:
    client: httpx.AsyncClient
    engines: list[FakeEngine]
    pool: WorkerPool
    tokenizer: Tokenizer


@contextlib.asynccontextmanager
async def stack(
    tokenizer: Tokenizer,
    *,
    num_workers: int = 1,
    config: FrontendConfig | None = None,
    step_delay_s: float = 0.0,
    extra_workers: Sequence[WorkerInfo] = (),
) -> AsyncIterator[Stack]:
    config = config or FrontendConfig()
    hub = EmbeddedHub()
    url = await hub.start()
    closers: list[Any] = []
    engines = []
    for i in range(num_workers):
        rt = make_runtime(url)
        await rt.start()
        engine = FakeEngine(step_delay_s=step_delay_s)
        service = WorkerService(rt, engine, WorkerIdentity(f"w{i}", MODEL), tokenizer)
        await service.start()
        engines.append(engine)
        closers.append(lambda s=service: s.shutdown(drain_timeout_s=0.5))
    rt = make_runtime(url)
    await rt.start()
    for info in extra_workers:
        registrar = Registrar(rt, info)
        await registrar.start()
        closers.append(registrar.close)

    def prefer_extra(
        ws: Sequence[WorkerInfo], inflight: Mapping[str, int], p: Any
    ) -> WorkerInfo | None:
        extra = [w for w in ws if w.worker_id.startswith("dead")]
        return extra[0] if extra else None  # None: the router decides

    pool = WorkerPool(
        rt, max_inflight_per_worker=config.max_inflight_per_worker, chooser=prefer_extra
    )
    await pool.start()
    await pool.watcher.wait_for(num_workers + len(extra_workers), timeout_s=3)
    app = create_app(pool, config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        try:
            yield Stack(client, engines, pool, tokenizer)
        finally:
            await pool.close()
            for close in closers:
                await close()
            await rt.close()
            await hub.close()


def expected_text(tok: Tokenizer, prompt_ids: list[int], n: int, seed: int | None = None) -> str:
    return tok.decode([expected_token(prompt_ids, k, 512, seed) for k in range(n)])


def sse_events(body: str) -> list[Any]:
    out = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 3  # > 2 KV blocks


async def test_health_ready_models(tokenizer: Tokenizer) -> None:
    async with stack(tokenizer) as s:
        assert (await s.client.get("/health")).json() == {"status": "ok"}
        await s.pool.model_state(MODEL)
        assert (await s.client.get("/ready")).status_code == 200
        models = (await s.client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]


async def test_completion(tokenizer: Tokenizer) -> None:
    async with stack(tokenizer) as s:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        first = (await s.client.post("/v1/completions", json=body)).json()
        second = (await s.client.post("/v1/completions", json=body)).json()
    ids = tokenizer.encode(PROMPT)
    assert first["object"] == "text_completion"
    assert first["choices"][0]["text"] == expected_text(tokenizer, ids, 5)
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 5,
        "total_tokens": len(ids) + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 16 * ((len(ids) - 1) // 16)
    ext = second["kvrelay"]
    assert ext["workers"] == ["w0"] and ext["cached_tokens"] > 0
    assert {"queue_ms", "prefill_ms", "decode_ms", "ttft_ms"} <= set(ext)


async def test_completion_stream_with_usage(tokenizer: Tokenizer) -> None:
    async with stack(tokenizer) as s:
        body = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        resp = await s.client.post("/v1/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == expected_text(tokenizer, tokenizer.encode(PROMPT), 7)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 7
    assert usage_chunk["kvrelay"]["workers"] == ["w0"]


async def test_chat_and_chat_stream(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Write a function."}]},
    ]
    async with stack(tokenizer) as s:
        body = {"model": MODEL, "messages": messages, "max_completion_tokens": 4}
        full = (await s.client.post("/v1/chat/completions", json=body)).json()
        resp = await s.client.post("/v1/chat/completions", json={**body, "stream": True})
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Write a function."},
        ]
    )
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {
        "role": "assistant",
        "content": expected_text(tokenizer, ids, 4),
    }
    assert full["usage"]["prompt_tokens"] == len(ids)
    events = sse_events(resp.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert streamed == full["choices"][0]["message"]["content"]
    assert "kvrelay" in events[-2]  # the final chunk carries the extension


async def test_stop_string_truncates_and_aborts(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    text = expected_text(tokenizer, ids, 12)
    stop = text[6:9]
    assert text.find(stop) == 6
    async with stack(tokenizer, step_delay_s=0.005) as s:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "stop": [stop]}
        out = (await s.client.post("/v1/completions", json=body)).json()
        await asyncio.sleep(0.2)
        aborted = s.engines[0].aborted
    assert out["choices"][0]["text"] == text[:6]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert len(aborted) == 1  # the worker stopped generating once the stop string appeared


async def test_n_choices_and_batched_prompts(tokenizer: Tokenizer) -> None:
    async with stack(tokenizer, num_workers=2) as s:
        body = {
            "model": MODEL,
            "prompt": [PROMPT, "Hello, how are you"],
            "n": 2,
            "max_tokens": 3,
            "seed": 5,
        }
        out = (await s.client.post("/v1/completions", json=body)).json()
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    ids = tokenizer.encode(PROMPT)
    assert choices[0]["text"] == expected_text(tokenizer, ids, 3, seed=5)
    assert choices[1]["text"] == expected_text(tokenizer, ids, 3, seed=6)
    p2 = tokenizer.encode("Hello, how are you")
    assert out["usage"]["prompt_tokens"] == len(ids) + len(p2)
    assert out["usage"]["completion_tokens"] == 12
    assert len(out["kvrelay"]["choices"]) == 4


async def test_chat_stream_with_n_2(tokenizer: Tokenizer) -> None:
    async with stack(tokenizer, num_workers=2) as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2,
            "max_tokens": 5,
            "seed": 1,
            "stream": True,
        }
        events = sse_events((await s.client.post("/v1/chat/completions", json=body)).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = {0: "", 1: ""}
    finished = []
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finished.append(choice["index"])
    assert sorted(finished) == [0, 1] and texts[0] != texts[1]
    assert "kvrelay" in chunks[-1] and all("kvrelay" not in c for c in chunks[:-1])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"model": "fake"}', 422, "invalid_request_body"),
        (b'{"model": "fake", "prompt": "x", "max_tokens": "many"}', 422, "invalid_request_body"),
        (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
        (b'{"model": "fake", "prompt": "x", "temperature": 5}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": "x", "top_p": 0}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": "x", "n": 100}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": "x", "max_tokens": 0}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": "x", "max_tokens": 100000}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": "x", "logprobs": 2}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": [], "max_tokens": 2}', 400, "invalid_value"),
        (b'{"model": "fake", "prompt": [99999999], "max_tokens": 2}', 400, "invalid_request"),
        (
            b'{"model": "fake", "prompt": "x x x x", "max_tokens": 510}',
            400,
            "context_length_exceeded",
        ),
    ],
)
async def test_bad_inputs(tokenizer: Tokenizer, body: bytes, status: int, code: str) -> None:
    async with stack(tokenizer) as s:
        resp = await s.client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


async def test_chat_errors_body_limit_and_routes(tokenizer: Tokenizer) -> None:
    config = FrontendConfig(max_body_bytes=1000)
    async with stack(tokenizer, config=config) as s:
        big = await s.client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 2000})
        tools = await s.client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{}]},
        )
        empty = await s.client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        missing = await s.client.get("/v1/nothing")
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    assert empty.status_code == 400
    assert missing.status_code == 404 and "error" in missing.json()


async def test_api_key(tokenizer: Tokenizer) -> None:
    async with stack(tokenizer, config=FrontendConfig(api_key="sekrit")) as s:
        none = await s.client.get("/v1/models")
        wrong = await s.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        right = await s.client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        health = await s.client.get("/health")
    assert none.status_code == 401 and wrong.status_code == 401
    assert none.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200 and health.status_code == 200


async def test_saturated_workers_get_503_with_retry_after(tokenizer: Tokenizer) -> None:
    config = FrontendConfig(max_inflight_per_worker=1)
    async with stack(tokenizer, config=config, step_delay_s=0.01) as s:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}
        first = asyncio.create_task(s.client.post("/v1/completions", json=body))
        for _ in range(100):
            if s.pool.inflight.get("w0"):
                break
            await asyncio.sleep(0.01)
        second = await s.client.post("/v1/completions", json=body)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.2)
        assert s.engines[0].running == {}  # the cancelled request was aborted on the worker
    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "service_unavailable"


async def test_dead_worker_is_skipped_and_forgotten(tokenizer: Tokenizer) -> None:
    dead = WorkerInfo(
        worker_id="dead-1",
        instance_id="x",
        model=MODEL,
        block_size=16,
        num_kv_blocks=8,
        max_model_len=512,
        address="tcp://127.0.0.1:9",
    )
    async with stack(tokenizer, extra_workers=[dead]) as s:
        resp = await s.client.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        )
        assert resp.status_code == 200
        assert resp.json()["kvrelay"]["workers"] == ["w0"]
        assert [w.worker_id for w in s.pool.workers()] == ["w0"]


async def test_metrics_use_the_documented_names(tokenizer: Tokenizer) -> None:
    from kvrelay.observe import names

    async with stack(tokenizer) as s:
        await s.client.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        )
        await s.client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
        await asyncio.sleep(0.3)  # a load report arrives
        text = (await s.client.get("/metrics")).text
    for name in (
        names.REQUESTS_TOTAL,
        names.PROMPT_TOKENS_TOTAL,
        names.CACHED_PROMPT_TOKENS_TOTAL,
        names.GENERATION_TOKENS_TOTAL,
        names.TIME_TO_FIRST_TOKEN_SECONDS,
        names.WORKER_KV_BLOCKS,
        names.WORKERS,
        names.WORKER_PREFIX_HIT_TOKENS_TOTAL,
    ):
        assert name in text, name
    assert 'kvrelay_generation_tokens_total{model="fake",worker="w0"} 2.0' in text
