"""The OpenAI endpoints' logic, independent of the web framework's routing.

Owns: `OpenAIHandlers` — from a parsed request to prompts (tokenized, chat-templated),
choices (n x prompts), limits (context length, max_tokens, capacity -> 503), routing options
(the `kvrelay.router` policy override, the `x-kvrelay-workload` label), and then either a
full JSON body or an SSE byte stream; plus request metrics, ledger metrics and the JSONL
request log. Client disconnects cancel the choices (so workers free their KV blocks).
Imports frontend modules, router (policy names), protocol, observe.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvrelay.errors import InvalidRequestError, KvRelayError
from kvrelay.frontend import openai_types as ot
from kvrelay.frontend import responses as rs
from kvrelay.frontend.errors import ApiError, from_exception
from kvrelay.frontend.generation import ChoiceSpec, ChoiceState, merge, run_choice
from kvrelay.frontend.workers import ModelState, WorkerPool
from kvrelay.observe.prometheus import ServingMetrics
from kvrelay.observe.request_log import RequestLog, log_record
from kvrelay.protocol import MAX_SEED, GenerateRequest, SamplingParams
from kvrelay.router.policy import RouterPolicy, parse_policy

logger = logging.getLogger(__name__)

IsDisconnected = Callable[[], Awaitable[bool]]
DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_chat_max_tokens: int = 1024  # when a chat request names none


@dataclass
class Job:
    """One HTTP request being served."""

    meta: rs.ResponseMeta
    specs: list[ChoiceSpec]
    states: list[ChoiceState]
    stops: list[str]
    state: ModelState
    stream: bool
    include_usage: bool
    arrival: float
    workload: str = "default"  # the bounded `workload` label
    policy: RouterPolicy | None = None  # per-request router override


@dataclass(frozen=True)
class RouteOptions:
    """Routing inputs that come from outside the body (headers)."""

    workload: str | None = None  # x-kvrelay-workload


class OpenAIHandlers:
    def __init__(
        self,
        pool: WorkerPool,
        metrics: ServingMetrics,
        limits: Limits,
        request_log: RequestLog | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.limits = limits
        self.request_log = request_log

    # -- entry points ----------------------------------------------------------------------
    async def completions(
        self, body: bytes, disconnected: IsDisconnected, route: RouteOptions | None = None
    ) -> rs.Result:
        arrival = time.monotonic()
        req = ot.decode_request(body, ot.CompletionRequest)
        ot.check_completion(req)
        ot.check_max_tokens(req.max_tokens, "max_tokens", self.limits.max_tokens)
        state = await self.pool.model_state(req.model)
        prompts = self._completion_prompts(req.prompt, state)
        job = self._job(req, state, prompts, req.max_tokens or 16, chat=False, arrival=arrival)
        return await self._run(self._routed(job, req, route), disconnected)

    async def chat(
        self, body: bytes, disconnected: IsDisconnected, route: RouteOptions | None = None
    ) -> rs.Result:
        arrival = time.monotonic()
        req = ot.decode_request(body, ot.ChatCompletionRequest)
        ot.check_chat(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        ot.check_max_tokens(max_tokens, param, self.limits.max_tokens)
        state = await self.pool.model_state(req.model)
        tok = state.tokenizer
        if tok is None:
            raise ApiError(
                400,
                f"model {req.model!r} has no tokenizer; use /v1/completions with token ids",
                code="no_tokenizer",
            )
        text = tok.apply_chat_template(ot.message_dicts(req), add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
        if max_tokens is None:
            room = state.card.max_model_len - len(prompt)
            max_tokens = max(1, min(room, self.limits.default_chat_max_tokens))
        job = self._job(req, state, [prompt], max_tokens, chat=True, arrival=arrival)
        return await self._run(self._routed(job, req, route), disconnected)

    def _routed(self, job: Job, req: ot.SamplingFields, route: RouteOptions | None) -> Job:
        """Attach the workload label and the per-request router policy (400 if unknown)."""
        job.workload = self.pool.router.workloads.label(route.workload if route else None)
        name = req.kvrelay.router if req.kvrelay is not None else None
        if name is not None:
            try:
                job.policy = parse_policy(name)
            except InvalidRequestError as exc:
                raise ApiError(400, str(exc), code="invalid_value", param="kvrelay.router") from exc
        return job

    # -- building a job --------------------------------------------------------------------
    def _completion_prompts(self, prompt: Any, state: ModelState) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt:
            items = prompt
        else:
            raise ApiError(
                400,
                "prompt must be a string, a list of token ids, or a non-empty list of either",
                code="invalid_value",
                param="prompt",
            )
        out = []
        for item in items:
            if isinstance(item, str):
                if state.tokenizer is None:
                    raise ApiError(
                        400,
                        "this model has no tokenizer; send token ids",
                        code="no_tokenizer",
                        param="prompt",
                    )
                out.append(state.tokenizer.encode(item))
            elif (
                isinstance(item, list)
                and item
                and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
            ):
                out.append(list(item))
            else:
                raise ApiError(
                    400,
                    "each prompt must be a string or a non-empty list of token ids",
                    code="invalid_value",
                    param="prompt",
                )
        return out

    def _job(
        self,
        req: ot.SamplingFields,
        state: ModelState,
        prompts: list[list[int]],
        max_tokens: int,
        *,
        chat: bool,
        arrival: float,
    ) -> Job:
        n = req.n or 1
        if n * len(prompts) > ot.MAX_N:
            raise ApiError(
                400, f"n x prompts must be at most {ot.MAX_N}", code="invalid_value", param="n"
            )
        limit = state.card.max_model_len
        specs: list[ChoiceSpec] = []
        for p_index, prompt in enumerate(prompts):
            if not prompt:
                raise ApiError(400, "the prompt is empty", code="invalid_value", param="prompt")
            if len(prompt) + max_tokens > limit:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {limit} tokens; the prompt has "
                    f"{len(prompt)} tokens and {max_tokens} more were requested",
                    code="context_length_exceeded",
                    param="messages" if chat else "prompt",
                )
            for i in range(n):
                index = p_index * n + i
                specs.append(ChoiceSpec(index, p_index, prompt, self._sampling(req, max_tokens, i)))
        prefix = "chatcmpl" if chat else "cmpl"
        meta = rs.ResponseMeta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), req.model, chat)
        states = [ChoiceState(s.index, s.prompt_index, len(s.prompt_token_ids)) for s in specs]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Job(
            meta,
            specs,
            states,
            ot.stop_strings(req.stop),
            state,
            bool(req.stream),
            include_usage,
            arrival,
        )

    @staticmethod
    def _sampling(req: ot.SamplingFields, max_tokens: int, offset: int) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                seed=None if req.seed is None else (req.seed + offset) % (MAX_SEED + 1),
                ignore_eos=req.ignore_eos,
            )
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from exc

    # -- running a job ---------------------------------------------------------------------
    async def _run(self, job: Job, disconnected: IsDisconnected) -> rs.Result:
        model = job.meta.model
        self.metrics.on_request(model)
        try:
            self.pool.check_capacity(model, len(job.specs))  # 503 + Retry-After, before work
        except KvRelayError as exc:
            self._finish(job, "rejected")
            raise from_exception(exc) from exc
        if job.stream:
            return rs.Result(stream=self._sse(job))
        task = asyncio.create_task(self._collect(job))
        outcome = "cancelled"
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await disconnected():
                    raise ApiError(499, "client closed the request", code="client_closed")
            body = task.result()
            outcome = "ok"
            return rs.Result(body=body)
        except (KvRelayError, ApiError) as exc:
            error = from_exception(exc)
            if error.status != 499:
                outcome = "rejected" if error.status == 503 else "failed"
            if error is exc:
                raise
            raise error from exc
        finally:
            task.cancel()  # no-op when done; on disconnect or cancellation, stop the work
            self._finish(job, outcome)

    def _streams(self, job: Job) -> list[AsyncGenerator[Any, None]]:
        tok = job.state.tokenizer
        streams = []
        for spec, state in zip(job.specs, job.states, strict=True):
            request = self._generate_request(job, spec)
            ticket = self.pool.router.ticket(
                request.request_id,
                request.model,
                request.prompt_token_ids,
                workload=job.workload,
                policy=job.policy,
                cache_salt=request.cache_salt,
            )
            streams.append(
                run_choice(self.pool, request, tok, job.stops, state, job.arrival, ticket)
            )
        return streams

    def _generate_request(self, job: Job, spec: ChoiceSpec) -> GenerateRequest:
        return GenerateRequest(
            request_id=f"{job.meta.request_id}-{spec.index}",
            prompt_token_ids=spec.prompt_token_ids,
            sampling=spec.sampling,
            model=job.meta.model,
        )

    async def _collect(self, job: Job) -> dict[str, Any]:
        stream = merge(self._streams(job))
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()
        return rs.full_response(job.meta, job.states)

    async def _sse(self, job: Job) -> AsyncGenerator[bytes, None]:
        meta, outcome = job.meta, "cancelled"
        stream = merge(self._streams(job))
        try:
            if meta.chat:
                for spec in job.specs:
                    yield rs.sse(rs.role_chunk(meta, spec.index))
            num_finished = 0
            async for delta in stream:
                chunk = rs.delta_chunk(meta, delta)
                num_finished += delta.finish_reason is not None
                if job.include_usage:
                    chunk["usage"] = None
                elif num_finished == len(job.specs):
                    chunk["kvrelay"] = rs.kvrelay_extension(meta.request_id, job.states)
                yield rs.sse(chunk)
            if job.include_usage:
                yield rs.sse(rs.usage_chunk(meta, job.states))
            yield rs.SSE_DONE
            outcome = "ok"
        except (KvRelayError, ApiError) as exc:
            error = from_exception(exc)
            logger.warning("stream %s failed: %s", meta.request_id, error.message)
            outcome = "failed"
            yield rs.sse(error.body())
        finally:
            await stream.aclose()
            self._finish(job, outcome)

    def _finish(self, job: Job, outcome: str) -> None:
        model, workload = job.meta.model, job.workload
        latency_s = time.monotonic() - job.arrival
        self.metrics.on_done(model, outcome, latency_s)
        for s in job.states:
            if not s.worker_id:
                continue
            self.metrics.on_tokens(
                model, s.worker_id, s.num_prompt_tokens, s.num_cached_tokens, s.num_output_tokens
            )
            if s.first_token_s is not None:
                self.metrics.on_first_token(model, workload, s.first_token_s)
            self.metrics.on_inter_token(model, workload, s.itl_s)
            if s.metrics is not None and s.finish_reason is not None:
                m = s.metrics
                self.metrics.on_engine_times(model, m.queue_s, m.prefill_s, m.decode_s)
            if s.disagg is not None:
                d = s.disagg
                self.metrics.on_transfer(
                    model, d.prefill_worker, d.num_bytes, d.transfer_s, d.fallback
                )
            if s.ledger is not None:
                self.metrics.on_ledger_row(s.ledger)
                self._log(job, s, outcome, latency_s)

    def _log(self, job: Job, s: ChoiceState, outcome: str, latency_s: float) -> None:
        if self.request_log is None or s.ledger is None:
            return
        record = log_record(
            s.ledger,
            ts=time.time(),
            response_id=job.meta.request_id,
            choice=s.index,
            outcome=outcome,
            finish_reason=s.finish_reason,
            num_output_tokens=s.num_output_tokens,
            ttft_ms=None if s.first_token_s is None else round(s.first_token_s * 1000, 3),
            latency_ms=round(latency_s * 1000, 3),
        )
        try:
            self.request_log.write(record)
        except OSError as exc:
            logger.warning("cannot write the request log %s: %s", self.request_log.path, exc)


def model_list(pool: WorkerPool, models: Sequence[str]) -> dict[str, Any]:
    data = []
    for name in models:
        workers = pool.workers(name)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(min((w.started_at for w in workers), default=time.time())),
                "owned_by": "kvrelay",
                "max_model_len": max((w.max_model_len for w in workers), default=0),
                "num_workers": len(workers),
            }
        )
    return {"object": "list", "data": data}
