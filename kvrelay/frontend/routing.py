"""Worker choice for the frontend: prefix affinity with a load guard.

Owns: `choose_worker`, a pure function, kept small so the KV-aware router (next issue) can
replace it. Requests whose first block of prompt tokens is the same prefer the same worker
(rendezvous hashing), so repeated and shared-prefix prompts hit that worker's prefix cache;
when the preferred worker is busier than the least-loaded one by more than `slack`
requests, the least-loaded one wins. Imports only protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from kvrelay.protocol import WorkerInfo

DEFAULT_SLACK = 4  # in-flight requests the preferred worker may exceed the least-loaded by


def prefix_key(prompt_token_ids: Sequence[int], block_size: int) -> bytes:
    """Bytes identifying the prompt's first full block (the whole prompt when shorter)."""
    head = prompt_token_ids[: max(block_size, 1)]
    return b"".join(t.to_bytes(4, "little", signed=False) for t in head)


def _score(key: bytes, worker_id: str) -> int:
    digest = hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def choose_worker(
    candidates: Sequence[WorkerInfo],
    inflight: Mapping[str, int],
    prompt_token_ids: Sequence[int],
    slack: int = DEFAULT_SLACK,
) -> WorkerInfo:
    """Pick one of `candidates` (non-empty) for a prompt, given in-flight counts by worker id."""
    assert candidates, "choose_worker needs at least one candidate"
    block_size = candidates[0].block_size
    key = prefix_key(prompt_token_ids, block_size)
    preferred = max(candidates, key=lambda w: _score(key, w.worker_id))
    least = min(candidates, key=lambda w: (inflight.get(w.worker_id, 0), w.worker_id))
    if inflight.get(preferred.worker_id, 0) - inflight.get(least.worker_id, 0) > slack:
        return least
    return preferred
