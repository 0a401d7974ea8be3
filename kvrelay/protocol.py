"""Wire types: everything that crosses a process or API boundary, as msgspec Structs.

Owns: sampling parameters, request outputs and their timing metrics. Imports only
`errors` from kvrelay (layer L0). KV event types live in `kv/events.py`.
"""

from __future__ import annotations

import math

import msgspec

from kvrelay.errors import InvalidSamplingParamsError

MAX_SEED = 2**63 - 1


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick output tokens and when to stop.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters.
    A seed makes sampling reproducible per request, independent of batching.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidSamplingParamsError naming the field and its valid range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidSamplingParamsError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidSamplingParamsError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParamsError(
                f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidSamplingParamsError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidSamplingParamsError(
                f"seed must be in [0, 2**63 - 1] or None, got {self.seed!r}"
            )
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParamsError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestMetrics(msgspec.Struct, kw_only=True):
    """Per-request timings in seconds, measured by the engine.

    queue_s: arrival until first scheduled. prefill_s: first scheduled until the
    first output token. decode_s: first output token until finished.
    """

    arrival_time: float
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_preemptions: int = 0

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.prefill_s


class RequestOutput(msgspec.Struct, kw_only=True):
    """One request's result so far (streamed) or in full (finished).

    num_cached_tokens counts prompt tokens served from the prefix cache on the
    request's first scheduling (tokens, not blocks).
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


# -- serving: frontend <-> worker over the runtime ------------------------------------------

ROLE_AGGREGATED = "aggregated"
ROLE_PREFILL = "prefill"  # computes prompt KV for decode workers; serves no generate calls
ROLE_DECODE = "decode"  # generates; may import a prompt's KV from a prefill worker
ROLES = (ROLE_AGGREGATED, ROLE_PREFILL, ROLE_DECODE)


class RemotePrefill(msgspec.Struct, frozen=True, kw_only=True):
    """Frontend -> decode worker: fetch the prompt's missing KV blocks from this prefill
    worker (request-plane `address`) before running the request; `timeout_s` bounds every
    wait on the transfer (no run for that long: fall back to a local prefill)."""

    worker_id: str
    address: str
    timeout_s: float = 10.0


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Frontend -> worker: generate for already-tokenized prompt ids."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    model: str = ""
    cache_salt: str | None = None
    remote_prefill: RemotePrefill | None = None


class PrefillRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Decode worker -> prefill worker: compute (or find cached) the prompt blocks
    [first_block, first_block + len(block_hashes)) and stream them to `transfer_address`."""

    request_id: str
    prompt_token_ids: list[int]
    first_block: int
    block_hashes: list[int]
    transfer_address: str
    cache_salt: str | None = None
    timeout_s: float = 10.0


class PrefillResult(msgspec.Struct, frozen=True, kw_only=True):
    """Prefill worker -> decode worker, after the transfer's end marker was acknowledged."""

    worker_id: str
    num_blocks: int = 0
    num_bytes: int = 0
    num_cached_tokens: int = 0  # of the sent blocks' tokens, found in the prefill cache
    error: WireError | None = None


class DisaggInfo(msgspec.Struct, kw_only=True):
    """How a remote prefill went, on the decode worker's finishing chunk.

    num_imported_tokens: prompt tokens whose KV arrived and was imported (they show up in the
    chunk's num_cached_tokens, but were not cache hits of the decode worker).
    num_remote_cached_tokens: of those, tokens the prefill worker served from its own cache.
    fallback: the transfer failed or timed out; the rest was prefilled locally.
    """

    prefill_worker: str
    transfer_s: float = 0.0
    num_blocks: int = 0
    num_bytes: int = 0
    num_imported_tokens: int = 0
    num_remote_cached_tokens: int = 0
    fallback: bool = False
    fallback_reason: str = ""


class WireError(msgspec.Struct, frozen=True, kw_only=True):
    """A request failed on the worker. kind: "invalid_request" | "prompt_too_long" |
    "invalid_sampling" | "draining" | "internal"."""

    kind: str
    message: str


class GenerateChunk(msgspec.Struct, kw_only=True):
    """Worker -> frontend: the tokens a request produced since the previous chunk.

    num_output_tokens is cumulative; the last chunk has finished=True and the metrics.
    A chunk with `error` set ends the stream.
    """

    request_id: str
    new_token_ids: list[int] = msgspec.field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    metrics: RequestMetrics | None = None
    worker_id: str = ""
    error: WireError | None = None
    disagg: DisaggInfo | None = None  # set on the finishing chunk of a remote-prefill request


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker registers in discovery. instance_id changes on every (re)start."""

    worker_id: str
    instance_id: str
    model: str
    role: str = ROLE_AGGREGATED
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    address: str  # request-plane address, meaningful to the runtime backend
    pid: int = 0
    started_at: float = 0.0
    kv_events: bool = True  # False: publishes no KV events (`--no-kv-events`), serves no dumps
    transfer_address: str = ""  # KV transfer plane (prefill / decode roles), e.g. tcp://h:p
    kv_bytes_per_block: int = 0  # one block's KV payload (placement's transfer estimate)


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's load and prefix-cache counters (token-weighted, since start)."""

    worker_id: str
    instance_id: str
    ts: float
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_blocks: int
    kv_usage: float
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_preempted: int = 0
    num_inflight: int = 0  # requests the worker is streaming (accepted, not finished)
    last_kv_event_id: int = -1  # id of the last KV event batch its engine emitted (-1: none)
    num_queued_prefill_tokens: int = 0  # prefill role: prompt tokens of remote prefills in flight


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """What a frontend needs to serve a model it does not have on disk: tokenizer files
    (name -> bytes), context length and stop tokens."""

    model: str
    max_model_len: int
    block_size: int
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    tokenizer_files: dict[str, bytes] = msgspec.field(default_factory=dict)
