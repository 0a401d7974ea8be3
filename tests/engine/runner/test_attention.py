"""paged_attention against a dense per-sequence reference, on shuffled block tables."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.engine.models.cpu_kernels import native_decode_attention
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


# (decode group tokens, native kernel): SDPA groups in float64, the compiled kernel in float32
MODES = [(4096, False), (16, False), (1, False), (4096, True)]


@pytest.mark.parametrize("group_tokens,native", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_reference(seed: int, group_tokens: int, native: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    native_decode = native_decode_attention(torch.float32, torch.device("cpu")) if native else None
    if native and native_decode is None:
        pytest.skip("kvrelay's CPU kernels could not be built here (no C compiler)")
    dtype = torch.float32 if native else torch.float64
    tol = 1e-5 if native else 1e-12
    cache = KVCache(1, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"))
    k_cache, v_cache = cache.layer(0)
    pool = list(range(NUM_BLOCKS))
    rng.shuffle(pool)
    # (start_pos, num_tokens): decode steps first, then prefills from scratch and chunked
    shapes = [(0, 1), (6, 1), (13, 1), (0, 7), (9, 5), (4, 12)]  # decode ctx 1, 7, 14
    spans, histories = [], []
    for start, num in shapes:
        ctx = start + num
        blocks = [pool.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        keys = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=dtype)
        values = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=dtype)
        for p in range(start):  # earlier steps already cached these
            slot = (blocks[p // BLOCK_SIZE], slice(None), p % BLOCK_SIZE)
            k_cache[slot], v_cache[slot] = keys[p], values[p]
        spans.append(SeqSpan(start, num, [*blocks, pool.pop()]))  # a spare block is fine
        histories.append((keys, values))
    meta = build_attention_metadata(
        spans, BLOCK_SIZE, HEAD_DIM, GatherWorkspace(), torch.device("cpu"), dtype,
        group_tokens, native_decode,
    )  # fmt: skip
    assert len(meta.decode) == {4096: 1, 16: 2, 1: 3}[group_tokens]
    assert all((g.mask is None) == native for g in meta.decode)
    total = sum(n for _, n in shapes)
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, generator=gen, dtype=dtype)
    k = torch.cat([kv[0][s:] for (s, _), kv in zip(shapes, histories, strict=True)])
    v = torch.cat([kv[1][s:] for (s, _), kv in zip(shapes, histories, strict=True)])
    out = paged_attention(q, k, v, k_cache, v_cache, meta)
    row = 0
    for (start, num), (keys, values), span in zip(shapes, histories, spans, strict=True):
        expected = reference(q[row : row + num], keys, values)
        torch.testing.assert_close(out[row : row + num], expected, atol=tol, rtol=tol)
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


def test_native_decode_matches_sdpa_on_model_shapes() -> None:
    """SmolLM2's head layout (9 query heads on 3 KV heads, head_dim 64), 16-token blocks,
    32 sequences with contexts up to 700 tokens: the kernel stores the new K/V and attends
    exactly like the index_put + gather + SDPA path."""
    native_decode = native_decode_attention(torch.float32, torch.device("cpu"))
    if native_decode is None:
        pytest.skip("kvrelay's CPU kernels could not be built here (no C compiler)")
    heads, kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, 16, 1500
    gen = torch.Generator().manual_seed(7)
    caches = [
        KVCache(1, num_blocks, block_size, kv_heads, head_dim, torch.float32, torch.device("cpu"))
        for _ in range(2)
    ]
    caches[0].data.normal_(generator=gen)
    caches[1].data.copy_(caches[0].data)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    lens = sorted(torch.randint(1, 700, (32,), generator=gen).tolist(), reverse=True)
    spans = [SeqSpan(n - 1, 1, [pool.pop() for _ in range(-(-n // block_size))]) for n in lens]
    q = torch.randn(32, heads, head_dim, generator=gen)
    k = torch.randn(32, kv_heads, head_dim, generator=gen)
    v = torch.randn(32, kv_heads, head_dim, generator=gen)
    outs = []
    for cache, kernel in zip(caches, (None, native_decode), strict=True):
        meta = build_attention_metadata(
            spans, block_size, head_dim, GatherWorkspace(), torch.device("cpu"),
            native_decode=kernel,
        )  # fmt: skip
        outs.append(paged_attention(q, k, v, *cache.layer(0), meta))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[1].data, caches[0].data)  # the same slots written
    k_cache, v_cache = caches[1].layer(0)
    for i, (n, span) in enumerate(zip(lens, spans, strict=True)):
        slot = (span.block_ids[(n - 1) // block_size], slice(None), (n - 1) % block_size)
        assert torch.equal(k_cache[slot], k[i]) and torch.equal(v_cache[slot], v[i])
