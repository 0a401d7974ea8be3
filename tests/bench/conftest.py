"""Shared fixtures of the HTTP-benchmark tests: a small code corpus on disk and a fake
OpenAI-compatible server (stdlib http.server streaming SSE) with a real prefix cache model."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kvrelay.bench.tokens import ApproxTokenizer
from kvrelay.kv.hashing import hash_blocks

FIXTURES = Path(__file__).parent / "fixtures"
BLOCK_SIZE = 16


def _module_source(repo: int, index: int) -> str:
    funcs = []
    for k in range(6):
        name = f"func_{repo}_{index}_{k}"
        funcs.append(
            f"def {name}(values, limit={k + 1}):\n"
            f'    """Return the items of values below {k + 1} (module {index})."""\n'
            f"    result = []\n"
            f"    for value in values:\n"
            f"        if value < limit:\n"
            f"            result.append(value * {repo + 2})\n"
            f"    return result\n"
        )
    return f'"""Module {index} of repository {repo}."""\n\n' + "\n\n".join(funcs)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three repositories of four Python files each (every file ~1.5 kB)."""
    root = tmp_path_factory.mktemp("corpus")
    for repo in range(3):
        folder = root / f"repo{repo}" / "pkg"
        folder.mkdir(parents=True)
        for index in range(4):
            (folder / f"mod{index}.py").write_text(_module_source(repo, index))
    (root / "repo0" / "pkg" / "tiny.py").write_text("x = 1\n")  # below min_bytes: skipped
    return root


class FakeOpenAI:
    """Counts tokens with `ApproxTokenizer`, keeps every prompt block it has seen (an infinite
    prefix cache), reports cached tokens in usage and in kvrelay-named /metrics counters, and
    streams one chunk per output token `token_delay_s` apart. Requests whose prompt contains
    `FAIL` get HTTP 500."""

    def __init__(self, token_delay_s: float = 0.001) -> None:
        self.token_delay_s = token_delay_s
        self.tokenizer = ApproxTokenizer()
        self.blocks: set[int] = set()
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def prompt_ids(self, body: dict[str, Any]) -> list[int]:
        if "messages" in body:
            text = self.tokenizer.apply_chat_template(body["messages"])
            return self.tokenizer.encode(text, add_special_tokens=False)
        prompt = body["prompt"]
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def admit(self, body: dict[str, Any]) -> tuple[int, int]:
        ids = self.prompt_ids(body)
        keys = hash_blocks(ids, BLOCK_SIZE)
        with self.lock:
            self.bodies.append(body)
            hits = next((i for i, k in enumerate(keys) if k not in self.blocks), len(keys))
            self.blocks.update(keys)
            self.prompt_tokens_total += len(ids)
            self.cached_tokens_total += hits * BLOCK_SIZE
        return len(ids), hits * BLOCK_SIZE

    def metrics_text(self) -> str:
        return (
            "# HELP kvrelay_prompt_tokens_total Prompt tokens.\n"
            "# TYPE kvrelay_prompt_tokens_total counter\n"
            f'kvrelay_prompt_tokens_total{{model="fake",worker="w0"}} {self.prompt_tokens_total}\n'
            f'kvrelay_cached_prompt_tokens_total{{model="fake",worker="w0"}} '
            f"{self.cached_tokens_total}\n"
            "kvrelay_requests_inflight 0\n"
        )


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            super().setup()
            # Without it Nagle + delayed ACKs batch the small SSE writes, as real servers avoid.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, content_type: str, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                body = {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
                self._send(200, "application/json", json.dumps(body).encode())
            elif self.path == "/metrics":
                self._send(200, "text/plain; version=0.0.4", fake.metrics_text().encode())
            else:
                self._send(404, "text/plain", b"not found")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "FAIL" in json.dumps(body):
                self._send(500, "application/json", b'{"error": {"message": "boom"}}')
                return
            chat = self.path == "/v1/chat/completions"
            num_prompt, num_cached = fake.admit(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            time.sleep(0.002 + 2e-6 * (num_prompt - num_cached))  # prefill of the uncached part
            if chat:
                self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(body["max_tokens"]):
                finish = "length" if i == body["max_tokens"] - 1 else None
                piece = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
                self._event({"choices": [{"index": 0, **piece, "finish_reason": finish}]})
                time.sleep(fake.token_delay_s)
            usage = {
                "prompt_tokens": num_prompt,
                "completion_tokens": body["max_tokens"],
                "prompt_tokens_details": {"cached_tokens": num_cached},
            }
            self._event({"choices": [], "usage": usage, "kvrelay": {"cached_tokens": num_cached}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _event(self, payload: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

    return Handler


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeOpenAI]]:
    """(base URL, fake) of a fake OpenAI server on 127.0.0.1 (a free port)."""
    fake = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()
