"""Model runner: turns a scheduled `StepBatch` into tensors, runs the model on the paged KV
cache and samples the next tokens.

Owns: the model weights on the device, the KV cache tensor, the sampler and its per-request
state. Knows nothing of scheduling: it trusts the block tables it is given. Must not import
the scheduler, the KV manager or anything above `engine.runner`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from kvrelay.engine.batch import ScheduledChunk, StepBatch
from kvrelay.engine.models.config import LoadedModel, ModelArchConfig
from kvrelay.engine.models.cpu_kernels import native_decode_attention
from kvrelay.engine.models.llama import LlamaModel
from kvrelay.engine.runner.attention import (
    DECODE_GROUP_BYTES,
    AttentionMetadata,
    GatherWorkspace,
    KVCache,
    SeqSpan,
    build_attention_metadata,
    paged_attention,
)
from kvrelay.engine.runner.sampler import Sampler
from kvrelay.errors import CorruptTransferError, InvalidRequestError
from kvrelay.kv.transfer import KVLayout, Payload

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(dtype: str) -> torch.dtype:
    """ "float32" / "float16" / "bfloat16" / "float64" -> torch dtype."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidRequestError(
            f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}"
        ) from None


class _PagedAttention:
    """The model's `AttentionFn` for one step: binds the cache views and the metadata."""

    def __init__(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata
    ) -> None:
        self._layers = layers
        self._meta = meta

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = self._layers[layer_idx]
        return paged_attention(q, k, v, k_cache, v_cache, self._meta)


