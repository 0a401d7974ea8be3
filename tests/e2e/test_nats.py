"""The NATS backend end to end: a real nats-server, `kvrelay worker --nats` x2 and
`kvrelay frontend --nats` as separate processes, driven with the official `openai` client.
Completions and chat (streamed, with usage), cached tokens, concurrency, and a killed
worker dropping out of discovery while the other keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.procs import API_KEY, AUTH, nats_deployment
from tests.nats_server import find_nats_server, running_nats_server

MODEL = "tiny-llama"
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n"


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if find_nats_server() is None:
        pytest.skip("nats-server binary not installed")
    logs = tmp_path_factory.mktemp("nats")
    workers = [(f"nats-{i}", ["--num-kv-blocks", "128"]) for i in range(2)]
    auth = ["--api-key", API_KEY]
    with (
        running_nats_server() as nats_url,
        nats_deployment(nats_url, tiny_model, logs, workers, auth) as (base, frontend),
    ):
        yield base
        assert frontend.stop() == 0, frontend.log()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_completion_with_cached_tokens(client: openai.OpenAI) -> None:
    prompt = CODE * 2
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert first.choices[0].text == second.choices[0].text
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > 0
    assert (second.model_extra or {})["kvrelay"]["workers"][0].startswith("nats-")


def test_router_gets_kv_events_and_dumps_over_nats(server: str) -> None:
    workers = httpx.get(f"{server}/kvrelay/workers", headers=AUTH, timeout=10).json()["workers"]
    assert workers and all(w["router"]["num_dumps_applied"] >= 1 for w in workers)
    assert all(w["router"]["num_dumps_failed"] == 0 for w in workers)
    assert sum(w["router"]["num_indexed_blocks"] for w in workers) > 0  # the cached prompt


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Write a function."}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.usage is not None and last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens_details is not None
    assert "kvrelay" in (last.model_extra or {})


def test_concurrent_requests(server: str) -> None:
    async def run() -> list[int]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        resps = await asyncio.gather(
            *(
                aclient.completions.create(
                    model=MODEL,
                    prompt=f"# {i}\n{CODE}",
                    max_tokens=4,
                    extra_body={"ignore_eos": True},
                )
                for i in range(16)
            )
        )
        await aclient.close()
        return [r.usage.completion_tokens if r.usage else 0 for r in resps]

    assert asyncio.run(run()) == [4] * 16


def test_bad_input_and_auth(server: str) -> None:
    bad = httpx.post(
        f"{server}/v1/completions",
        headers=AUTH,
        timeout=10,
        json={"model": MODEL, "prompt": "x", "top_p": 7},
    )
    assert bad.status_code == 400
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401


def test_killed_worker_leaves_discovery(server: str, client: openai.OpenAI) -> None:
    workers = httpx.get(f"{server}/kvrelay/workers", headers=AUTH, timeout=10).json()["workers"]
    victim = next(w for w in workers if w["worker_id"] == "nats-0")
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10  # discovery TTL is 2 s
    while time.monotonic() < deadline:
        live = httpx.get(f"{server}/kvrelay/workers", headers=AUTH, timeout=10).json()["workers"]
        if [w["worker_id"] for w in live] == ["nats-1"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"nats-0 still listed: {live}")
    for i in range(4):
        resp = client.completions.create(model=MODEL, prompt=f"# after {i}\n{CODE}", max_tokens=2)
        assert (resp.model_extra or {})["kvrelay"]["workers"] == ["nats-1"]
