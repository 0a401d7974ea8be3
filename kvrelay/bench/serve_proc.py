"""Start `kvrelay serve` as a child process for a benchmark and learn its URL.

Owns: `running_serve(args)`, shared by the benchmarks that serve a model locally. Reads the
"kvrelay: serving ... at URL" and "kvrelay: ready" lines `kvrelay.launch` prints.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def running_serve(args: list[str], cwd: Path | None = None) -> Iterator[str]:
    """Run `python -m kvrelay.launch ARGS`; yield its base URL once every worker is ready,
    then stop it with SIGINT (graceful drain) and wait."""
    cmd = [sys.executable, "-m", "kvrelay.launch", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=cwd)
    try:
        assert proc.stdout is not None
        url = ""
        for raw in proc.stdout:
            line = raw.decode()
            if line.startswith("kvrelay: serving"):
                url = line.split(" at ")[1].split("/v1")[0]
            if line.startswith("kvrelay: ready") and url:
                break
        if not url:
            raise RuntimeError(f"kvrelay serve did not start: {' '.join(cmd)}")
        yield url
    finally:
        proc.send_signal(2)
        proc.wait(60)
