"""Offline API: `LLM(model=...).generate(prompts, SamplingParams)` runs the engine loop in
the caller's thread and returns (or, with `stream`, yields) outputs with text, token ids,
cached prompt tokens and timings. Imports engine.core and the tokenizer; nothing above.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from kvrelay.config import DEFAULT_MODEL, CacheConfig, EngineConfig, SchedulerConfig
from kvrelay.engine.core import EngineCore
from kvrelay.engine.models.tokenizer import IncrementalDecoder, Tokenizer
from kvrelay.errors import InvalidRequestError
from kvrelay.protocol import RequestOutput, SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """One engine in-process. Prompts are text (tokenized with the model's tokenizer) or
    lists of token ids."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int = 1 << 30,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            num_threads=num_threads,
            cache=CacheConfig(block_size, num_kv_blocks, kv_cache_bytes, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs),
        )
        self.engine = EngineCore(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        if self.engine.model.tokenizer is None:
            raise InvalidRequestError(
                f"model {self.engine.model.name!r} has no tokenizer; pass token ids as prompts"
            )
        return self.engine.model.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order."""
        final: dict[str, RequestOutput] = {}
        order = self._submit(prompts, sampling_params)
        for out in self._run(order):
            if out.finished:
                final[out.request_id] = out
        return [final[rid] for rid in order]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield each request's output every time it gets a token (text is cumulative)."""
        yield from self._run(self._submit(prompts, sampling_params))

    def _submit(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[str]:
        batch = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(batch)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(batch):
                raise InvalidRequestError(
                    f"{len(per_prompt)} sampling params for {len(batch)} prompts"
                )
        token_lists = [self._tokenize(p) for p in batch]  # validate all before queueing any
        ids = []
        for tokens, sp in zip(token_lists, per_prompt, strict=True):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, tokens, sp)
            ids.append(rid)
        return ids

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _run(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        tok = self.engine.model.tokenizer
        decoders = {rid: IncrementalDecoder(tok) for rid in request_ids} if tok else {}
        pending = set(request_ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id not in pending:
                        continue
                    if decoders:
                        dec = decoders[out.request_id]
                        dec.update(out.output_token_ids)
                        if out.finished:
                            dec.flush()
                        out.text = dec.text
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            for rid in pending:  # caller stopped early or a step failed: free their blocks
                self.engine.abort_request(rid)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if not items:
        raise InvalidRequestError("no prompts given")
    if all(isinstance(t, int) for t in items):
        return [items]  # a single prompt of token ids
    return items
