"""`in_passing_thread`: the worker loads its model in a thread that ends, leaving no OpenMP
pool behind the main thread (one would throttle the engine thread's OpenMP team)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.worker.main import in_passing_thread

# A fresh interpreter: before, after a parallel torch op run through in_passing_thread, and
# after the same op run in the main thread. libgomp keeps a thread's pool until it ends.
_SCRIPT = """
import os, time, torch
from kvrelay.worker.main import in_passing_thread
torch.set_num_threads(2)
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
in_passing_thread(lambda: torch.ones(1 << 22).sum().item())
deadline = time.monotonic() + 5  # the pool's threads exit after the loading thread
while count() > before and time.monotonic() < deadline:
    time.sleep(0.01)
passing = count()
torch.ones(1 << 22).sum().item()
print(before, passing, count())
"""


def test_returns_the_result_and_raises_the_error() -> None:
    assert in_passing_thread(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="bad config"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad config")))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_loading_leaves_no_openmp_threads_behind() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    before, passing, main = map(int, out.stdout.split())
    assert passing == before  # the loading thread and its OpenMP pool are gone
    assert main > before  # the same op in the main thread keeps a pool (the check is live)
