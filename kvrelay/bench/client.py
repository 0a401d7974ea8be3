"""The asynchronous load client: drives a workload against an OpenAI-compatible server.

Owns: `LoadConfig` and `run_load`. Arrivals: `poisson` (sessions start at exponential gaps,
`rate` per second; a single-turn workload's sessions are its requests), `trace` (every turn
at its trace time, never before its session's previous turn finished), or `closed`
(`concurrency` users, each running sessions back to back). Turns of a session run in order,
`delay_s * think_scale` apart. Limits: `num_requests` (requests sent) and/or `duration_s` (no
request starts later; in-flight ones get `drain_timeout_s` to finish); without either, the run
ends with the workload (finite ones: traces, HumanEval). `/metrics` is scraped
before and after. A rich progress bar runs on stderr unless disabled.
Speaks only HTTP/OpenAI (via `stream.py`); must not import server-side kvrelay code.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvrelay.bench.prom import parse_prometheus
from kvrelay.bench.results import RequestResult, RunResult
from kvrelay.bench.stream import RequestOptions, send_request
from kvrelay.bench.workloads.base import Session, Workload
from kvrelay.errors import InvalidRequestError, PeerUnavailableError

logger = logging.getLogger(__name__)

ArrivalMode = Literal["poisson", "trace", "closed"]


@dataclass(frozen=True)
class LoadConfig:
    """How to load the server. `url` is the server root (a trailing /v1 is accepted)."""

    url: str
    arrival: ArrivalMode = "closed"
    rate: float | None = None  # poisson: session starts per second
    concurrency: int = 1  # closed: simultaneous users
    num_requests: int | None = None
    duration_s: float | None = None
    model: str | None = None  # None: the first model of GET /v1/models
    seed: int = 0  # poisson arrival gaps
    think_scale: float = 1.0  # multiplies think/tool pauses between turns (0: none)
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 600.0
    metrics_url: str | None = None  # None: URL/metrics; "" disables scraping
    metrics_settle_s: float = 0.5  # wait before the last scrape so counters catch up
    progress: bool = True

    def __post_init__(self) -> None:
        if self.arrival == "poisson" and not (self.rate and self.rate > 0):
            raise InvalidRequestError("poisson arrivals need --rate > 0")
        if self.arrival == "closed" and self.concurrency < 1:
            raise InvalidRequestError("closed-loop load needs --concurrency >= 1")

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


def run_load_sync(workload: Workload, config: LoadConfig) -> RunResult:
    """`run_load` for synchronous callers (the CLI)."""
    return asyncio.run(run_load(workload, config))


async def run_load(workload: Workload, config: LoadConfig) -> RunResult:
    """Run `workload` against the server and return every request's measurements."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(
        base_url=config.base_url, headers=headers, timeout=timeout, limits=limits
    ) as http:
        model = config.model or await discover_model(http)
        before = await scrape_metrics(http, config)
        started_at = datetime.now(UTC).isoformat()
        runner = _Runner(
            workload,
            config,
            http,
            RequestOptions(
                model=model,
                temperature=config.temperature,
                ignore_eos=config.ignore_eos,
                extra_body=config.extra_body,
            ),
        )
        await runner.run()
        duration = runner.last_end_s()
        if config.metrics_settle_s > 0:
            await asyncio.sleep(config.metrics_settle_s)
        after = await scrape_metrics(http, config)
    return RunResult(
        config={**asdict(config), "extra_body": dict(config.extra_body), "api_key": None},
        workload=workload.describe(),
        model=model,
        started_at=started_at,
        duration_s=duration,
        requests=runner.results,
        metrics_before=before,
        metrics_after=after,
    )


async def discover_model(http: httpx.AsyncClient) -> str:
    """The id of the first model the server lists at /v1/models."""
    try:
        response = await http.get("/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
        return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, LookupError, TypeError, AttributeError) as exc:
        raise PeerUnavailableError(
            f"cannot list models at {http.base_url}/v1/models ({exc}); pass --model"
        ) from exc


async def scrape_metrics(http: httpx.AsyncClient, config: LoadConfig) -> dict[str, float] | None:
    """The server's /metrics samples, or None when it has none (logged, never raised)."""
    if config.metrics_url == "":
        return None
    url = config.metrics_url or f"{config.base_url}/metrics"
    try:
        response = await http.get(url)
    except httpx.HTTPError as exc:
        logger.warning("cannot scrape %s: %s", url, exc)
        return None
    if response.status_code != 200:
        logger.warning("cannot scrape %s: HTTP %d", url, response.status_code)
        return None
    return parse_prometheus(response.text)


