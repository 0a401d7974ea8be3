"""Records of a benchmark run: one row per request plus the run's context, and their JSON form.

Owns: `RequestResult` (what the client measured for one request), `RunResult` (a whole run:
config, workload description, model, per-request rows, /metrics snapshots) and
`load_run`/`RunResult.to_json`. Reports and `compare` read runs only through this module.
Must not import the load client, reports or plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvrelay.errors import InvalidRequestError

RESULTS_FILE = "results.json"


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds; `*_s` offsets from the run start.

    `itl_s`: gaps between consecutive streamed chunks that carried text, after the first
    (one gap per token when the server streams a token per chunk). Token counts come from the
    response's `usage` (None when the server sent none); `num_cached_tokens` from
    `usage.prompt_tokens_details.cached_tokens`; `kvrelay` is the server's extension object.
    """

    request_id: str
    session_id: str
    kind: str
    start_s: float
    scheduled_s: float | None = None  # intended send time (open loop); start_s - it = lateness
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    num_output_tokens: int | None = None
    num_chunks: int = 0
    finish_reason: str | None = None
    http_status: int | None = None
    error: str | None = None
    kvrelay: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def end_s(self) -> float | None:
        return None if self.e2e_s is None else self.start_s + self.e2e_s

    @property
    def cached_fraction(self) -> float | None:
        if not self.num_prompt_tokens or self.num_cached_tokens is None:
            return None
        return self.num_cached_tokens / self.num_prompt_tokens

    def token_times_s(self) -> list[float]:
        """Offsets from the run start at which text chunks arrived."""
        if self.ttft_s is None:
            return []
        times = [self.start_s + self.ttft_s]
        for gap in self.itl_s:
            times.append(times[-1] + gap)
        return times


@dataclass
class RunResult:
    """A finished run. `metrics_before`/`metrics_after`: parsed /metrics samples (sample
    name with labels -> value), None when the server exposes none."""

    config: dict[str, Any]
    workload: dict[str, Any]
    model: str
    started_at: str  # ISO 8601 wall-clock time of the run start
    duration_s: float  # run start to the last response
    requests: list[RequestResult] = field(default_factory=list)
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None
    aggregate: dict[str, Any] = field(default_factory=dict)  # filled by reports

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / RESULTS_FILE
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path


def load_run(path: Path) -> RunResult:
    """A run from its results.json (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read benchmark results {path}: {exc}") from exc
    known = {f.name for f in fields(RequestResult)}
    rows = [
        RequestResult(**{k: v for k, v in row.items() if k in known})
        for row in data.get("requests", [])
    ]
    run_fields = {f.name for f in fields(RunResult)} - {"requests"}
    return RunResult(requests=rows, **{k: v for k, v in data.items() if k in run_fields})
