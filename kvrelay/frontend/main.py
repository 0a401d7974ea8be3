"""`kvrelay frontend`: the OpenAI HTTP server over a runtime, and the coroutine `kvrelay
serve` runs in-process.

Owns: `frontend_main(argv)`, `serve_http` (uvicorn on a socket we bind ourselves, so port 0
works and the real URL is known; signals are handled by the caller, not uvicorn) and
`run_frontend`. Imports the frontend app, the worker pool and the runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Generator, Sequence

import uvicorn

from kvrelay.errors import KvRelayError
from kvrelay.frontend.app import FrontendConfig, create_app
from kvrelay.frontend.workers import WorkerPool
from kvrelay.observe.request_log import RequestLog
from kvrelay.router.placement import MODES, PlacementConfig
from kvrelay.router.policy import PolicyConfig, RouterPolicy
from kvrelay.router.service import RouterConfig
from kvrelay.runtime import make_runtime

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the owner sets `should_exit`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (and on the ones
    # accept() derives from them); without it Nagle + delayed ACKs add ~40 ms per response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KvRelayError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_http(
    pool: WorkerPool,
    config: FrontendConfig,
    stop: asyncio.Event,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve the app until `stop` is set, then finish in-flight requests (graceful)."""
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    request_log = RequestLog(config.request_log) if config.request_log else None
    app = create_app(pool, config, request_log=request_log)
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(uv_config)

    async def watch() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.02)
        if server.started and on_listening is not None:
            on_listening(url)
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        sock.close()
        if request_log is not None:
            request_log.close()


async def run_frontend(
    runtime_url: str,
    config: FrontendConfig,
    stop: asyncio.Event,
    on_listening: Callable[[str], None] | None = None,
    router: RouterConfig | None = None,
) -> None:
    runtime = make_runtime(runtime_url, name="frontend")
    await runtime.start()
    pool = WorkerPool(
        runtime, max_inflight_per_worker=config.max_inflight_per_worker, router=router
    )
    await pool.start()
    try:
        await serve_http(pool, config, stop, on_listening)
    finally:
        await pool.close()
        await runtime.close()


def add_http_flags(p: argparse.ArgumentParser, default_port: int = 8000) -> None:
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument(
        "--max-inflight-per-worker",
        type=int,
        default=64,
        help="requests per worker before answering 503 + Retry-After",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens allowed")
    p.add_argument(
        "--request-log",
        metavar="PATH",
        default=None,
        help="append one JSON line per served choice (its hit-rate ledger row and timings)",
    )
    add_router_flags(p)
    add_placement_flags(p)


def add_router_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--router",
        default=RouterPolicy.KV.value,
        choices=[policy.value for policy in RouterPolicy],
        help="worker choice (default kv; a request can override it with "
        '"kvrelay": {"router": NAME})',
    )
    p.add_argument(
        "--router-overlap-weight",
        type=float,
        default=1.0,
        help="kv cost weight of prefill blocks against decode blocks (default 1.0)",
    )
    p.add_argument(
        "--router-temperature",
        type=float,
        default=0.0,
        help="kv: 0 picks the cheapest worker; > 0 samples a softmax over costs",
    )
    p.add_argument(
        "--router-block-size",
        type=int,
        default=None,
        help="block size the router hashes prompts with (default: the workers'); workers "
        "with another block size are refused, loudly",
    )
    p.add_argument("--router-seed", type=int, default=None, help="seed of random choices")


def add_placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--remote-prefill",
        default="auto",
        choices=MODES,
        help="with prefill workers: auto (the placement rule), always (every request with a "
        "missing block; for tests), never",
    )
    p.add_argument(
        "--remote-prefill-min-tokens",
        type=int,
        default=256,
        help="auto: least uncached prompt tokens for a remote prefill",
    )
    p.add_argument(
        "--remote-prefill-timeout",
        type=float,
        default=10.0,
        help="seconds without a KV run before the decode worker prefills locally",
    )


def router_config(args: argparse.Namespace) -> RouterConfig:
    policy = PolicyConfig(
        policy=RouterPolicy(args.router),
        overlap_weight=args.router_overlap_weight,
        temperature=args.router_temperature,
    )
    placement = PlacementConfig(
        mode=getattr(args, "remote_prefill", "auto"),
        min_remote_tokens=getattr(args, "remote_prefill_min_tokens", 256),
        timeout_s=getattr(args, "remote_prefill_timeout", 10.0),
    )
    return RouterConfig(
        policy=policy,
        block_size=args.router_block_size,
        seed=args.router_seed,
        placement=placement,
    )


def frontend_config(args: argparse.Namespace) -> FrontendConfig:
    return FrontendConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_inflight_per_worker=args.max_inflight_per_worker,
        max_tokens=args.max_tokens,
        request_log=args.request_log,
    )


def frontend_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvrelay frontend`; returns the exit code."""
    p = argparse.ArgumentParser(prog="kvrelay frontend", description="OpenAI-compatible API.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--nats", metavar="URL", help="NATS server, e.g. nats://127.0.0.1:4222")
    where.add_argument("--hub", metavar="URL", help="embedded hub URL")
    add_http_flags(p)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s [frontend] %(name)s: %(message)s",
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_frontend(
            args.nats or args.hub,
            frontend_config(args),
            stop,
            lambda url: print(f"kvrelay frontend listening on {url}", flush=True),
            router_config(args),
        )

    try:
        asyncio.run(main())
    except KvRelayError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(frontend_main())