class ModelRunner:
    """Runs one Llama-family model over paged KV memory, one `StepBatch` at a time."""

    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int,
        block_size: int,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        self.arch = model.arch
        self.block_size = block_size
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.model = LlamaModel(model.arch, model.state_dict, self.dtype, self.device)
        arch = model.arch
        self.kv_cache = KVCache(
            arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim,
            self.dtype, self.device,
        )  # fmt: skip
        self._cache_layers = [self.kv_cache.layer(i) for i in range(arch.num_layers)]
        self._workspace = GatherWorkspace()
        token_bytes = 2 * arch.num_kv_heads * arch.head_dim * self.kv_cache.data.element_size()
        self._decode_group_tokens = max(block_size, DECODE_GROUP_BYTES // token_bytes)
        self._native_decode = native_decode_attention(self.dtype, self.device)
        self.sampler = Sampler(self.device)
        logger.info(
            "model runner: %s, %d layers, %d KV blocks of %d tokens (%.1f MiB), %s on %s",
            model.name, arch.num_layers, num_blocks, block_size,
            num_blocks * self.bytes_per_block(arch, block_size, dtype) / 2**20, dtype, device,
        )  # fmt: skip

    @staticmethod
    def bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: str) -> int:
        """KV cache bytes of one block (all layers, K and V), to size the cache from a budget."""
        return KVCache.bytes_per_block(
            arch.num_layers, block_size, arch.num_kv_heads, arch.head_dim, parse_dtype(dtype)
        )

    @property
    def max_model_len(self) -> int:
        return self.arch.max_position_embeddings

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def kv_layout(self) -> KVLayout:
        """How one block's KV is laid out in `export_blocks` payloads."""
        _, _, _, num_kv_heads, block_size, head_dim = self.kv_cache.data.shape
        return KVLayout(
            dtype=str(self.dtype).removeprefix("torch."),
            itemsize=self.kv_cache.data.element_size(),
            num_layers=self.arch.num_layers,
            num_kv_heads=num_kv_heads,
            block_size=block_size,
            head_dim=head_dim,
        )

    def export_blocks(self, block_ids: Sequence[int], out: memoryview | None = None) -> memoryview:
        """The KV of `block_ids` (all layers, K and V) as one block-major host buffer —
        written into `out` (exactly that many bytes) when given, e.g. a pooled buffer: one
        gather (plus one device-to-host copy on GPU), no per-block Python work."""
        layout = self.kv_layout()
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        if out is None:
            out = memoryview(bytearray(len(block_ids) * layout.bytes_per_block))
        host = self._host_blocks(out, len(block_ids))
        with torch.inference_mode():
            if self.device.type == "cpu":
                self.kv_cache.read_blocks(ids, out=host)
            else:
                host.copy_(self.kv_cache.read_blocks(ids))
        return out

    def _host_blocks(self, buf: memoryview, num_blocks: int) -> torch.Tensor:
        """A tensor over `buf`: (num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim)."""
        layout = self.kv_layout()
        view = memoryview(buf).cast("B")
        if view.nbytes != num_blocks * layout.bytes_per_block:
            raise CorruptTransferError(
                f"payload of {view.nbytes} bytes for {num_blocks} blocks of "
                f"{layout.bytes_per_block} bytes"
            )
        if num_blocks == 0:
            return torch.empty(0, *layout.block_shape, dtype=self.dtype)
        with warnings.catch_warnings():  # a read-only buffer is fine where it is only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(view, dtype=torch.uint8)
        return raw.view(self.dtype).view(num_blocks, *layout.block_shape)

    def import_blocks(self, block_ids: Sequence[int], payload: Payload) -> None:
        """Store an `export_blocks` payload (of an engine with the same layout) into
        `block_ids`, in order. The payload is not used after this returns."""
        blocks = self._host_blocks(memoryview(payload), len(block_ids))
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            self.kv_cache.write_blocks(ids, blocks.to(self.device))

    def execute(self, batch: StepBatch) -> dict[str, int]:
        """Run one step; the sampled next token of every chunk with sample=True."""
        with torch.inference_mode():
            self.sampler.drop(batch.finished_request_ids)
            chunks, logits = self._forward(batch)
            if not chunks:
                return {}
            ids = [c.request_id for c in chunks]
            tokens = self.sampler.sample(logits, ids, [c.sampling for c in chunks])
            return dict(zip(ids, tokens, strict=True))

    def execute_logits(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Run one step (filling the cache like `execute`) and return the last-position
        logits (vocab,) of every chunk with sample=True, without sampling."""
        with torch.inference_mode():
            self.sampler.drop(batch.finished_request_ids)
            chunks, logits = self._forward(batch)
            return {c.request_id: logits[i] for i, c in enumerate(chunks)}

    def _forward(self, batch: StepBatch) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Forward the step; returns the sampling chunks and their logits (num, vocab)."""
        assert all(c.token_ids for c in batch.chunks), "a scheduled chunk has no tokens"
        # Decode (single-token) chunks first, longest context first: attention batches them
        # in groups of similar length.
        ordered = sorted(
            (c for c in batch.chunks if len(c.token_ids) == 1), key=lambda c: -c.start_pos
        )
        ordered += [c for c in batch.chunks if len(c.token_ids) > 1]
        if not ordered:
            return [], torch.empty(0, self.arch.vocab_size)
        spans = [SeqSpan(c.start_pos, len(c.token_ids), c.block_ids) for c in ordered]
        meta = build_attention_metadata(
            spans, self.block_size, self.arch.head_dim, self._workspace, self.device, self.dtype,
            self._decode_group_tokens, self._native_decode,
        )  # fmt: skip
        input_ids = torch.tensor(
            [t for c in ordered for t in c.token_ids], dtype=torch.int64, device=self.device
        )
        hidden = self.model.forward(
            input_ids, meta.positions, _PagedAttention(self._cache_layers, meta)
        )  # (num_tokens, hidden)
        ends = np.cumsum([s.num_tokens for s in spans]) - 1
        rows = [int(ends[i]) for i, c in enumerate(ordered) if c.sample]
        sampling = [c for c in ordered if c.sample]
        if not rows:
            return [], hidden.new_empty(0, self.arch.vocab_size)
        last = hidden.index_select(0, torch.tensor(rows, device=self.device))
        return sampling, self.model.compute_logits(last)
