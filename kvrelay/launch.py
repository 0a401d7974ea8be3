"""`kvrelay serve`: one command for a whole single-host deployment.

Owns: `serve_main(argv)` and `WorkerSupervisor`. Starts an embedded hub (or uses `--nats`),
N worker processes (`python -m kvrelay.worker`), and the frontend in this process; prints
the URL; restarts a worker that exits unexpectedly (with backoff); on Ctrl-C / SIGTERM
stops the frontend (draining in-flight requests), then the workers (SIGTERM, then SIGKILL).
Layer L5 next to cli: imports frontend and runtime; starts workers as processes, so it
never imports the worker or the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvrelay.config import DEFAULT_MODEL
from kvrelay.errors import KvRelayError
from kvrelay.frontend.main import add_http_flags, frontend_config, router_config, serve_http
from kvrelay.frontend.workers import WorkerPool
from kvrelay.runtime import make_runtime
from kvrelay.runtime.embedded import EmbeddedHub

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 20.0
MAX_BACKOFF_S = 10.0
HEALTHY_RUN_S = 30.0  # a worker that ran this long restarts without backoff


@dataclass
class _Child:
    worker_id: str
    proc: asyncio.subprocess.Process | None = None
    num_restarts: int = 0
    started_at: float = 0.0


class WorkerSupervisor:
    """Keeps `num_workers` worker processes running until `stop`."""

    def __init__(
        self,
        command: Callable[[str], list[str]],
        num_workers: int,
        worker_ids: Sequence[str] | None = None,
    ) -> None:
        self.command = command
        ids = list(worker_ids) if worker_ids else [f"worker-{i}" for i in range(num_workers)]
        self.children = [_Child(wid) for wid in ids]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for child in self.children:
            await self._spawn(child)
            self._tasks.append(asyncio.create_task(self._watch(child)))

    async def _spawn(self, child: _Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            *self.command(child.worker_id), start_new_session=True
        )
        child.started_at = time.monotonic()
        logger.info("started %s (pid %d)", child.worker_id, child.proc.pid)

    async def _watch(self, child: _Child) -> None:
        backoff = 0.5
        while not self._stopping:
            assert child.proc is not None
            rc = await child.proc.wait()
            if self._stopping:
                return
            ran_s = time.monotonic() - child.started_at
            backoff = 0.5 if ran_s > HEALTHY_RUN_S else min(backoff * 2, MAX_BACKOFF_S)
            logger.warning(
                "%s (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                child.worker_id,
                child.proc.pid,
                rc,
                ran_s,
                backoff,
            )
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            child.num_restarts += 1
            await self._spawn(child)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every worker (they drain), SIGKILL what is left after `timeout_s`."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for proc in procs:
                if proc.returncode is None:
                    logger.warning("worker pid %d did not stop; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for waiter in pending:
                with contextlib.suppress(Exception):
                    await waiter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay serve", description="Frontend + N workers.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, .gguf file or HF dir")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        help="disaggregated: prefill worker processes (with --decode-workers; replaces --workers)",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        help="disaggregated: decode worker processes (with --prefill-workers)",
    )
    p.add_argument(
        "--nats",
        metavar="URL",
        default=None,
        help="use this NATS server instead of the embedded runtime",
    )
    add_http_flags(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / workers)",
    )
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--no-kv-events",
        action="store_true",
        help="workers publish no KV events (the kv router goes blind; for tests and doctor)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def worker_ids(args: argparse.Namespace) -> list[str]:
    """`worker-i` when aggregated; `prefill-i` and `decode-i` when disaggregated."""
    if args.prefill_workers or args.decode_workers:
        return [f"prefill-{i}" for i in range(args.prefill_workers)] + [
            f"decode-{i}" for i in range(args.decode_workers)
        ]
    return [f"worker-{i}" for i in range(args.workers)]


def role_of(worker_id: str) -> str:
    return (
        worker_id.split("-", 1)[0]
        if worker_id.startswith(("prefill-", "decode-"))
        else ("aggregated")
    )


def worker_command(args: argparse.Namespace, runtime_url: str) -> Callable[[str], list[str]]:
    num = len(worker_ids(args))
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, num))
    flag = "--nats" if args.nats else "--hub"

    def command(worker_id: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "kvrelay.worker",
            flag,
            runtime_url,
            "--model",
            args.model,
            "--worker-id",
            worker_id,
            "--threads",
            str(threads),
            "--block-size",
            str(args.block_size),
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--log-level",
            args.log_level,
            "--parent-pid",
            str(os.getpid()),
            "--role",
            role_of(worker_id),
        ]
        for name in ("served_model_name", "num_kv_blocks", "max_model_len"):
            value = getattr(args, name)
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        if args.no_kv_events:
            cmd.append("--no-kv-events")
        return cmd

    return command


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub = None if args.nats else EmbeddedHub()
    url = args.nats or await hub.start()  # type: ignore[union-attr]
    ids = worker_ids(args)
    supervisor = WorkerSupervisor(worker_command(args, url), len(ids), ids)
    runtime = make_runtime(url, name="frontend")
    await runtime.start()
    pool = WorkerPool(
        runtime, max_inflight_per_worker=args.max_inflight_per_worker, router=router_config(args)
    )
    try:
        await pool.start()
        await supervisor.start()
        announce = asyncio.create_task(_announce_ready(pool, len(ids), stop))

        def on_listening(base: str) -> None:
            print(
                f"kvrelay: serving {args.model} at {base}/v1 "
                f"({len(ids)} workers starting; GET {base}/ready)",
                flush=True,
            )

        await serve_http(pool, frontend_config(args), stop, on_listening)
        announce.cancel()
    finally:
        logger.info("stopping: frontend drained; stopping workers")
        await supervisor.stop()
        await pool.close()
        await runtime.close()
        if hub is not None:
            await hub.close()


async def _announce_ready(pool: WorkerPool, num_workers: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if len(pool.workers()) >= num_workers and pool.is_ready():
            print(f"kvrelay: ready, {num_workers} workers serving {pool.models()}", flush=True)
            return
        await asyncio.sleep(0.1)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvrelay serve`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("kvrelay serve: --workers must be >= 1", file=sys.stderr)
        return 2
    if (args.prefill_workers or args.decode_workers) and args.decode_workers < 1:
        print(
            "kvrelay serve: --decode-workers must be >= 1 with --prefill-workers", file=sys.stderr
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s [serve] %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(args))
    except KvRelayError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
