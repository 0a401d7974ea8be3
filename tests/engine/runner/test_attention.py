"""paged_attention against a dense per-sequence reference, on shuffled block tables."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.engine.runner.attention import (
    GatherWorkspace,
    KVCache,
    SeqSpan,
    build_attention_metadata,
    paged_attention,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 8
BLOCK_SIZE, NUM_BLOCKS = 4, 64


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q: (n, H, D) are the last n positions of keys/values (ctx, kvH, D). Plain softmax."""
    n, ctx = q.shape[0], keys.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    k = keys.repeat_interleave(group, dim=1)  # (ctx, H, D)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) * HEAD_DIM**-0.5
    visible = torch.arange(ctx)[None, :] <= (ctx - n + torch.arange(n))[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


@pytest.mark.parametrize("group_tokens", [4096, 16, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_reference(seed: int, group_tokens: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cache = KVCache(
        1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float64, torch.device("cpu")
    )
    k_cache, v_cache = cache.layer(0)
    pool = list(range(NUM_BLOCKS))
    rng.shuffle(pool)
    # (start_pos, num_tokens): decode steps first, then prefills from scratch and chunked
    shapes = [(0, 1), (6, 1), (13, 1), (0, 7), (9, 5), (4, 12)]  # decode ctx 1, 7, 14
    spans, histories = [], []
    for start, num in shapes:
        ctx = start + num
        blocks = [pool.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        keys = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
        values = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
        for p in range(start):  # earlier steps already cached these
            slot = (blocks[p // BLOCK_SIZE], slice(None), p % BLOCK_SIZE)
            k_cache[slot], v_cache[slot] = keys[p], values[p]
        spans.append(SeqSpan(start, num, [*blocks, pool.pop()]))  # a spare block is fine
        histories.append((keys, values))
    meta = build_attention_metadata(
        spans, BLOCK_SIZE, HEAD_DIM, GatherWorkspace(), torch.device("cpu"), torch.float64,
        group_tokens,
    )  # fmt: skip
    assert len(meta.decode) == {4096: 1, 16: 2, 1: 3}[group_tokens]
    total = sum(n for _, n in shapes)
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.cat([kv[0][s:] for (s, _), kv in zip(shapes, histories, strict=True)])
    v = torch.cat([kv[1][s:] for (s, _), kv in zip(shapes, histories, strict=True)])
    out = paged_attention(q, k, v, k_cache, v_cache, meta)
    row = 0
    for (start, num), (keys, values), span in zip(shapes, histories, spans, strict=True):
        expected = reference(q[row : row + num], keys, values)
        torch.testing.assert_close(out[row : row + num], expected, atol=1e-12, rtol=1e-12)
        for p in range(start + num):  # everything is in the cache now
            slot = (span.block_ids[p // BLOCK_SIZE], slice(None), p % BLOCK_SIZE)
            assert torch.equal(k_cache[slot], keys[p]) and torch.equal(v_cache[slot], values[p])
        row += num


def test_short_block_table_is_rejected() -> None:
    spans = [SeqSpan(start_pos=6, num_tokens=3, block_ids=[5, 2])]  # position 8 needs 3 blocks
    with pytest.raises(ValueError, match="need 3"):
        build_attention_metadata(
            spans, BLOCK_SIZE, HEAD_DIM, GatherWorkspace(), torch.device("cpu")
        )


def test_decode_chunks_must_come_first() -> None:
    spans = [SeqSpan(0, 5, [0, 1]), SeqSpan(3, 1, [2])]
    with pytest.raises(AssertionError):
        build_attention_metadata(
            spans, BLOCK_SIZE, HEAD_DIM, GatherWorkspace(), torch.device("cpu")
        )


def test_bytes_per_block() -> None:
    assert KVCache.bytes_per_block(30, 16, 3, 64, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4
    assert KVCache.bytes_per_block(30, 16, 3, 64, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2
