"""Paged attention over the block-major KV cache: write the step's K/V, then attend.

Owns: the KV cache layout, the per-step `AttentionMetadata` and `paged_attention`, the one
function the model calls for attention (a faster kernel replaces it here, nowhere else).
Must not import the model, the scheduler or anything above `engine.runner`.

Cache layout: one tensor per layer for K and one for V, each
(num_blocks, num_kv_heads, block_size, head_dim): one block of one layer is contiguous, and
inside it each head's tokens are contiguous, so a gathered context is head-major
(num_kv_heads, ctx, head_dim) with no transpose copy. `KVCache` allocates all layers as one
(num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim) tensor. The token at
position p of a request lives in block block_ids[p // block_size] at offset p % block_size.

The flat batch of a step is ordered decode-first: tokens [0, num_decode) are the single-token
chunks (decode); the multi-token chunks (prefill) follow and are attended one sequence at a
time. In float32 on CPU the decode tokens are attended in one call of kvrelay's compiled
kernel, which reads their context in place (models/cpu_kernels.py). Elsewhere they are
attended in groups with one padded gather + one SDPA call per group, sized so the gathered
K/V stays small (about `DECODE_GROUP_BYTES`): the gather then lands in CPU cache and SDPA
reads it from there instead of from memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from kvrelay.engine.models.cpu_kernels import DecodeAttentionFn


@dataclass(frozen=True)
class PrefillSeq:
    """One multi-token chunk: its token range in the flat batch and its cached context."""

    token_start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int  # positions below this are already in the cache
    block_ids: torch.Tensor  # (num_ctx_blocks,) int64, covers start_pos + num_tokens
    mask: torch.Tensor | None  # (num_tokens, ctx_len) additive 0 / -inf; None: plain causal


DECODE_GROUP_BYTES = 8 << 20  # gathered K+V per decode group, per layer


@dataclass(frozen=True)
class DecodeGroup:
    """Consecutive single-token chunks, flat tokens [token_start, token_start + num_seqs)."""

    token_start: int
    num_seqs: int
    block_ids: torch.Tensor  # (num_seqs * max_blocks,) int64 block tables, padded with block 0
    ctx_lens: torch.Tensor  # (num_seqs,) int64 context length, the new token included
    mask: torch.Tensor | None  # (num_seqs, 1, 1, max_blocks * block_size) additive 0 / -inf;
    # None when the native kernel attends (it reads ctx_lens)


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once, shared by every layer."""

    positions: torch.Tensor  # (num_tokens,) int64 position of each new token in its sequence
    slot_blocks: torch.Tensor  # (num_tokens,) int64 block of each new token
    slot_offsets: torch.Tensor  # (num_tokens,) int64 offset of each new token in its block
    decode: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillSeq, ...]
    scale: float
    workspace: GatherWorkspace
    native_decode: DecodeAttentionFn | None = None  # attends decode groups when set


