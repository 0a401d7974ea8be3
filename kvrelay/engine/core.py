"""Engine core: one model replica's loop — schedule, run the model, update.

Owns: building the model runner, KV cache manager and scheduler from an EngineConfig,
request validation on entry, the `step()` loop and engine-level stats. Imports the
runner and the loaders (torch) and the torch-free scheduling modules; nothing above.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvrelay.config import EngineConfig
from kvrelay.engine.kv_manager import KVCacheManager, PrefixCacheStats
from kvrelay.engine.models.config import LoadedModel
from kvrelay.engine.models.loader import load_model
from kvrelay.engine.request import Request
from kvrelay.engine.runner.model_runner import ModelRunner
from kvrelay.engine.scheduler import Scheduler
from kvrelay.errors import InvalidRequestError, PromptTooLongError
from kvrelay.kv.events import KVEventBatch
from kvrelay.kv.hashing import extra_keys_bytes
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
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, clock)
        self.eos_token_ids = self._eos_token_ids()
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
        request = self.scheduler.abort(request_id)
        return None if request is None else make_output(request)

    # -- loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; outputs of the requests that got a token."""
        plan = self.scheduler.schedule()
        sampled = self.runner.execute(plan.batch) if plan.batch.chunks else {}
        return [make_output(r) for r in self.scheduler.update(plan, sampled)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def take_kv_events(self) -> KVEventBatch | None:
        return self.kv.take_events(time.time())

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
