"""Engine core: one model replica's loop — schedule, run the model, update.

Owns: building the model runner, KV cache manager and scheduler from an EngineConfig,
request validation on entry, the `step()` loop and engine-level stats, and the engine side
of disaggregation: importing a prompt's KV blocks from another engine (decode side) and
prefilling a prompt to export its blocks as they are computed (prefill side). Imports the
runner and the loaders (torch) and the torch-free scheduling modules; nothing above.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvrelay.config import EngineConfig
from kvrelay.engine.batch import ScheduledChunk, StepBatch
from kvrelay.engine.kv_manager import KVCacheManager, KVImport, PrefixCacheStats
from kvrelay.engine.models.config import LoadedModel
from kvrelay.engine.models.loader import load_model
from kvrelay.engine.request import Request
from kvrelay.engine.runner.model_runner import ModelRunner
from kvrelay.engine.scheduler import Scheduler
from kvrelay.errors import (
    CorruptTransferError,
    InvalidRequestError,
    PromptTooLongError,
    TransferError,
)
from kvrelay.kv.buffers import BufferPool
from kvrelay.kv.events import KVEventBatch
from kvrelay.kv.hashing import extra_keys_bytes, hash_blocks
from kvrelay.kv.transfer import BlockRun, KVLayout
from kvrelay.protocol import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """Snapshot of the engine's memory and queues."""

    num_blocks: int
    num_free_blocks: int
    kv_usage: float
    num_running: int
    num_waiting: int
    prefix_cache: PrefixCacheStats


@dataclass(frozen=True)
class KVExport:
    """Blocks a prefill request computed, ready to send; `done` on its last export.
    `run` is None only when the export failed (`error` says why)."""

    request_id: str
    run: BlockRun | None
    done: bool
    error: str = ""