class _Runner:
    """One run's shared state: the request budget, the results and the progress bar."""

    def __init__(
        self,
        workload: Workload,
        config: LoadConfig,
        http: httpx.AsyncClient,
        options: RequestOptions,
    ) -> None:
        self.workload = workload
        self.config = config
        self.http = http
        self.options = options
        self.results: list[RequestResult] = []
        self.num_started = 0
        self.num_errors = 0
        self.start = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not config.progress,
        )
        self.task_id = self.progress.add_task(workload.name, total=config.num_requests, errors=0)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        cfg = self.config
        if cfg.num_requests is not None and self.num_started >= cfg.num_requests:
            return True
        return cfg.duration_s is not None and self.now() >= cfg.duration_s

    def past_deadline(self, at_s: float) -> bool:
        return self.config.duration_s is not None and at_s >= self.config.duration_s

    def last_end_s(self) -> float:
        ends = [r.end_s for r in self.results if r.end_s is not None]
        return max(ends, default=self.now())

    async def run(self) -> None:
        self.start = time.perf_counter()
        with self.progress:
            sessions = self.workload.sessions()
            if self.config.arrival == "closed":
                tasks = [
                    asyncio.create_task(self._user(sessions))
                    for _ in range(self.config.concurrency)
                ]
            else:
                tasks = await self._spawn_open_loop(sessions)
            await self._drain(tasks)

    async def _user(self, sessions: Iterator[Session]) -> None:
        while not self.exhausted():
            session = next(sessions, None)  # shared iterator: users take turns from it
            if session is None:
                return
            await self._session(session)

    async def _spawn_open_loop(self, sessions: Iterator[Session]) -> list[asyncio.Task[None]]:
        rng = random.Random(f"arrivals:{self.config.seed}")
        tasks: list[asyncio.Task[None]] = []
        at_s = 0.0
        for session in sessions:
            if self.config.arrival == "trace":
                at_s = _session_time(session)
            elif tasks:
                assert self.config.rate is not None
                at_s += rng.expovariate(self.config.rate)
            if self.exhausted() or self.past_deadline(at_s):
                break
            await asyncio.sleep(max(0.0, at_s - self.now()))
            tasks.append(asyncio.create_task(self._session(session, at_s)))
        return tasks

    async def _session(self, session: Session, start_at_s: float | None = None) -> None:
        for index, turn in enumerate(session.turns):
            scheduled: float | None = None
            if self.config.arrival == "trace" and turn.at_s is not None:
                scheduled = turn.at_s
            elif index == 0:
                scheduled = start_at_s
            else:
                scheduled = self.now() + turn.delay_s * self.config.think_scale
            if scheduled is not None:
                if self.past_deadline(scheduled):
                    return
                await asyncio.sleep(max(0.0, scheduled - self.now()))
            if self.exhausted():
                return
            self.num_started += 1
            result = await send_request(
                self.http,
                turn.request,
                self.options,
                session_id=session.session_id,
                run_start=self.start,
                scheduled_s=scheduled,
            )
            self._record(result)

    def _record(self, result: RequestResult) -> None:
        self.results.append(result)
        if result.error is not None:
            self.num_errors += 1
            logger.debug("request %s failed: %s", result.request_id, result.error)
        self.progress.update(self.task_id, advance=1, errors=self.num_errors)

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for the sessions: until the duration plus the drain timeout when a duration is
        set (in-flight requests finish, no new ones start), else until they end."""
        pending = [t for t in tasks if not t.done()]
        if pending:
            timeout = None
            if self.config.duration_s is not None:
                timeout = max(0.0, self.config.duration_s - self.now())
                timeout += self.config.drain_timeout_s
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                logger.warning(
                    "cancelled %d sessions still running at the drain timeout", len(still)
                )
                await asyncio.gather(*still, return_exceptions=True)
        failures = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
        if failures:
            raise RuntimeError("a load-client session failed") from failures[0]


def _session_time(session: Session) -> float:
    at_s = session.turns[0].at_s if session.turns else None
    if at_s is None:
        raise InvalidRequestError(
            "trace-timestamp arrivals need a trace workload; use --rate or --concurrency"
        )
    return at_s
