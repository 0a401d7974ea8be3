"""What a workload is: sessions of turns, each turn one OpenAI request, all fixed by a seed.

Owns: `Message`, `RequestSpec`, `Turn`, `Session`, the `Workload` protocol, per-session random
generators and the option parsing shared by every generator. A workload never depends on what a
server answers (assistant replies in the history are synthetic), so the same seed gives the same
prompts against every server and the offline analysis sees exactly what the client sends.
Must not import the load client, reports or anything outside `kvrelay.bench.workloads`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from kvrelay.errors import InvalidRequestError

RequestKind = Literal["chat", "completion"]

# Code averages about four characters per token with the BPE vocabularies of small code models;
# generators size their text in characters from token budgets with this ratio.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Message:
    """One chat message; `role` is any role the server's chat template accepts."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class RequestSpec:
    """One request as the client sends it.

    `chat`: `messages` go to /v1/chat/completions. `completion`: `prompt` (text) or
    `prompt_token_ids` (trace replay) go to /v1/completions. `block_ids` and `block_size` are
    set only by trace replay: the trace's own block ids, for offline analysis without tokens.
    """

    request_id: str
    kind: RequestKind
    max_tokens: int
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    num_prompt_tokens_hint: int | None = None  # trace input length (tokens), when known
    block_ids: tuple[int, ...] | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class Turn:
    """A request plus when to send it.

    `delay_s`: pause after the previous turn of the session finished (think time, tool time);
    the client scales it. `at_s`: absolute send time from a trace (seconds from the run start),
    honoured in trace-timestamp mode and never before the previous turn finished.
    """

    request: RequestSpec
    delay_s: float = 0.0
    at_s: float | None = None


@dataclass(frozen=True)
class Session:
    """Turns that run strictly one after another (one user, one conversation or one file)."""

    session_id: str
    turns: tuple[Turn, ...]
    tags: Mapping[str, str] = field(default_factory=dict)


class Workload(Protocol):
    """A seeded, lazily generated stream of sessions.

    Rules: `sessions()` yields the same sessions in the same order every time it is called on
    an equal workload (same options, same seed, same corpus); it may be infinite (synthetic
    generators) or finite (HumanEval, traces); it never reads the network.
    """

    name: str

    def sessions(self) -> Iterator[Session]: ...

    def describe(self) -> dict[str, Any]:
        """Options and provenance for results.json (JSON-serializable)."""
        ...


def session_rng(seed: int, workload: str, index: int) -> random.Random:
    """An independent generator per session, so session i does not depend on how many random
    numbers earlier sessions drew (str seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"{workload}:{seed}:{index}")


def exp_pause(rng: random.Random, mean_s: float) -> float:
    """An exponentially distributed pause with the given mean (0 when the mean is 0)."""
    return rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0


def requests_of(sessions: Iterator[Session]) -> Iterator[RequestSpec]:
    """All requests of the sessions, session by session, in turn order."""
    for session in sessions:
        for turn in session.turns:
            yield turn.request


OptionsT = TypeVar("OptionsT")


def parse_options(cls: type[OptionsT], raw: Mapping[str, str]) -> OptionsT:
    """Build a frozen options dataclass from `key=value` strings (CLI `-W key=value`),
    converting each value to the field's type (int, float, bool, str, or None for 'none')."""
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise InvalidRequestError(f"unknown workload option {key!r}; known: {known}")
        values[name] = _convert(str(fields[name].type), text, key)
    return cls(**values)


def _convert(type_name: str, text: str, key: str) -> Any:
    if text.lower() == "none" and "None" in type_name:
        return None
    try:
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
        if type_name.startswith("bool"):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
    except ValueError as exc:
        raise InvalidRequestError(f"workload option {key}={text!r}: expected {type_name}") from exc
    return text
