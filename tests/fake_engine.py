"""A deterministic, torch-free stand-in for `EngineCore`, for worker and frontend tests.

Owns: `FakeEngine` — the methods the worker's engine loop calls, a block-granular prefix
cache (so cached-token counts behave like the real engine's), KV events, aborts, optional
per-step delay and an injectable step failure. Blocks are named with the real chained block
hash (`kv.hashing`), so a KV-aware router predicts its hits exactly. Output token k of a request is
`expected_tokens(prompt, k)`, so tests can predict the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kvrelay.errors import InvalidRequestError, PromptTooLongError
from kvrelay.kv.events import BlockRemoved, BlockStored, KVEvent, KVEventBatch, full_dump_batch
from kvrelay.kv.hashing import hash_blocks
from kvrelay.protocol import RequestMetrics, RequestOutput, SamplingParams

FIRST_ID = 3  # 0..2 are <pad>, <s>, </s> in the tiny tokenizer


def expected_token(prompt: list[int], k: int, vocab_size: int, seed: int | None = None) -> int:
    base = sum(prompt) % 97 + (seed or 0)
    return FIRST_ID + (base + 7 * k) % (vocab_size - FIRST_ID)


@dataclass
class _Req:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival: float
    num_cached: int
    blocks: int
    output: list[int] = field(default_factory=list)


class FakeEngine:
    def __init__(
        self,
        *,
        max_model_len: int = 512,
        num_blocks: int = 256,
        block_size: int = 16,
        vocab_size: int = 512,
        step_delay_s: float = 0.0,
    ) -> None:
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.step_delay_s = step_delay_s
        self.fail_next_step = False
        self.running: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.cached: dict[int, None] = {}  # block hashes, in the order they were cached
        self.query_tokens = 0
        self.hit_tokens = 0
        self._events: list[KVEvent] = []
        self._next_event_id = 0

    # -- the EngineCore surface ---------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str | None = None,
    ) -> Any:
        if request_id in self.running:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError("token ids outside the vocabulary")
        if len(prompt_token_ids) + sampling.max_tokens > self.max_model_len:
            raise PromptTooLongError("prompt + max_tokens exceeds the context")
        prompt = list(prompt_token_ids)
        req = _Req(
            request_id,
            prompt,
            sampling,
            time.monotonic(),
            self._lookup(prompt),
            blocks=-(-(len(prompt) + sampling.max_tokens) // self.block_size),
        )
        self.running[request_id] = req
        self.query_tokens += len(prompt)
        self.hit_tokens += req.num_cached
        return req

    def _lookup(self, prompt: list[int]) -> int:
        bs = self.block_size
        hashes = hash_blocks(prompt[: (len(prompt) - 1) // bs * bs], bs)
        hits = 0
        for h in hashes:
            if h not in self.cached:
                break
            hits += 1
        return hits * bs

    def step(self) -> list[RequestOutput]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step failure")
        outputs = []
        for req in list(self.running.values()):
            if not req.output:
                self._store_prefix(req.prompt)
            token = expected_token(req.prompt, len(req.output), self.vocab_size, req.sampling.seed)
            req.output.append(token)
            reason = None
            if token in req.sampling.stop_token_ids:
                reason = "stop"
            elif len(req.output) >= req.sampling.max_tokens:
                reason = "length"
            if reason is not None:
                del self.running[req.request_id]
            outputs.append(self._output(req, reason))
        return outputs

    def _store_prefix(self, prompt: list[int]) -> None:
        bs = self.block_size
        hashes = hash_blocks(prompt, bs)
        new = [h for h in hashes if h not in self.cached]
        self.cached.update(dict.fromkeys(new))
        if new:
            first = hashes.index(new[0])
            parent = hashes[first - 1] if first else None
            tokens = prompt[first * bs : (first + len(new)) * bs]
            self._events.append(BlockStored(new, parent, tokens, bs))

    def _output(self, req: _Req, reason: str | None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt,
            output_token_ids=list(req.output),
            finished=reason is not None,
            finish_reason=reason,
            num_cached_tokens=req.num_cached,
            metrics=RequestMetrics(
                arrival_time=req.arrival,
                queue_s=0.001,
                prefill_s=0.002,
                decode_s=0.001 * len(req.output),
            ),
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.running.pop(request_id, None)
        if req is None:
            return None
        self.aborted.append(request_id)
        return self._output(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def take_kv_events(self) -> KVEventBatch | None:
        if not self._events:
            return None
        events, self._events = self._events, []
        self._next_event_id += 1
        return KVEventBatch(self._next_event_id - 1, time.time(), events)

    def kv_dump(self) -> KVEventBatch:
        stored = [BlockStored(list(self.cached), None, [], self.block_size)] if self.cached else []
        return full_dump_batch(self._next_event_id - 1, time.time(), stored)

    def clear_cache(self, emit: bool = True) -> None:
        """Drop every cached block; `emit=False` drops it silently (a lost event)."""
        if emit:
            self._events.append(BlockRemoved(list(self.cached)))
        self.cached.clear()

    def stats(self) -> Any:
        used = sum(r.blocks for r in self.running.values())
        return SimpleNamespace(
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_blocks - used,
            kv_usage=used / self.num_blocks,
            num_running=len(self.running),
            num_waiting=0,
            prefix_cache=SimpleNamespace(
                num_query_tokens=self.query_tokens,
                num_hit_tokens=self.hit_tokens,
                num_preempted=0,
            ),
        )
