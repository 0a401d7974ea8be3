"""Request traces: parsers for three public formats and their replay as a workload.

Owns: `TraceRecord`/`Trace`, `load_trace` (Mooncake FAST'25 JSONL, Azure LLM inference CSV,
Qwen-Bailian JSONL; format detected from the file), and `TraceWorkload`, which turns records
into sessions with trace-timestamp arrivals, time scaling and request limits. Prompts are token
ids synthesized per block id (the same id always gives the same tokens), so the prefix sharing
the trace records is the prefix sharing the server sees. Azure rows carry no block ids: each
prompt gets its own random tokens (no sharing; use Azure for load shape, not hit rates).
Must not import the load client or reports.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kvrelay.bench.workloads.base import RequestSpec, Session, Turn
from kvrelay.errors import InvalidRequestError

logger = logging.getLogger(__name__)

TraceFormat = Literal["mooncake", "azure", "qwen-bailian"]
FORMATS: tuple[TraceFormat, ...] = ("mooncake", "azure", "qwen-bailian")
MOONCAKE_BLOCK_SIZE = 512
BAILIAN_BLOCK_SIZE = 16
_AZURE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


class TraceFormatError(InvalidRequestError):
    """A trace file that does not parse as the format it was read as."""


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace; `timestamp_s` is seconds from the trace's first request."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None = None
    chat_id: int | None = None
    parent_chat_id: int | None = None  # None or -1: the first turn of a conversation
    turn: int = 1
    type: str | None = None


@dataclass(frozen=True)
class Trace:
    """Records sorted by time, with the block size their `hash_ids` are at (None: no ids)."""

    path: Path
    format: TraceFormat
    block_size: int | None
    records: tuple[TraceRecord, ...]


def detect_format(path: Path) -> TraceFormat:
    """Azure for .csv; for JSONL, Qwen-Bailian when rows have `chat_id`, else Mooncake."""
    if path.suffix.lower() == ".csv":
        return "azure"
    with path.open(encoding="utf-8") as stream:
        first = next((line for line in stream if line.strip()), "")
    try:
        row = json.loads(first)
    except ValueError as exc:
        raise TraceFormatError(f"{path}: first line is neither CSV nor JSON") from exc
    if not isinstance(row, dict):
        raise TraceFormatError(f"{path}: rows must be JSON objects")
    return "qwen-bailian" if "chat_id" in row else "mooncake"


def load_trace(path: Path | str, fmt: TraceFormat | None = None) -> Trace:
    """Read a trace file of format `fmt` (detected when None)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"trace file {path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt == "mooncake":
        return Trace(path, fmt, MOONCAKE_BLOCK_SIZE, tuple(_mooncake_records(path)))
    if fmt == "azure":
        return Trace(path, fmt, None, tuple(_azure_records(path)))
    if fmt == "qwen-bailian":
        return Trace(path, fmt, BAILIAN_BLOCK_SIZE, tuple(_bailian_records(path)))
    raise InvalidRequestError(f"unknown trace format {fmt!r}; expected one of {FORMATS}")


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as exc:
                    raise TraceFormatError(f"{path}:{number}: invalid JSON: {exc}") from exc


