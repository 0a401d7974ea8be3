"""Synthetic code-generation workloads, by name: `code-sessions`, `fim`, `agent`, `humaneval`.

Owns: the registry `make_workload(name, seed, options)`. Each generator is seeded and lazy;
see `base.py` for what a workload is. Trace replay lives in `kvrelay.bench.traces`.
Must not import the load client, reports or trace code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kvrelay.bench.workloads.agent import AgentOptions, AgentWorkload
from kvrelay.bench.workloads.base import Workload, parse_options
from kvrelay.bench.workloads.code_sessions import CodeSessionsOptions, CodeSessionsWorkload
from kvrelay.bench.workloads.fim import FimOptions, FimWorkload
from kvrelay.bench.workloads.humaneval import HumanEvalOptions, HumanEvalWorkload
from kvrelay.errors import InvalidRequestError

_FACTORIES: dict[str, Callable[[int, Mapping[str, str]], Workload]] = {
    "code-sessions": lambda seed, raw: CodeSessionsWorkload(
        parse_options(CodeSessionsOptions, raw), seed
    ),
    "fim": lambda seed, raw: FimWorkload(parse_options(FimOptions, raw), seed),
    "agent": lambda seed, raw: AgentWorkload(parse_options(AgentOptions, raw), seed),
    "humaneval": lambda seed, raw: HumanEvalWorkload(parse_options(HumanEvalOptions, raw), seed),
}
WORKLOAD_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_workload(name: str, seed: int = 0, options: Mapping[str, str] | None = None) -> Workload:
    """The workload `name` with `options` (`key=value` strings, as `-W` gives them)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise InvalidRequestError(
            f"unknown workload {name!r}; expected one of {', '.join(WORKLOAD_NAMES)} "
            "or the path of a trace file"
        )
    return factory(seed, options or {})


__all__ = ["WORKLOAD_NAMES", "Workload", "make_workload"]
