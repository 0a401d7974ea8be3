"""OpenAI response bodies: completions, chat completions, their stream chunks, usage, and
the `kvrelay` extension object.

Owns: pure functions from `ChoiceState`s to JSON-ready dicts and the SSE line format.
`usage.prompt_tokens_details.cached_tokens` is always present; the extension carries each
choice's hit-rate ledger row (`observe.ledger.LedgerRow`). Imports frontend.generation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from kvrelay.frontend.generation import ChoiceState, Delta

SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Result:
    """What a handler returns: a JSON body, or an SSE byte stream."""

    body: dict[str, Any] | None = None
    stream: AsyncGenerator[bytes, None] | None = None


@dataclass(frozen=True)
class ResponseMeta:
    request_id: str
    created: int
    model: str
    chat: bool

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object_name(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


# Characters some line splitters (Python's str.splitlines, used by e.g. httpx.iter_lines) treat
# as line breaks; JSON allows them raw, so escape them to keep every event on one line.
_LINE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def sse(payload: dict[str, Any]) -> bytes:
    data = msgspec.json.encode(payload)
    for raw, escaped in _LINE_BREAKS:
        data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


def usage(states: Sequence[ChoiceState]) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice); cached tokens are the first
    choice's of each prompt (later choices of the same prompt hit the cache it filled)."""
    first: dict[int, ChoiceState] = {}
    for s in sorted(states, key=lambda s: s.index):
        first.setdefault(s.prompt_index, s)
    prompt = sum(s.num_prompt_tokens for s in first.values())
    completion = sum(s.num_output_tokens for s in states)
    cached = sum(s.num_cached_tokens for s in first.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def disagg_extension(s: ChoiceState) -> dict[str, Any] | None:
    """Where the prompt was computed: None for a local prefill."""
    d = s.disagg
    if d is None:
        return None
    return {
        "prefill_worker": d.prefill_worker,
        "decode_worker": s.worker_id,
        "transfer_ms": _ms(d.transfer_s),
        "transfer_bytes": d.num_bytes,
        "transfer_blocks": d.num_blocks,
        "imported_tokens": d.num_imported_tokens,
        "prefill_worker_cached_tokens": d.num_remote_cached_tokens,
        "prefill_worker_computed_tokens": d.num_imported_tokens - d.num_remote_cached_tokens,
        "decode_worker_computed_tokens": s.num_prompt_tokens - s.num_cached_tokens,
        "decode_worker_cached_tokens": s.num_cached_tokens - d.num_imported_tokens,
        "fallback": d.fallback,
        "fallback_reason": d.fallback_reason or None,
    }


def kvrelay_extension(request_id: str, states: Sequence[ChoiceState]) -> dict[str, Any]:
    """Which workers served the request, engine timings, cached tokens and the ledger row,
    per choice and overall (times: the slowest choice; `ledger`: the first choice's row)."""
    choices = []
    for s in sorted(states, key=lambda s: s.index):
        m = s.metrics
        choices.append(
            {
                "index": s.index,
                "worker": s.worker_id,
                "prompt_tokens": s.num_prompt_tokens,
                "cached_tokens": s.num_cached_tokens,
                "completion_tokens": s.num_output_tokens,
                "queue_ms": _ms(m.queue_s if m else None),
                "prefill_ms": _ms(m.prefill_s if m else None),
                "decode_ms": _ms(m.decode_s if m else None),
                "ttft_ms": _ms(s.first_token_s),
                "ledger": None if s.ledger is None else msgspec.to_builtins(s.ledger),
                "disagg": disagg_extension(s),
            }
        )

    def slowest(key: str) -> float | None:
        values = [float(v) for c in choices if isinstance(v := c[key], int | float)]
        return max(values) if values else None

    return {
        "request_id": request_id,
        "workers": sorted({s.worker_id for s in states if s.worker_id}),
        "cached_tokens": usage(states)["prompt_tokens_details"]["cached_tokens"],
        "queue_ms": slowest("queue_ms"),
        "prefill_ms": slowest("prefill_ms"),
        "decode_ms": slowest("decode_ms"),
        "ttft_ms": slowest("ttft_ms"),
        "ledger": choices[0]["ledger"] if choices else None,
        "disagg": choices[0]["disagg"] if choices else None,
        "choices": choices,
    }


def full_response(meta: ResponseMeta, states: Sequence[ChoiceState]) -> dict[str, Any]:
    choices = []
    for s in sorted(states, key=lambda s: s.index):
        text = "".join(s.text)
        choice: dict[str, Any] = {"index": s.index, "logprobs": None}
        if meta.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = s.finish_reason
        choices.append(choice)
    return {
        "id": meta.request_id,
        "object": meta.object_name,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(states),
        "kvrelay": kvrelay_extension(meta.request_id, states),
    }


def _chunk(meta: ResponseMeta, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": meta.request_id,
        "object": meta.chunk_object_name,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }


def role_chunk(meta: ResponseMeta, index: int) -> dict[str, Any]:
    """Chat streams open each choice with the assistant role."""
    delta = {"role": "assistant", "content": ""}
    return _chunk(meta, [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])


def delta_chunk(meta: ResponseMeta, delta: Delta) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": delta.index, "logprobs": None}
    if meta.chat:
        choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
    else:
        choice["text"] = delta.text
    choice["finish_reason"] = delta.finish_reason
    return _chunk(meta, [choice])


def usage_chunk(meta: ResponseMeta, states: Sequence[ChoiceState]) -> dict[str, Any]:
    """The final chunk with `stream_options.include_usage`: no choices, usage, extension."""
    body = _chunk(meta, [])
    body["usage"] = usage(states)
    body["kvrelay"] = kvrelay_extension(meta.request_id, states)
    return body