def _mooncake_records(path: Path) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    for number, row in _json_rows(path):
        try:
            records.append(
                TraceRecord(
                    timestamp_s=float(row["timestamp"]) / 1000.0,  # milliseconds in the file
                    input_length=int(row["input_length"]),
                    output_length=int(row["output_length"]),
                    hash_ids=tuple(int(h) for h in row["hash_ids"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFormatError(f"{path}:{number}: not a Mooncake row: {exc!r}") from exc
    return _sorted_from_zero(records)


def _azure_records(path: Path) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    start: datetime | None = None
    with path.open(encoding="utf-8", newline="") as stream:
        for number, row in enumerate(csv.DictReader(stream), 2):
            try:
                # Seven fractional digits in the file; strptime's %f takes at most six.
                when = datetime.strptime(row["TIMESTAMP"].strip()[:26], _AZURE_TIME_FORMAT)
                start = start or when
                records.append(
                    TraceRecord(
                        timestamp_s=(when - start).total_seconds(),
                        input_length=int(row["ContextTokens"]),
                        output_length=int(row["GeneratedTokens"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise TraceFormatError(f"{path}:{number}: not an Azure row: {exc!r}") from exc
    return _sorted_from_zero(records)


def _bailian_records(path: Path) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    for number, row in _json_rows(path):
        try:
            parent = row.get("parent_chat_id", -1)
            records.append(
                TraceRecord(
                    timestamp_s=float(row["timestamp"]),  # seconds in the file
                    input_length=int(row["input_length"]),
                    output_length=int(row["output_length"]),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                    chat_id=int(row["chat_id"]),
                    parent_chat_id=None if parent is None or int(parent) < 0 else int(parent),
                    turn=int(row.get("turn", 1)),
                    type=row.get("type"),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFormatError(f"{path}:{number}: not a Qwen-Bailian row: {exc!r}") from exc
    return _sorted_from_zero(records)


def _sorted_from_zero(records: list[TraceRecord]) -> list[TraceRecord]:
    if not records:
        return records
    records.sort(key=lambda r: r.timestamp_s)  # stable: equal timestamps keep file order
    t0 = records[0].timestamp_s
    if t0 == 0:
        return records
    return [replace(r, timestamp_s=r.timestamp_s - t0) for r in records]


# ---- replay ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceReplayOptions:
    """How to replay a trace (`-W key=value` on the command line)."""

    time_scale: float = 1.0  # multiplies trace times: 0.5 replays twice as fast
    start_s: float = 0.0  # skip requests before this trace time
    max_requests: int | None = None  # the first N requests (from start_s) only
    max_input_tokens: int | None = None  # cut longer prompts (their prefix is kept)
    max_output_tokens: int | None = None
    vocab_lo: int = 1000  # synthesized token ids lie in [vocab_lo, vocab_hi)
    vocab_hi: int = 30000
    sessions: bool = True  # Qwen-Bailian: chain turns of a conversation via parent_chat_id


class TraceWorkload:
    """A trace as sessions: one per request (Mooncake, Azure) or per conversation (Bailian).

    With `synthesize=False` requests carry block ids and lengths but no token ids (offline
    analysis of large traces without materializing their prompts).
    """

    def __init__(
        self,
        trace: Trace,
        options: TraceReplayOptions | None = None,
        seed: int = 0,
        synthesize: bool = True,
    ) -> None:
        self.trace = trace
        self.options = options or TraceReplayOptions()
        self.seed = seed
        self.synthesize = synthesize
        self.name = f"trace:{trace.path.name}"
        if not 0 <= self.options.vocab_lo < self.options.vocab_hi:
            raise InvalidRequestError("need 0 <= vocab_lo < vocab_hi")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.trace.path),
            "format": self.trace.format,
            "block_size": self.trace.block_size,
            "seed": self.seed,
            **asdict(self.options),
        }

    def selected(self) -> list[tuple[int, TraceRecord]]:
        """(index in the trace, record) of the records this replay sends."""
        chosen = [
            (i, r)
            for i, r in enumerate(self.trace.records)
            if r.timestamp_s >= self.options.start_s
        ]
        if self.options.max_requests is not None:
            chosen = chosen[: self.options.max_requests]
        return chosen

    def sessions(self) -> Iterator[Session]:
        chosen = self.selected()
        if not chosen:
            return
        t0 = chosen[0][1].timestamp_s
        for group in self._groups(chosen):
            turns: list[Turn] = []
            previous_s: float | None = None
            for index, record in group:
                at_s = (record.timestamp_s - t0) * self.options.time_scale
                delay = 0.0 if previous_s is None else max(0.0, at_s - previous_s)
                turns.append(Turn(self._request(index, record), delay_s=delay, at_s=at_s))
                previous_s = at_s
            first = group[0][1]
            key = first.chat_id if first.chat_id is not None else group[0][0]
            yield Session(f"{self.trace.format}-{key}", tuple(turns))

    def _groups(self, chosen: list[tuple[int, TraceRecord]]) -> list[list[tuple[int, TraceRecord]]]:
        """Conversations (root chat id -> its turns in time order), ordered by first turn."""
        if not (self.options.sessions and self.trace.format == "qwen-bailian"):
            return [[item] for item in chosen]
        root_of: dict[int, int] = {}
        groups: dict[int, list[tuple[int, TraceRecord]]] = {}
        for item in chosen:
            record = item[1]
            assert record.chat_id is not None
            parent = record.parent_chat_id
            root = root_of.get(parent, record.chat_id) if parent is not None else record.chat_id
            root_of[record.chat_id] = root
            groups.setdefault(root, []).append(item)
        return list(groups.values())  # dicts keep insertion order: by first turn's time

    def _request(self, index: int, record: TraceRecord) -> RequestSpec:
        opts = self.options
        num_tokens = record.input_length
        if opts.max_input_tokens is not None:
            num_tokens = min(num_tokens, opts.max_input_tokens)
        block_ids = record.hash_ids
        size = self.trace.block_size
        if block_ids is not None and size is not None:
            block_ids = block_ids[: -(-num_tokens // size)]
        output = record.output_length
        if opts.max_output_tokens is not None:
            output = min(output, opts.max_output_tokens)
        tokens: tuple[int, ...] = ()
        if self.synthesize:
            tokens = self.prompt_tokens(index, record, num_tokens)
        return RequestSpec(
            request_id=f"{self.trace.format}-{index}",
            kind="completion",
            max_tokens=max(1, output),
            prompt_token_ids=tokens,
            num_prompt_tokens_hint=num_tokens,
            block_ids=block_ids,
            block_size=size,
        )

    def prompt_tokens(self, index: int, record: TraceRecord, num_tokens: int) -> tuple[int, ...]:
        """`num_tokens` prompt token ids: per block id when the trace has them, else unique."""
        lo, hi = self.options.vocab_lo, self.options.vocab_hi
        size = self.trace.block_size
        if record.hash_ids is None or size is None:
            rng = np.random.default_rng([self.seed, 1 << 40, index])
            return tuple(int(t) for t in rng.integers(lo, hi, size=num_tokens))
        num_blocks = -(-num_tokens // size)
        blocks = [block_tokens(h, size, self.seed, lo, hi) for h in record.hash_ids[:num_blocks]]
        flat = np.concatenate(blocks)[:num_tokens] if blocks else np.zeros(0, dtype=np.int64)
        return tuple(int(t) for t in flat)


def block_tokens(
    block_id: int, block_size: int, seed: int, lo: int, hi: int
) -> npt.NDArray[np.int64]:
    """The token ids standing for trace block `block_id`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, block_id % (1 << 64)])
    return rng.integers(lo, hi, size=block_size)


def token_count_summary(records: Sequence[TraceRecord]) -> dict[str, float]:
    """Request count, duration and mean lengths of a trace, for `analyze` reports."""
    if not records:
        return {"num_requests": 0}
    inputs = np.array([r.input_length for r in records], dtype=np.float64)
    outputs = np.array([r.output_length for r in records], dtype=np.float64)
    return {
        "num_requests": len(records),
        "duration_s": records[-1].timestamp_s - records[0].timestamp_s,
        "mean_input_tokens": float(inputs.mean()),
        "mean_output_tokens": float(outputs.mean()),
    }
