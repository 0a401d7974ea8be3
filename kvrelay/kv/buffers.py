"""Reusable host buffers for KV block payloads (export staging and receive buffers).

Owns `BufferPool`. numpy only (uninitialised memory); no torch. Imports nothing from kvrelay.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class BufferPool:
    """Payload buffers, reused once their run is released.

    A fresh buffer costs a page fault per 4 KiB page on first touch, which on some hosts
    (VMs, sandboxes) is several times the cost of copying the bytes into it: a receiver
    that allocated per run ran at a fifth of loopback speed, an exporter at a twentieth.
    Buffers are kept up to `max_bytes` in all; a request for n bytes takes the smallest
    free buffer of n to 2n bytes. Thread-safe: runs are often released from another thread.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: list[np.ndarray[Any, np.dtype[np.uint8]]] = []
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, num_bytes: int) -> tuple[memoryview, Callable[[], None]]:
        """A buffer of exactly `num_bytes` and the callback that gives it back (once)."""
        with self._lock:
            fits = [b for b in self._free if num_bytes <= b.nbytes <= 2 * num_bytes]
            buf = min(fits, key=lambda b: b.nbytes) if fits else None
            if buf is not None:
                self._free = [b for b in self._free if b is not buf]
                self._free_bytes -= buf.nbytes
        if buf is None:
            buf = np.empty(num_bytes, dtype=np.uint8)
        return buf.data.cast("B")[:num_bytes], functools.partial(self._give, buf, [False])

    def _give(self, buf: np.ndarray[Any, np.dtype[np.uint8]], given: list[bool]) -> None:
        with self._lock:
            if not given[0] and self._free_bytes + buf.nbytes <= self.max_bytes:
                self._free.append(buf)
                self._free_bytes += buf.nbytes
            given[0] = True
