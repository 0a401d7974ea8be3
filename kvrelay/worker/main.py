"""`kvrelay worker`: load one engine and serve it through a runtime until stopped.

Owns: `worker_main(argv)` (flags -> EngineConfig -> WorkerService) and the process's signal
handling (SIGTERM / SIGINT drain and exit; losing the runtime exits too, so workers never
outlive an embedded `kvrelay serve`). Imports the engine core, the runtime and the worker
service; must not import the frontend.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvrelay.config import DEFAULT_MODEL, CacheConfig, EngineConfig, SchedulerConfig
from kvrelay.errors import KvRelayError
from kvrelay.kv.tcp_transport import TcpTransport
from kvrelay.protocol import ROLE_AGGREGATED, ROLES
from kvrelay.runtime import make_runtime
from kvrelay.worker.engine_loop import EngineLike
from kvrelay.worker.service import WorkerIdentity, WorkerService

logger = logging.getLogger(__name__)
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay worker", description="Serve one model replica.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--nats", metavar="URL", help="NATS server, e.g. nats://127.0.0.1:4222")
    where.add_argument("--hub", metavar="URL", help="embedded hub (set by `kvrelay serve`)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, .gguf file or HF dir")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: model's)")
    p.add_argument("--role", default=ROLE_AGGREGATED, choices=ROLES)
    p.add_argument(
        "--transfer-host",
        default="127.0.0.1",
        help="interface the KV transfer plane listens on (prefill / decode roles); "
        "use an address peers on other hosts can reach",
    )
    p.add_argument("--worker-id", default=None, help="stable id (default: worker-<pid>)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--no-kv-events",
        action="store_true",
        help="publish no KV events (the KV router cannot see this worker's cache; for tests)",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    p.add_argument("--log-level", default="INFO")
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        num_threads=args.threads,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_bytes=args.kv_cache_bytes,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs
        ),
    )


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvrelay worker`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.worker_id or 'worker'}] %(name)s: %(message)s",
    )
    from kvrelay.engine.core import EngineCore  # torch: only in processes that run a model

    try:
        config = engine_config(args)
        engine = in_passing_thread(lambda: EngineCore(config))
    except KvRelayError as exc:
        logger.error("cannot start the engine: %s", exc)
        return 2
    identity = WorkerIdentity(
        worker_id=args.worker_id or f"worker-{os.getpid()}",
        model=args.served_model_name or engine.model.name,
        role=args.role,
        block_size=engine.kv.block_size,
        num_kv_blocks=engine.kv.pool.num_blocks,
        kv_events=not args.no_kv_events,
    )
    url = args.nats or args.hub
    try:
        asyncio.run(
            _serve(
                url,
                engine,
                identity,
                engine.model.tokenizer,
                args.drain_timeout,
                args.parent_pid,
                None if args.role == ROLE_AGGREGATED else args.transfer_host,
            )
        )
    except KvRelayError as exc:
        logger.error("worker stopped: %s", exc)
        return 1
    return 0


def in_passing_thread(fn: Callable[[], T]) -> T:
    """`fn()` in a thread that ends with it: its result, or its exception.

    For loading the model. libgomp gives every thread that runs OpenMP work its own pool of
    threads, and once a process has more of them than CPUs it cuts idle spinning to a few
    microseconds, so the threads sleep between the matmuls of a step. The engine steps in its
    own thread (`EngineLoop`); a load in the main thread left the main thread's pool alive
    and the engine's throttled: batch-1 decode 57 vs 90 tok/s on 2 cores. A finished
    thread's pool is released, so the engine thread stays the only OpenMP user.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="engine-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


async def _serve(
    url: str,
    engine: EngineLike,
    identity: WorkerIdentity,
    tokenizer: Any,
    drain_s: float,
    parent_pid: int | None,
    transfer_host: str | None = None,
) -> None:
    runtime = make_runtime(url, name=identity.worker_id)
    await runtime.start()
    transport = None if transfer_host is None else TcpTransport(host=transfer_host)
    service = WorkerService(runtime, engine, identity, tokenizer, transport=transport)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.start()
    watcher = asyncio.create_task(_watch_parent(parent_pid, service)) if parent_pid else None
    await service.run_until_stopped(drain_s)
    if watcher is not None:
        watcher.cancel()


async def _watch_parent(parent_pid: int, service: WorkerService) -> None:
    """Stop when the supervisor is gone (we get re-parented), so workers never linger."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    logger.warning("parent process %d is gone; stopping", parent_pid)
    service.request_stop()


if __name__ == "__main__":
    sys.exit(worker_main())