class GatherWorkspace:
    """Grow-only scratch buffers for gathered K/V, reused across layers and steps.

    Fresh multi-megabyte allocations on CPU page-fault on first touch, which costs more
    than the gather itself; reusing two buffers avoids that.
    """

    def __init__(self) -> None:
        self._k = torch.empty(0)
        self._v = torch.empty(0)

    def gather(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` (n,), each (num_kv_heads, n * block_size, head_dim).

        The views are valid until the next call.
        """
        _, num_kv_heads, block_size, head_dim = k_cache.shape
        shape = (num_kv_heads, block_ids.numel(), block_size, head_dim)
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        if (
            self._k.numel() < numel
            or self._k.dtype != k_cache.dtype
            or self._k.device != k_cache.device
        ):
            self._k = torch.empty(numel, dtype=k_cache.dtype, device=k_cache.device)
            self._v = torch.empty(numel, dtype=k_cache.dtype, device=k_cache.device)
        keys, values = self._k[:numel].view(shape), self._v[:numel].view(shape)
        for h in range(num_kv_heads):  # per head: each output row is one contiguous copy
            torch.index_select(k_cache[:, h], 0, block_ids, out=keys[h])
            torch.index_select(v_cache[:, h], 0, block_ids, out=values[h])
        flat = (num_kv_heads, -1, head_dim)
        return keys.view(flat), values.view(flat)


class KVCache:
    """The paged KV cache of every layer, allocated once."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        self.data = torch.zeros(
            (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim),
            dtype=dtype,
            device=device,
        )

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each (num_blocks, num_kv_heads, block_size, head_dim)."""
        return self.data[layer_idx, 0], self.data[layer_idx, 1]

    def read_blocks(self, block_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A block-major copy (n, num_layers, 2, num_kv_heads, block_size, head_dim) of
        `block_ids` (n,), into `out` if given: one gather over rows of one (layer, K/V,
        block) each (on the cache permuted block-major it takes a ~100x slower path)."""
        rows, shape = self._rows(block_ids), (block_ids.numel(), *self._block_shape())
        flat = self.data.view(-1, self._row_numel())
        if out is None:
            return flat.index_select(0, rows).view(shape)
        torch.index_select(flat, 0, rows, out=out.view(-1, self._row_numel()))
        return out

    def write_blocks(self, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
        """Store a block-major tensor shaped like `read_blocks`' result into `block_ids`."""
        rows = self._rows(block_ids)
        self.data.view(-1, self._row_numel()).index_copy_(
            0, rows, blocks.reshape(-1, self._row_numel())
        )

    def _block_shape(self) -> tuple[int, ...]:
        num_layers, two, _, num_kv_heads, block_size, head_dim = self.data.shape
        return (num_layers, two, num_kv_heads, block_size, head_dim)

    def _row_numel(self) -> int:
        _, _, _, num_kv_heads, block_size, head_dim = self.data.shape
        return int(num_kv_heads * block_size * head_dim)

    def _rows(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Row of each (block, layer, K/V) in the cache viewed as (-1, row), block-major."""
        num_planes = self.data.shape[0] * 2  # (layer, K/V) planes of num_blocks rows each
        planes = torch.arange(num_planes, device=block_ids.device) * self.num_blocks
        return (block_ids[:, None] + planes[None, :]).reshape(-1)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one block takes across all layers, K and V."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Store this step's K/V in the cache, then attend each token to its own context.

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim);
    k_cache, v_cache: (num_blocks, num_kv_heads, block_size, head_dim).
    Returns (num_tokens, num_heads, head_dim).
    """
    if meta.native_decode is not None and not meta.prefills:  # one call stores and attends
        return meta.native_decode(
            q, k, v, k_cache, v_cache, _tables(meta.decode[0]), meta.decode[0].ctx_lens, meta.scale
        )
    k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, :, meta.slot_offsets] = v
    if len(meta.decode) == 1 and not meta.prefills:
        return _decode_attention(q, k_cache, v_cache, meta.decode[0], meta)
    out = torch.empty_like(q)
    for group in meta.decode:
        rows = slice(group.token_start, group.token_start + group.num_seqs)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, group, meta)
    for seq in meta.prefills:
        end = seq.token_start + seq.num_tokens
        out[seq.token_start : end] = _prefill_attention(
            q[seq.token_start : end], k[seq.token_start : end], v[seq.token_start : end],
            k_cache, v_cache, seq, meta,
        )  # fmt: skip
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dec: DecodeGroup,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Single-token queries of a group of sequences: the native kernel, or one padded gather
    and one SDPA call.

    The query heads sharing a KV head are folded into SDPA's query-length axis, which
    avoids expanding K/V per query head. Returns (num_seqs, num_heads, head_dim).
    """
    if meta.native_decode is not None:
        return meta.native_decode(
            q, None, None, k_cache, v_cache, _tables(dec), dec.ctx_lens, meta.scale
        )
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    keys, values = meta.workspace.gather(k_cache, v_cache, dec.block_ids)
    # (num_seqs, num_kv_heads, ctx, head_dim), each (ctx, head_dim) matrix contiguous
    keys = keys.view(num_kv_heads, num_seqs, -1, head_dim).transpose(0, 1)
    values = values.view(num_kv_heads, num_seqs, -1, head_dim).transpose(0, 1)
    queries = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=dec.mask, scale=meta.scale
    )  # (num_seqs, num_kv_heads, group, head_dim)
    return out.reshape(num_seqs, num_heads, head_dim)


def _tables(dec: DecodeGroup) -> torch.Tensor:
    """A group's block tables as (num_seqs, max_blocks)."""
    return dec.block_ids.view(dec.num_seqs, -1)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq: PrefillSeq,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """One chunk of queries against its whole context, causal within the chunk.

    q: (num_tokens, num_heads, head_dim). Returns the same shape.
    """
    if seq.start_pos == 0:
        # the whole context is this chunk: skip the cache round trip
        keys, values = k.transpose(0, 1), v.transpose(0, 1)  # (num_kv_heads, ctx, head_dim)
    else:
        ctx_len = seq.start_pos + seq.num_tokens
        keys, values = meta.workspace.gather(k_cache, v_cache, seq.block_ids)
        keys, values = keys[:, :ctx_len], values[:, :ctx_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, num_heads, num_tokens, head_dim)
        keys.unsqueeze(0),  # (1, num_kv_heads, ctx_len, head_dim)
        values.unsqueeze(0),
        attn_mask=seq.mask,
        is_causal=seq.mask is None,
        scale=meta.scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)  # (num_tokens, num_heads, head_dim)


@dataclass(frozen=True)
class SeqSpan:
    """One chunk as attention sees it: where its new tokens start and its block table."""

    start_pos: int
    num_tokens: int
    block_ids: list[int]


def build_attention_metadata(
    spans: list[SeqSpan],
    block_size: int,
    head_dim: int,
    workspace: GatherWorkspace,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    decode_group_tokens: int = 4096,
    native_decode: DecodeAttentionFn | None = None,
) -> AttentionMetadata:
    """Metadata for a flat batch whose chunks come in `spans` order, single-token ones first.

    Masks are additive (0 / -inf) in the model dtype, built once here rather than converted
    from booleans inside every layer's attention call. A decode group gathers at most
    `decode_group_tokens` padded context tokens (always at least one sequence); with
    `native_decode` all decode tokens form one group and need no mask.
    """
    num_decode = 0
    while num_decode < len(spans) and spans[num_decode].num_tokens == 1:
        num_decode += 1
    assert all(s.num_tokens > 1 for s in spans[num_decode:]), "decode chunks must come first"
    pos = np.concatenate(
        [np.arange(s.start_pos, s.start_pos + s.num_tokens, dtype=np.int64) for s in spans]
    )
    tables = [np.asarray(s.block_ids[: _num_ctx_blocks(s, block_size)]) for s in spans]
    blocks = np.concatenate(
        [
            table[p // block_size]
            for table, p in zip(tables, np.split(pos, _ends(spans)), strict=True)
        ]
    )
    slot_blocks = torch.from_numpy(blocks.astype(np.int64)).to(device)
    slot_offsets = torch.from_numpy(pos % block_size).to(device)
    if native_decode is not None:
        decode_group_tokens = -1  # one group: the kernel reads in place, nothing to keep small
    decode = _decode_groups(
        spans[:num_decode], block_size, decode_group_tokens, device, dtype, native_decode is None
    )
    prefills: list[PrefillSeq] = []
    token_start = num_decode
    for span in spans[num_decode:]:
        prefills.append(_prefill_seq(span, token_start, block_size, device, dtype))
        token_start += span.num_tokens
    return AttentionMetadata(
        positions=torch.from_numpy(pos).to(device),
        slot_blocks=slot_blocks,
        slot_offsets=slot_offsets,
        decode=decode,
        prefills=tuple(prefills),
        scale=head_dim**-0.5,
        workspace=workspace,
        native_decode=native_decode,
    )


def _num_ctx_blocks(span: SeqSpan, block_size: int) -> int:
    ctx_len = span.start_pos + span.num_tokens
    num_blocks = -(-ctx_len // block_size)
    if len(span.block_ids) < num_blocks:
        raise ValueError(
            f"block table has {len(span.block_ids)} blocks but positions up to {ctx_len - 1} "
            f"need {num_blocks} (block_size {block_size})"
        )
    return num_blocks


def _ends(spans: list[SeqSpan]) -> npt.NDArray[np.int64]:
    """Where each span's tokens end in the flat batch, except the last (np.split points)."""
    return np.cumsum([s.num_tokens for s in spans[:-1]], dtype=np.int64)


def _decode_groups(
    spans: list[SeqSpan],
    block_size: int,
    max_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    with_masks: bool,
) -> tuple[DecodeGroup, ...]:
    """Split consecutive decode spans into groups of at most max_tokens padded context
    (max_tokens < 0: one group)."""
    counts = [_num_ctx_blocks(s, block_size) for s in spans]
    groups: list[DecodeGroup] = []
    start = 0
    while start < len(spans):
        end, widest = start + 1, counts[start]
        while end < len(spans):
            wider = max(widest, counts[end])
            if 0 <= max_tokens < (end + 1 - start) * wider * block_size:
                break
            end, widest = end + 1, wider
        groups.append(
            _decode_group(spans, counts, start, end, block_size, device, dtype, with_masks)
        )
        start = end
    return tuple(groups)


def _decode_group(
    spans: list[SeqSpan],
    counts: list[int],
    start: int,
    end: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    with_mask: bool,
) -> DecodeGroup:
    width = max(counts[start:end])
    table = [spans[i].block_ids[: counts[i]] + [0] * (width - counts[i]) for i in range(start, end)]
    ctx_lens = torch.tensor(
        [s.start_pos + 1 for s in spans[start:end]], dtype=torch.int64, device=device
    )
    mask = None
    if with_mask:
        visible = torch.arange(width * block_size, device=device)[None, :] < ctx_lens[:, None]
        mask = _additive(visible, dtype)[:, None, None, :]
    return DecodeGroup(
        token_start=start,
        num_seqs=end - start,
        block_ids=torch.tensor(table, dtype=torch.int64, device=device).view(-1),
        ctx_lens=ctx_lens,
        mask=mask,
    )


def _prefill_seq(
    span: SeqSpan, token_start: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> PrefillSeq:
    num_blocks = _num_ctx_blocks(span, block_size)
    mask = None
    if span.start_pos > 0:
        ctx_len = span.start_pos + span.num_tokens
        last_visible = span.start_pos + torch.arange(span.num_tokens, device=device)
        visible = torch.arange(ctx_len, device=device)[None, :] <= last_visible[:, None]
        mask = _additive(visible, dtype)
    return PrefillSeq(
        token_start=token_start,
        num_tokens=span.num_tokens,
        start_pos=span.start_pos,
        block_ids=torch.tensor(span.block_ids[:num_blocks], dtype=torch.int64, device=device),
        mask=mask,
    )


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive mask: 0 where visible, -inf elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf")
    )
