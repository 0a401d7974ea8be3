"""KV events: what an engine tells the rest of the cluster about the blocks it holds.

Shape follows vLLM's KV-event schema (BlockStored / BlockRemoved / AllBlocksCleared in a
batch) so a vLLM worker can feed the same router; each batch carries a per-engine
monotonic `event_id` so a consumer detects a gap and asks for a full dump.

A full dump is an ordinary, self-contained batch: `AllBlocksCleared` first, then one
`BlockStored` per cached run (see `full_dump_batch`). Its `event_id` is the id of the last
batch the engine emitted before taking it (-1 if none), so live batches resume at id + 1.
Pure msgspec types; must not import torch or anything above layer L1.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

DEVICE_TIER = "device"  # blocks in the engine's own KV memory (GPU or CPU tensors)


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    """Full blocks became cached, in sequence order; parent hash of the first one."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    tier: str = DEVICE_TIER


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    """Cached blocks were evicted and their hashes no longer resolve on this engine."""

    block_hashes: list[int]
    tier: str = DEVICE_TIER


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    """Every cached block of this engine was dropped (prefix cache reset)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events in the order they happened; event_id increases by one per batch."""

    event_id: int
    ts: float
    events: list[KVEvent]


def encode_batch(batch: KVEventBatch) -> bytes:
    return msgspec.msgpack.encode(batch)


def decode_batch(data: bytes) -> KVEventBatch:
    return msgspec.msgpack.decode(data, type=KVEventBatch)


def full_dump_batch(last_event_id: int, ts: float, stored: Sequence[BlockStored]) -> KVEventBatch:
    """An engine's whole cached set as one batch a consumer can apply over any state.

    `last_event_id` is the id of the last batch emitted before the dump was taken (-1 if
    none); `stored` lists every cached block (in runs; token_ids may be empty in a dump
    since consumers only need hashes and tiers).
    """
    return KVEventBatch(event_id=last_event_id, ts=ts, events=[AllBlocksCleared(), *stored])


def clears_all(batch: KVEventBatch) -> bool:
    """True when the batch drops every cached block (a full dump or a prefix-cache reset), so
    the state after it does not depend on any earlier batch."""
    return any(isinstance(ev, AllBlocksCleared) for ev in batch.events)
