"""The JSONL request log: one line per served choice, its hit-rate ledger row plus timings.

Owns: `RequestLog` (append-only, one JSON object per line, flushed per line so `tail -f`
and a crash lose nothing) and `log_record` (the line's fields). Imports observe.ledger only;
no clock of its own (the caller passes the timestamp).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import IO, Any

import msgspec

from kvrelay.observe.ledger import LedgerRow

logger = logging.getLogger(__name__)


def log_record(row: LedgerRow, **fields: Any) -> dict[str, Any]:
    """The ledger row's fields, `hit_ratio`, then `fields` (timings, outcome, ...)."""
    record: dict[str, Any] = msgspec.to_builtins(row)
    record["hit_ratio"] = round(row.hit_ratio, 6)
    record.update(fields)
    return record


class RequestLog:
    """Appends records to `path` (created with its parent directory if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = self.path.open("ab")
        self._lock = threading.Lock()
        self.num_records = 0

    def write(self, record: dict[str, Any]) -> None:
        line = msgspec.json.encode(record) + b"\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            self._file.flush()
            self.num_records += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
