"""OpenAI request bodies (msgspec Structs) and their validation.

Owns: `CompletionRequest`, `ChatCompletionRequest`, `decode_request` (malformed JSON -> 400,
wrong shape -> 422) and `check_common` (value ranges and unsupported options -> 400).
Unknown fields are ignored, as OpenAI-compatible servers do. Imports frontend.errors only.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import msgspec

from kvrelay.frontend.errors import ApiError
from kvrelay.protocol import MAX_SEED

MAX_N = 16  # choices per request (n x prompts)
MAX_STOP_STRINGS = 16


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class KvRelayOptions(msgspec.Struct, kw_only=True):
    """The request's `kvrelay` extension object: per-request router policy override."""

    router: str | None = None  # kv | round_robin | random | least_loaded


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields both endpoints share. None means "the default"."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (vLLM): generate exactly max_tokens
    kvrelay: KvRelayOptions | None = None  # extension: {"router": "round_robin"}


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: Any  # str | list[int] | list[str] | list[list[int]], checked in the app
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None


T = TypeVar("T", bound=msgspec.Struct)


def decode_request(body: bytes, kind: type[T]) -> T:
    """Parse a request body: not JSON -> 400; JSON of the wrong shape -> 422."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(422, f"invalid request: {exc}", code="invalid_request_body") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    return stops


def check_common(req: SamplingFields) -> None:
    """Value ranges and options this server does not implement (400 naming the field)."""
    t = req.temperature
    if t is not None and (not math.isfinite(t) or not 0 <= t <= 2):
        raise _bad(f"temperature must be in [0, 2], got {t}", "temperature")
    p = req.top_p
    if p is not None and (not math.isfinite(p) or not 0 < p <= 1):
        raise _bad(f"top_p must be in (0, 1], got {p}", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise _bad(f"top_k must be >= 0, got {req.top_k}", "top_k")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise _bad(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise _bad(f"seed must be in [0, 2**63 - 1], got {req.seed}", "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise _bad(f"{name} is not supported; omit it or send 0", name)
    if req.logit_bias:
        raise _bad("logit_bias is not supported", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options is only allowed with stream=true", "stream_options")


def check_max_tokens(value: int | None, param: str, limit: int) -> None:
    if value is not None and not 1 <= value <= limit:
        raise _bad(f"{param} must be between 1 and {limit}, got {value}", param)


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.logprobs is not None:
        raise _bad("logprobs is not supported", "logprobs")
    if req.echo:
        raise _bad("echo is not supported", "echo")
    if req.suffix:
        raise _bad("suffix is not supported", "suffix")
    if req.best_of not in (None, 1) and req.best_of != req.n:
        raise _bad("best_of other than n is not supported", "best_of")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.logprobs or req.top_logprobs:
        raise _bad("logprobs is not supported", "logprobs")
    if req.tools:
        raise _bad("tools are not supported", "tools")
    if req.response_format not in (None, {"type": "text"}):
        raise _bad("response_format other than text is not supported", "response_format")
    if not req.messages:
        raise _bad("messages must not be empty", "messages")


def message_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as the chat template expects them (text parts joined)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise _bad("only text content parts are supported", f"messages[{i}].content")
            content = "".join(part.text or "" for part in content)
        item: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out
