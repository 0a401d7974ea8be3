"""The placement rule (router/placement.py): local vs remote prefill from plain numbers."""

from __future__ import annotations

import pytest

from kvrelay.router.placement import (
    REASON_BELOW_THRESHOLD,
    REASON_DISABLED,
    REASON_FORCED,
    REASON_LOCAL_FASTER,
    REASON_NO_PREFILL_WORKER,
    REASON_NOTHING_UNCACHED,
    REASON_REMOTE_FASTER,
    PlacementConfig,
    PlacementInput,
    PrefillCandidate,
    place,
)

BS = 16


def inp(
    prompt: int = 1024,
    decode_cached: int = 0,
    decode_queued: int = 0,
    candidates: tuple[PrefillCandidate, ...] = (PrefillCandidate("p0", 0, 0),),
    bandwidth: float = 1e9,
    bytes_per_block: int = 1 << 20,
) -> PlacementInput:
    return PlacementInput(
        num_prompt_tokens=prompt,
        block_size=BS,
        num_decode_cached_tokens=decode_cached,
        num_decode_queued_tokens=decode_queued,
        kv_bytes_per_block=bytes_per_block,
        prefill_tokens_per_s=1000.0,
        transfer_bytes_per_s=bandwidth,
        candidates=candidates,
    )


def test_no_prefill_worker_or_disabled_is_local() -> None:
    assert place(inp(candidates=()), PlacementConfig()).reason == REASON_NO_PREFILL_WORKER
    assert place(inp(), PlacementConfig(mode="never")).reason == REASON_DISABLED


def test_fully_cached_on_decode_is_local() -> None:
    p = place(inp(prompt=161, decode_cached=160), PlacementConfig(mode="always"))
    assert not p.remote and p.reason == REASON_NOTHING_UNCACHED


def test_forced_picks_a_prefill_worker() -> None:
    p = place(inp(prompt=40), PlacementConfig(mode="always"))
    assert p.remote and p.reason == REASON_FORCED and p.prefill_worker_id == "p0"


def test_short_uncached_part_stays_local() -> None:
    p = place(inp(prompt=1024, decode_cached=960), PlacementConfig(min_remote_tokens=256))
    assert not p.remote and p.reason == REASON_BELOW_THRESHOLD


def test_busy_decode_worker_sends_prefill_remote() -> None:
    p = place(inp(decode_queued=4096), PlacementConfig())
    assert p.remote and p.reason == REASON_REMOTE_FASTER
    assert p.remote_s < p.local_s


def test_idle_decode_worker_keeps_prefill_local() -> None:
    # same compute either side; the transfer makes remote slower
    p = place(inp(), PlacementConfig())
    assert not p.remote and p.reason == REASON_LOCAL_FASTER


def test_slow_link_keeps_prefill_local() -> None:
    p = place(inp(decode_queued=512, bandwidth=1e6), PlacementConfig())
    assert not p.remote and p.reason == REASON_LOCAL_FASTER


def test_kv_aware_choice_among_prefill_workers() -> None:
    cands = (
        PrefillCandidate("cold", 0, 0),
        PrefillCandidate("warm", 800, 0),
        PrefillCandidate("busy-warm", 800, 10_000),
    )
    p = place(inp(decode_queued=4096, candidates=cands), PlacementConfig())
    assert p.remote and p.prefill_worker_id == "warm"


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="placement mode"):
        PlacementConfig(mode="sometimes")