@dataclass
class _ExportJob:
    request_id: str
    first_block: int
    block_hashes: list[int]
    num_exported: int = 0


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        model: LoadedModel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.model = model if model is not None else load_model(config.model, config.dtype)
        self._set_threads()
        arch = self.model.arch
        self.max_model_len = min(
            config.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings
        )
        block_size = config.cache.block_size
        num_blocks = config.cache.num_blocks or max(
            1,
            config.cache.kv_cache_bytes
            // ModelRunner.bytes_per_block(arch, block_size, config.dtype),
        )
        self.runner = ModelRunner(self.model, num_blocks, block_size, config.dtype, config.device)
        if model is None:
            self.model.state_dict.clear()  # the runner holds its own (fused) copies
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, clock)
        self.eos_token_ids = self._eos_token_ids()
        self._export_jobs: dict[str, _ExportJob] = {}
        self._exports: list[KVExport] = []
        self._export_buffers = BufferPool()  # staging for exported runs, reused on release
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens, max_model_len %d",
            self.model.name,
            num_blocks,
            block_size,
            self.max_model_len,
        )

    def _set_threads(self) -> None:
        if self.config.num_threads:
            import torch

            torch.set_num_threads(self.config.num_threads)

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model.arch.eos_token_ids)
        if self.model.tokenizer is not None:
            ids.update(self.model.tokenizer.eos_token_ids)
        return tuple(sorted(ids))

    # -- requests --------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and queue a request; raises a typed error saying what to change."""
        self._validate(request_id, prompt_token_ids, sampling)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            block_size=self.kv.block_size,
            arrival_time=self.clock() if arrival_time is None else arrival_time,
            eos_token_ids=self.eos_token_ids,
            extra_keys=extra_keys_bytes(cache_salt),
        )
        self.scheduler.add_request(request)
        return request

    def _validate(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        if not prompt:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        vocab = self.model.arch.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        sampling.validate()
        limit = min(self.max_model_len, self.kv.pool.num_blocks * self.kv.block_size)
        if len(prompt) + sampling.max_tokens > limit:
            raise PromptTooLongError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds "
                f"the context limit of {limit} tokens; shorten the prompt or lower max_tokens"
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self._export_jobs.pop(request_id, None)
        self.kv.end_import(request_id)
        request = self.scheduler.abort(request_id)
        return None if request is None else make_output(request)

    # -- loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; outputs of the requests that got a token."""
        plan = self.scheduler.schedule()
        sampled = self.runner.execute(plan.batch) if plan.batch.chunks else {}
        outputs = [make_output(r) for r in self.scheduler.update(plan, sampled)]
        if self._export_jobs:
            self._collect_exports()  # before the next step can evict what this one cached
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def warm_up(self) -> None:
        """One dummy prefill step and one decode step through the runner, from the thread that
        will step the engine, so the first request does not pay one-time costs (that thread's
        OpenMP team, oneDNN primitives, first touch of scratch buffers: ~75 ms of a served
        first request's prefill on 2 cores). Writes KV only into uncached free blocks: no
        events, no stats, no cache entry. Does nothing once the engine holds any request or
        cached block."""
        pool, block_size = self.kv.pool, self.kv.block_size
        num_tokens = min(2 * block_size, self.max_model_len - 1)
        block_ids = list(range(num_tokens // block_size + 1))  # positions 0 .. num_tokens
        busy = self.scheduler.has_unfinished() or pool.num_cached_blocks > 0
        if busy or pool.num_free_blocks < pool.num_blocks or len(block_ids) > pool.num_blocks:
            return
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        for tokens, start in ((list(range(num_tokens)), 0), ([0], num_tokens)):
            chunk = ScheduledChunk("warm-up", tokens, start, block_ids, True, greedy)
            self.runner.execute(StepBatch([chunk]))
        self.runner.sampler.drop(["warm-up"])

    def take_kv_events(self) -> KVEventBatch | None:
        return self.kv.take_events(time.time())

    def kv_dump(self) -> KVEventBatch:
        """Every cached block as one self-contained batch (`kv.events.full_dump_batch`), its
        event id the last one `take_kv_events` returned. Call it from the engine's thread."""
        return self.kv.dump_events(time.time())

    def stats(self) -> EngineStats:
        return EngineStats(
            num_blocks=self.kv.pool.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            kv_usage=self.kv.usage(),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            prefix_cache=self.kv.stats,
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    # -- disaggregation: import (decode side) ----------------------------------------------
    def kv_layout(self) -> KVLayout:
        """The layout of exported / imported block payloads; peers must match it."""
        return self.runner.kv_layout()

    def prompt_block_hashes(
        self, prompt_token_ids: Sequence[int], cache_salt: str | None = None
    ) -> list[int]:
        """Hashes of the prompt blocks a request can take from cache: every full block but
        one that ends the prompt (the last token is always computed, for its logits)."""
        bs = self.kv.block_size
        n = (len(prompt_token_ids) - 1) // bs
        return hash_blocks(prompt_token_ids[: n * bs], bs, extra_keys_bytes(cache_salt))

    def missing_blocks(
        self, prompt_token_ids: Sequence[int], cache_salt: str | None = None
    ) -> tuple[int, list[int]]:
        """(index of the first prompt block not cached here, hashes of the usable blocks from
        there on): what a peer would have to send. Changes nothing."""
        hashes = self.prompt_block_hashes(prompt_token_ids, cache_salt)
        num_cached = self.kv.num_cached_prefix_blocks(hashes)
        return num_cached, hashes[num_cached:]

    def begin_kv_import(
        self, request_id: str, prompt_token_ids: Sequence[int], cache_salt: str | None = None
    ) -> KVImport | None:
        """Prepare to import the prompt's missing blocks: holds the cached prefix and
        allocates the rest (`missing_hashes` / `missing_block_ids`, from `next_block`).

        Then `import_kv` each arriving run, and `add_request` the same request id: it is
        admitted on the imported blocks, which ends the hold (so does `end_kv_import`,
        `abort_request`, or a failed transfer followed by `add_request`, which just
        recomputes what did not arrive). None when KV memory is short now.
        """
        if request_id in self.scheduler.requests or self.kv.get_import(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        hashes = self.prompt_block_hashes(prompt_token_ids, cache_salt)
        return self.kv.begin_import(request_id, hashes, list(prompt_token_ids))

    def import_kv(self, run: BlockRun) -> None:
        """Write a verified run into its planned blocks and cache them (BlockStored events).
        Runs must come in order; a run that does not match the plan is refused whole."""
        imp = self.kv.get_import(run.request_id)
        if imp is None:
            raise TransferError(f"request {run.request_id}: no KV import in progress")
        start, end = imp.next_block, imp.next_block + len(run.block_hashes)
        if run.first_block != start or run.block_hashes != imp.block_hashes[start:end]:
            raise CorruptTransferError(
                f"request {run.request_id}: run of blocks from {run.first_block} does not "
                f"match the next planned blocks from {start}"
            )
        self.runner.import_blocks([b.block_id for b in imp.blocks[start:end]], run.payload)
        self.kv.commit_import(run.request_id, len(run.block_hashes))

    def end_kv_import(self, request_id: str) -> None:
        """Release an import's hold without adding the request (imported blocks stay cached)."""
        self.kv.end_import(request_id)

    # -- disaggregation: export (prefill side) ---------------------------------------------
    def add_prefill_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_block: int,
        block_hashes: Sequence[int],
        cache_salt: str | None = None,
    ) -> Request:
        """Compute the prompt up to block `first_block + len(block_hashes)` and export blocks
        [first_block, ...) as soon as a step has computed them (cached ones at once): take
        them with `take_kv_exports()` after each step. The hashes must equal this engine's
        for the prompt (same block size and cache salt), or InvalidRequestError."""
        bs, end = self.kv.block_size, first_block + len(block_hashes)
        if not self.kv.enable_caching:
            raise InvalidRequestError(
                "exporting KV needs prefix caching (blocks are found by hash)"
            )
        if not block_hashes or first_block < 0 or len(prompt_token_ids) < end * bs:
            raise InvalidRequestError(
                f"blocks [{first_block}, {end}) are not full blocks of a "
                f"{len(prompt_token_ids)}-token prompt"
            )
        expected = hash_blocks(prompt_token_ids[: end * bs], bs, extra_keys_bytes(cache_salt))
        if expected[first_block:] != list(block_hashes):
            raise InvalidRequestError(
                "block hashes differ from this engine's: block size or cache salt mismatch"
            )
        prefill = SamplingParams(max_tokens=1, temperature=0.0)
        request = self.add_request(
            request_id, list(prompt_token_ids[: end * bs]), prefill, cache_salt
        )
        self._export_jobs[request_id] = _ExportJob(request_id, first_block, list(block_hashes))
        self._collect_exports()
        return request

    def take_kv_exports(self) -> list[KVExport]:
        """Exports ready since the last call, in block order per request. Each run's payload
        is a pooled buffer: hand the run to `KVSendStream.send` (which releases it once
        sent) or call `run.release()` when done with it."""
        ready, self._exports = self._exports, []
        return ready

    def _collect_exports(self) -> None:
        for job in list(self._export_jobs.values()):
            pending = job.block_hashes[job.num_exported :]
            n = self.kv.num_cached_prefix_blocks(pending)
            if n == 0:
                if job.request_id not in self.scheduler.requests:
                    self._fail_export(job, "the prefill finished without caching its blocks")
                continue
            ids = [self._cached_block_id(h) for h in pending[:n]]
            buf, give_back = self._export_buffers.take(n * self.runner.kv_layout().bytes_per_block)
            payload = self.runner.export_blocks(ids, out=buf)
            first = job.first_block + job.num_exported
            run = BlockRun(job.request_id, first, pending[:n], payload, give_back)
            job.num_exported += n
            done = job.num_exported == len(job.block_hashes)
            self._exports.append(KVExport(job.request_id, run, done))
            if done:
                del self._export_jobs[job.request_id]

    def _cached_block_id(self, block_hash: int) -> int:
        block = self.kv.pool.get_cached_block(block_hash)
        assert block is not None
        return block.block_id

    def _fail_export(self, job: _ExportJob, error: str) -> None:
        logger.error("KV export of %s failed: %s", job.request_id, error)
        del self._export_jobs[job.request_id]
        self._exports.append(KVExport(job.request_id, None, True, error))


def make_output(request: Request) -> RequestOutput:
    status = request.status
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=list(request.output_token_ids),
        finished=status.finished,
        finish_reason=status.value if status.finished else None,
        num_cached_tokens=max(request.num_cached_tokens, 0),
        metrics=request.metrics(),
    )
