"""Chained 64-bit block hashes: the one function that names a KV block everywhere.

h_i = H(h_{i-1} || token_ids of block i || extra keys), H = BLAKE2b with an 8-byte digest.
Token ids are encoded as little-endian uint32, the parent as little-endian uint64 and
the extra keys (cache salt, LoRA name) as UTF-8, so the value is the same in every process
and on every host (never Python's `hash()`). Only full blocks are hashed.
Must not import torch or anything above layer L1.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

ROOT_PARENT_HASH = 0  # parent of a sequence's first block
DEFAULT_BLOCK_SIZE = 16


def extra_keys_bytes(cache_salt: str | None = None, lora_name: str | None = None) -> bytes:
    """Encode the keys that separate otherwise identical token blocks (empty when none)."""
    if cache_salt is None and lora_name is None:
        return b""
    return f"salt={cache_salt or ''}\x00lora={lora_name or ''}".encode()


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_keys: bytes = b"") -> int:
    """Hash one full block given its parent's hash."""
    data = np.asarray(token_ids, dtype="<u4").tobytes()
    return _hash_bytes(parent_hash, data, extra_keys)


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    extra_keys: bytes = b"",
    parent_hash: int = ROOT_PARENT_HASH,
    start_block: int = 0,
) -> list[int]:
    """Hashes of the full blocks of `token_ids` from block `start_block` on.

    `parent_hash` must be the hash of block `start_block - 1` (or the root), which lets
    callers extend a sequence's hashes incrementally as it grows.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full = len(token_ids) // block_size
    if start_block >= num_full:
        return []
    lo = start_block * block_size
    data = np.asarray(token_ids[lo : num_full * block_size], dtype="<u4").tobytes()
    step = block_size * 4
    hashes: list[int] = []
    h = parent_hash
    for off in range(0, len(data), step):
        h = _hash_bytes(h, data[off : off + step], extra_keys)
        hashes.append(h)
    return hashes


def _hash_bytes(parent_hash: int, token_bytes: bytes, extra_keys: bytes) -> int:
    hasher = blake2b(parent_hash.to_bytes(8, "little"), digest_size=8)
    hasher.update(token_bytes)
    if extra_keys:
        hasher.update(extra_keys)
    return int.from_bytes(hasher.digest(), "little")
