"""Helpers that start kvrelay processes (`serve`, `frontend`, `worker`) for end-to-end tests,
wait for them to be ready, and stop them."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

URL_RE = re.compile(r"(http://127\.0\.0\.1:\d+)")
START_TIMEOUT_S = 90.0


class Proc:
    """A kvrelay process; stdout is read for its URL, stderr goes to a log file."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=self._log, env=env
        )
        self.lines: list[str] = []

    def wait_for_line(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if pattern in line:
                    return line
            if self.proc.poll() is not None:
                break
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().decode()
                if line:
                    self.lines.append(line)
        raise AssertionError(f"no {pattern!r} from the process; log:\n{self.log()}")

    def url(self, pattern: str) -> str:
        match = URL_RE.search(self.wait_for_line(pattern))
        assert match is not None
        return match.group(1)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def started(args: Sequence[str], log_path: Path) -> Iterator[Proc]:
    proc = Proc(args, log_path)
    try:
        yield proc
    finally:
        proc.stop()


def wait_ready(base_url: str, timeout_s: float = START_TIMEOUT_S, workers: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                live = httpx.get(f"{base_url}/kvrelay/workers", timeout=2, headers=AUTH).json()
                if len(live["workers"]) >= workers:
                    return
        time.sleep(0.2)
    raise AssertionError(f"{base_url} not ready after {timeout_s}s")


API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@contextlib.contextmanager
def nats_deployment(
    nats_url: str,
    model: Path,
    logs: Path,
    workers: Sequence[tuple[str, Sequence[str]]],
    frontend_args: Sequence[str] = (),
) -> Iterator[tuple[str, Proc]]:
    """Workers (worker id, extra flags) and a frontend as separate processes over the NATS
    server at `nats_url`; yields the frontend's base URL, once every worker is routable, and
    its process. Everything is stopped on exit."""
    with contextlib.ExitStack() as stack:
        for worker_id, extra in workers:
            args = [
                "-m", "kvrelay.worker", "--nats", nats_url, "--model", str(model),
                "--worker-id", worker_id, "--threads", "1", *extra,
            ]  # fmt: skip
            stack.callback(Proc(args, logs / f"{worker_id}.log").stop)
        frontend = Proc(
            ["-m", "kvrelay.frontend.main", "--nats", nats_url, "--port", "0", *frontend_args],
            logs / "frontend.log",
        )
        stack.callback(frontend.stop)
        base = frontend.url("listening")
        wait_ready(base, workers=len(workers))
        yield base, frontend
