"""The HTTP app: FastAPI routes for the OpenAI API, health, readiness, metrics and worker
introspection; authentication, the body-size bound and OpenAI-style error bodies.

Owns: `FrontendConfig` and `create_app(pool, config)`. The only package that imports the
web framework (FastAPI / Starlette). Imports frontend modules, router and observe.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvrelay.errors import KvRelayError
from kvrelay.frontend.errors import ApiError, from_exception
from kvrelay.frontend.handlers import Limits, OpenAIHandlers, RouteOptions, model_list
from kvrelay.frontend.responses import Result
from kvrelay.frontend.workers import WorkerPool
from kvrelay.observe.prometheus import CONTENT_TYPE, RouterWorkerSample, ServingMetrics
from kvrelay.observe.request_log import RequestLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_inflight_per_worker: int = 64  # past this on every worker: 503 + Retry-After
    max_tokens: int = 4096
    default_chat_max_tokens: int = 1024
    request_log: str | None = None  # JSONL file: one ledger row + timings per choice


WORKLOAD_HEADER = "x-kvrelay-workload"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"request body of {declared} bytes exceeds the {limit}-byte limit",
            code="request_too_large",
        )
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(
                413, f"request body exceeds the {limit}-byte limit", code="request_too_large"
            )
        parts.append(part)
    return b"".join(parts)


def to_response(result: Result) -> Response:
    if result.stream is not None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(result.stream, media_type="text/event-stream", headers=headers)
    return json_response(result.body)


def serving_metrics(pool: WorkerPool) -> ServingMetrics:
    """Metrics wired to the pool's load reports and its router's ledger and event stats."""
    router = pool.router

    def router_samples() -> list[RouterWorkerSample]:
        return [
            RouterWorkerSample(model, worker, s.num_event_batches, s.num_dumps_requested, n)
            for model, worker, s, n in router.event_stats()
        ]

    def placements() -> list[tuple[str, str, int]]:
        return [(m, r, c) for (m, r), c in pool.disagg.decisions.items()]

    return ServingMetrics(pool.loads, router.metric_samples, router_samples, placements)


def create_app(
    pool: WorkerPool,
    config: FrontendConfig,
    metrics: ServingMetrics | None = None,
    request_log: RequestLog | None = None,
) -> FastAPI:
    """The app; `request_log` (else one opened at `config.request_log`) is the caller's to
    close."""
    metrics = metrics if metrics is not None else serving_metrics(pool)
    if request_log is None and config.request_log:
        request_log = RequestLog(config.request_log)
    app = FastAPI(title="kvrelay", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.request_log = request_log
    _install_error_handlers(app)
    _add_ops_routes(app, pool, metrics)
    limits = Limits(config.max_tokens, config.default_chat_max_tokens)
    handlers = OpenAIHandlers(pool, metrics, limits, request_log)
    _add_api_routes(app, pool, handlers, config)
    return app


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless `Authorization: Bearer <api_key>` (no-op without an API key)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
        raise ApiError(
            401,
            "missing or invalid API key (send Authorization: Bearer <key>)",
            code="invalid_api_key",
        )


def _add_ops_routes(app: FastAPI, pool: WorkerPool, metrics: ServingMetrics) -> None:
    """Unauthenticated: liveness, readiness, Prometheus."""

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if pool.is_ready():
            return json_response({"status": "ready", "models": pool.models()})
        body = {"status": "not ready", "workers": len(pool.workers())}
        return json_response(body, 503, {"Retry-After": "1"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_api_routes(
    app: FastAPI, pool: WorkerPool, handlers: OpenAIHandlers, config: FrontendConfig
) -> None:
    """The OpenAI API and worker introspection, behind the optional API key."""

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_api_key(request, config.api_key)
        return json_response(model_list(pool, pool.models()))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_api_key(request, config.api_key)
        body = await read_body(request, config.max_body_bytes)
        route = RouteOptions(request.headers.get(WORKLOAD_HEADER))
        return to_response(await handlers.completions(body, request.is_disconnected, route))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_api_key(request, config.api_key)
        body = await read_body(request, config.max_body_bytes)
        route = RouteOptions(request.headers.get(WORKLOAD_HEADER))
        return to_response(await handlers.chat(body, request.is_disconnected, route))

    @app.get("/kvrelay/workers")
    async def workers(request: Request) -> Response:
        check_api_key(request, config.api_key)
        loads = {r.worker_id: msgspec.to_builtins(r) for _, r in pool.loads()}
        data = [
            {
                **msgspec.to_builtins(w),
                "load": loads.get(w.worker_id),
                "inflight": pool.inflight.get(w.worker_id, 0),
                "router": pool.router.worker_view(w.worker_id),
            }
            for w in pool.workers()
        ]
        return json_response({"workers": data, "router": pool.router.summary()})

    @app.get("/kvrelay/workers/{worker_id}/stats")
    async def worker_stats(worker_id: str, request: Request) -> Response:
        check_api_key(request, config.api_key)
        return json_response(msgspec.to_builtins(await pool.worker_stats(worker_id)))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(KvRelayError)
    async def on_kvrelay_error(_request: Request, exc: KvRelayError) -> Response:
        return error_response(from_exception(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(ApiError(422, str(exc), code="invalid_request_body"))

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, exc: Exception) -> Response:
        error = from_exception(exc)
        if error.status >= 500:
            logger.exception("unhandled error", exc_info=exc)
        return error_response(error)
