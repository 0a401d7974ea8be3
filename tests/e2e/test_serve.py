"""`kvrelay serve` end to end (embedded runtime): the official `openai` client against a real
frontend and 2 worker processes running a tiny random Llama. Completions and chat,
streaming and not, usage and cached tokens, 32 concurrent requests, bad inputs, client
disconnect freeing KV blocks, and (last) kill -9 of a worker under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.procs import API_KEY, AUTH, Proc, started, wait_ready

MODEL = "tiny-llama"
NUM_KV_BLOCKS = 256
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n"


@pytest.fixture(scope="module")
def serve_proc(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        "-m",
        "kvrelay.launch",
        "--model",
        str(tiny_model),
        "--workers",
        "2",
        "--port",
        "0",
        "--api-key",
        API_KEY,
        "--num-kv-blocks",
        str(NUM_KV_BLOCKS),
        "--threads",
        "1",
    ]
    with started(args, log) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()  # Ctrl-C stops everything cleanly


@pytest.fixture(scope="module")
def server(serve_proc: Proc) -> str:
    base = serve_proc.url("kvrelay: serving")
    serve_proc.wait_for_line("kvrelay: ready")
    wait_ready(base, workers=2)
    return base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def ext(resp: Any) -> dict[str, Any]:
    extra = resp.model_extra or {}
    value = extra["kvrelay"]
    assert isinstance(value, dict)
    return value


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_and_cached_tokens(client: openai.OpenAI) -> None:
    prompt = CODE * 2
    first = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    second = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert first.choices[0].text == second.choices[0].text  # greedy: deterministic
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and second.usage is not None
    assert first.usage.completion_tokens == 6
    assert first.usage.prompt_tokens > 32
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > 0
    info = ext(second)
    assert info["cached_tokens"] == second.usage.prompt_tokens_details.cached_tokens
    assert len(info["workers"]) == 1 and info["workers"][0].startswith("worker-")
    assert info["prefill_ms"] is not None and info["queue_ms"] is not None


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt=CODE,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(
        model=MODEL, prompt=CODE, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert text == full.choices[0].text
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens_details is not None
    assert "kvrelay" in (last.model_extra or {})


def test_chat_and_chat_stream(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "You are a helpful coding assistant."},
        {"role": "user", "content": "Write a function."},
    ]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, seed=1
    )
    assert full.choices[0].message.role == "assistant"
    assert full.usage is not None and full.usage.completion_tokens <= 5
    assert full.usage.prompt_tokens_details is not None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert ext(chunks[-1])["workers"]


def test_32_concurrent_requests_are_all_correct(server: str) -> None:
    prompts = [f"# task {i}\n" + CODE for i in range(8)]

    async def run() -> tuple[list[str], list[str]]:
        aclient = openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120
        )

        async def one(prompt: str) -> str:
            resp = await aclient.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=8,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert resp.usage is not None and resp.usage.completion_tokens == 8
            assert resp.choices[0].finish_reason == "length"
            return resp.choices[0].text

        alone = [await one(p) for p in prompts]  # one at a time: the reference
        together = await asyncio.gather(*(one(prompts[i % 8]) for i in range(32)))
        await aclient.close()
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == [alone[i % 8] for i in range(32)]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{oops", 400),
        (b'{"model": "tiny-llama", "prompt": 12}', 400),
        (b'{"model": "tiny-llama", "prompt": "x", "max_tokens": "x"}', 422),
        (b'{"model": "gpt-nope", "prompt": "x"}', 404),
        (b'{"model": "tiny-llama", "prompt": "x", "temperature": -1}', 400),
        (b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 4096}', 400),
    ],
)
def test_bad_inputs(server: str, body: bytes, status: int) -> None:
    resp = httpx.post(
        f"{server}/v1/completions",
        content=body,
        timeout=30,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert resp.status_code == status, resp.text
    assert set(resp.json()["error"]) >= {"message", "type", "code"}


def test_body_limit_and_auth(server: str, client: openai.OpenAI) -> None:
    big = httpx.post(
        f"{server}/v1/completions",
        headers=AUTH,
        timeout=30,
        json={"model": MODEL, "prompt": "x" * (5 << 20)},
    )
    assert big.status_code == 413
    no_key = httpx.get(f"{server}/v1/models", timeout=10)
    assert no_key.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt=CODE * 300, max_tokens=10)


def _workers(server: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(
        f"{server}/kvrelay/workers", headers=AUTH, timeout=10
    ).json()["workers"]
    return data


def _stats(server: str, worker_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{server}/kvrelay/workers/{worker_id}/stats", headers=AUTH, timeout=10)
    resp.raise_for_status()
    stats: dict[str, Any] = resp.json()
    return stats


def test_client_disconnect_frees_kv_blocks(server: str) -> None:
    body = {"model": MODEL, "prompt": CODE, "max_tokens": 1800, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH) as resp,
    ):
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]
        busy = [w for w in _workers(server) if _stats(server, w["worker_id"])["num_running"]]
        assert len(busy) == 1 and got  # the request is running on one worker
        worker_id = busy[0]["worker_id"]
        assert _stats(server, worker_id)["num_free_blocks"] < NUM_KV_BLOCKS
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = _stats(server, worker_id)
        if stats["num_running"] == 0 and stats["num_free_blocks"] == NUM_KV_BLOCKS:
            break
        time.sleep(0.1)
    assert stats["num_running"] == 0 and stats["num_inflight"] == 0
    assert stats["num_free_blocks"] == stats["num_kv_blocks"] == NUM_KV_BLOCKS


def test_non_streaming_client_timeout_frees_kv_blocks(server: str) -> None:
    body = {"model": MODEL, "prompt": CODE, "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = [_stats(server, w["worker_id"]) for w in _workers(server)]
        if all(s["num_running"] == 0 and s["num_free_blocks"] == NUM_KV_BLOCKS for s in stats):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"blocks not freed: {stats}")


def test_metrics_endpoint(server: str) -> None:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'kvrelay_requests_total{model="tiny-llama"}' in text
    assert "kvrelay_cached_prompt_tokens_total" in text
    assert 'kvrelay_workers{model="tiny-llama"} 2.0' in text


def _stream_outcome(
    server: str, prompt: str, started_event: Any, max_tokens: int = 600
) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    outcome: dict[str, Any] = {"error": None, "workers": None, "finish_reason": None}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH) as resp,
    ):
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            started_event.set()
            if "error" in event:
                outcome["error"] = event["error"]
            else:
                for choice in event["choices"]:
                    outcome["finish_reason"] = choice["finish_reason"]
                if "kvrelay" in event:
                    outcome["workers"] = event["kvrelay"]["workers"]
    return outcome


def test_kill_a_worker_under_load(server: str) -> None:
    """Only the killed worker's requests fail, the rest finish, and it comes back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    before = {w["worker_id"]: w for w in _workers(server)}
    events = [threading.Event() for _ in range(10)]
    prompts = [f"# request {i} " + "x" * i + "\n" + CODE for i in range(10)]
    with ThreadPoolExecutor(10) as ex:
        futures = [
            ex.submit(_stream_outcome, server, p, e) for p, e in zip(prompts, events, strict=True)
        ]
        assert all(e.wait(60) for e in events)
        inflight = {w["worker_id"]: w["inflight"] for w in _workers(server)}
        assert inflight["worker-0"] > 0 and inflight["worker-1"] > 0, inflight
        os.kill(before["worker-0"]["pid"], signal.SIGKILL)
        outcomes = [f.result() for f in futures]
    failed = [o for o in outcomes if o["error"] is not None]
    finished = [o for o in outcomes if o["error"] is None]
    assert len(failed) == inflight["worker-0"]
    assert len(finished) == inflight["worker-1"]
    assert all(o["workers"] == ["worker-1"] for o in finished)
    assert all(o["error"]["type"] == "service_unavailable" for o in failed)
    assert all(o["error"]["code"] == "worker_failed" for o in failed)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = {w["worker_id"]: w for w in _workers(server)}
        if (
            "worker-0" in now
            and now["worker-0"]["instance_id"] != before["worker-0"]["instance_id"]
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("worker-0 was not restarted")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    served = set()
    for i in range(12):
        resp = client.completions.create(model=MODEL, prompt=f"# after {i}\n{CODE}", max_tokens=2)
        served.update(ext(resp)["workers"])
    assert served == {"worker-0", "worker-1"}


def test_ctrl_c_drains_in_flight_requests(server: str, serve_proc: Proc) -> None:
    """Runs last: SIGINT while a request streams; it finishes, then everything stops."""
    import threading

    first_token = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(_stream_outcome(server, f"# drain\n{CODE}", first_token, max_tokens=300))

    thread = threading.Thread(target=run)
    thread.start()
    assert first_token.wait(30)
    pids = [w["pid"] for w in _workers(server)]
    serve_proc.proc.send_signal(signal.SIGINT)
    thread.join(60)
    assert result["error"] is None and result["finish_reason"] == "length"
    assert serve_proc.proc.wait(30) == 0, serve_proc.log()
    for pid in pids:  # the workers are gone too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
