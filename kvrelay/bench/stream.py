"""One streamed OpenAI request over HTTP, timed chunk by chunk.

Owns: the request bodies for /v1/chat/completions and /v1/completions (streaming, with
`stream_options.include_usage` so the last chunk carries `usage`), the SSE reader, and
`send_request`, which turns one `RequestSpec` into a `RequestResult` (TTFT, inter-chunk gaps,
end-to-end time, usage token counts, cached tokens, the server's `kvrelay` extension object).
Speaks only HTTP/OpenAI, so it measures any compatible server the same way.
Must not import anything from kvrelay but bench workloads/results and errors.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvrelay.bench.results import RequestResult
from kvrelay.bench.workloads.base import RequestSpec


@dataclass(frozen=True)
class RequestOptions:
    """Per-request settings shared by a run."""

    model: str
    temperature: float = 0.0
    ignore_eos: bool = True  # vLLM/SGLang/kvrelay extension: always produce max_tokens
    extra_body: Mapping[str, Any] = field(default_factory=dict)


def request_body(spec: RequestSpec, options: RequestOptions) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of the OpenAI request for `spec`."""
    body: dict[str, Any] = {
        "model": options.model,
        "max_tokens": spec.max_tokens,
        "temperature": options.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.ignore_eos:
        body["ignore_eos"] = True
    body.update(options.extra_body)
    if spec.kind == "chat":
        body["messages"] = [m.as_dict() for m in spec.messages]
        return "/v1/chat/completions", body
    body["prompt"] = list(spec.prompt_token_ids) if spec.prompt_token_ids else spec.prompt
    return "/v1/completions", body


@dataclass
class _Timing:
    start: float
    chunk_times: list[float] = field(default_factory=list)


async def send_request(
    client: httpx.AsyncClient,
    spec: RequestSpec,
    options: RequestOptions,
    *,
    session_id: str,
    run_start: float,
    scheduled_s: float | None = None,
) -> RequestResult:
    """Send `spec` streaming and measure it; failures are recorded in the result, not raised.
    `run_start` is the `time.perf_counter()` value the run's offsets count from."""
    path, body = request_body(spec, options)
    timing = _Timing(time.perf_counter())
    result = RequestResult(
        request_id=spec.request_id,
        session_id=session_id,
        kind=spec.kind,
        start_s=timing.start - run_start,
        scheduled_s=scheduled_s,
    )
    try:
        async with client.stream("POST", path, json=body) as response:
            result.http_status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:500]}"
                return result
            await _read_events(response, result, timing)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    _finish(result, timing)
    return result


async def _read_events(response: httpx.Response, result: RequestResult, timing: _Timing) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter()
        try:
            event = json.loads(data)
        except ValueError:
            result.error = f"invalid SSE data: {data[:200]}"
            return
        if not isinstance(event, dict):
            continue
        if "error" in event:
            result.error = f"server error: {json.dumps(event['error'])[:500]}"
            return
        _read_event(event, result, timing, now)


def _read_event(event: dict[str, Any], result: RequestResult, timing: _Timing, now: float) -> None:
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        if text is None:
            text = choice.get("text")
        if text:
            timing.chunk_times.append(now)
        if choice.get("finish_reason"):
            result.finish_reason = str(choice["finish_reason"])
    usage = event.get("usage")
    if isinstance(usage, dict):
        result.num_prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        result.num_output_tokens = _int_or_none(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            result.num_cached_tokens = _int_or_none(details.get("cached_tokens"))
    extension = event.get("kvrelay")
    if isinstance(extension, dict):
        result.kvrelay = {**(result.kvrelay or {}), **extension}


def _finish(result: RequestResult, timing: _Timing) -> None:
    end = time.perf_counter()
    chunks = timing.chunk_times
    result.num_chunks = len(chunks)
    result.e2e_s = end - timing.start
    if chunks:
        result.ttft_s = chunks[0] - timing.start
        result.itl_s = [b - a for a, b in itertools.pairwise(chunks)]
    if result.num_output_tokens is None:
        result.num_output_tokens = len(chunks)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
