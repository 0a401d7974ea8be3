"""Both ends of a remote prefill, around one worker's engine loop and KV transport.

Owns: `serve_prefill` (prefill role: the `prefill` endpoint — add a prefill-only request,
stream its KV exports to the decode worker's transfer address as they appear, answer with a
`PrefillResult`) and `fetch_remote_prefill` (decode role: reserve blocks with
`begin_kv_import`, open an inbox, ask the prefill worker, import runs as they arrive; on a
timeout, a dead peer or a corrupt run keep what arrived and let the local prefill do the
rest). The decode side drives the flow; the frontend only names the prefill worker.
Imports protocol, errors, kv transfer and runtime; must not import the frontend or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

import msgspec

from kvrelay.errors import KvRelayError, PeerUnavailableError, RemoteError, TransferError
from kvrelay.kv.transfer import BlockRun, KVLayout, Transport
from kvrelay.protocol import DisaggInfo, GenerateRequest, PrefillRequest, PrefillResult, WireError
from kvrelay.runtime.base import Runtime
from kvrelay.worker.engine_loop import EngineLoop

logger = logging.getLogger(__name__)

ENDPOINT_PREFILL = "prefill"
_result_decoder = msgspec.msgpack.Decoder(PrefillResult)


async def serve_prefill(
    loop: EngineLoop, transport: Transport, layout: KVLayout, worker_id: str, payload: bytes
) -> AsyncGenerator[bytes, None]:
    """The prefill endpoint: one `PrefillResult` frame once the transfer was acknowledged."""
    try:
        req = msgspec.msgpack.decode(payload, type=PrefillRequest)
    except msgspec.DecodeError as exc:
        error = WireError(kind="invalid_request", message=str(exc))
        yield msgspec.msgpack.encode(PrefillResult(worker_id=worker_id, error=error))
        return
    try:
        result = await _prefill_and_send(loop, transport, layout, worker_id, req)
    except (TransferError, KvRelayError) as exc:
        logger.warning("remote prefill %s failed: %s", req.request_id, exc)
        result = PrefillResult(
            worker_id=worker_id, error=WireError(kind="transfer", message=str(exc))
        )
    yield msgspec.msgpack.encode(result)


async def _prefill_and_send(
    loop: EngineLoop, transport: Transport, layout: KVLayout, worker_id: str, req: PrefillRequest
) -> PrefillResult:
    rid = req.request_id
    first, _ = await loop.call(lambda e: e.missing_blocks(req.prompt_token_ids, req.cache_salt))
    block_size = layout.block_size
    num_cached_blocks = max(
        0, min(first, req.first_block + len(req.block_hashes)) - req.first_block
    )
    stream = await transport.open(req.transfer_address, rid, layout, req.timeout_s)

    def add(engine: Any) -> Any:
        return engine.add_prefill_request(
            rid, req.prompt_token_ids, req.first_block, req.block_hashes, req.cache_salt
        )

    exports = loop.submit_prefill(rid, add)
    num_blocks = num_bytes = 0
    finished = False
    try:
        while True:
            item = await exports.get()
            if isinstance(item, WireError):
                raise TransferError(f"prefill failed: {item.message}")
            if item.run is None:
                raise TransferError(f"export failed: {item.error}")
            num_blocks += len(item.run.block_hashes)
            num_bytes += len(item.run.payload)
            await stream.send(item.run)
            if item.done:
                break
        await stream.finish()
        finished = True
    finally:
        if not finished:
            loop.abort(rid)
            with contextlib.suppress(Exception):
                await stream.abort("prefill worker gave up")
    return PrefillResult(
        worker_id=worker_id,
        num_blocks=num_blocks,
        num_bytes=num_bytes,
        num_cached_tokens=num_cached_blocks * block_size,
    )


async def fetch_remote_prefill(
    loop: EngineLoop,
    runtime: Runtime,
    transport: Transport,
    transfer_address: str,
    request: GenerateRequest,
) -> DisaggInfo | None:
    """Import the prompt's missing blocks from the request's prefill worker; None when
    nothing is missing (or no memory to reserve). Never raises for a transfer fault: the
    `DisaggInfo` says `fallback` and the caller prefills the rest locally."""
    remote = request.remote_prefill
    assert remote is not None
    rid = request.request_id
    prompt = request.prompt_token_ids
    imp = await loop.call(lambda e: e.begin_kv_import(rid, prompt, request.cache_salt))
    if imp is None or not imp.missing_hashes:
        if imp is not None:
            await loop.call(lambda e: e.end_kv_import(rid))
        return None
    layout: KVLayout = await loop.call(lambda e: e.kv_layout())
    info = DisaggInfo(prefill_worker=remote.worker_id)
    inbox = transport.expect(rid, layout)
    ask = PrefillRequest(
        request_id=rid,
        prompt_token_ids=list(prompt),
        first_block=imp.next_block,
        block_hashes=list(imp.missing_hashes),
        transfer_address=transfer_address,
        cache_salt=request.cache_salt,
        timeout_s=remote.timeout_s,
    )
    started = time.monotonic()
    asking = asyncio.create_task(_ask(runtime, remote.address, ask, remote.timeout_s))

    def failed_early(task: asyncio.Task[Any]) -> None:
        # a prefill worker that dies before (or without) streaming must not cost a timeout
        if not task.cancelled() and (exc := task.exception()) is not None:
            inbox.put_error(exc if isinstance(exc, TransferError) else TransferError(str(exc)))

    asking.add_done_callback(failed_early)
    try:
        async for run in inbox.runs(remote.timeout_s):
            await loop.call(partial(_import, run=run))
            info.num_blocks += len(run.block_hashes)
            info.num_bytes += len(run.payload)
            run.release()
        result = await asyncio.wait_for(asking, remote.timeout_s)
        info.num_remote_cached_tokens = result.num_cached_tokens
    except (TransferError, KvRelayError, TimeoutError) as exc:
        info.fallback = True
        info.fallback_reason = f"{type(exc).__name__}: {exc}"
        logger.warning("remote prefill of %s fell back to local: %s", rid, info.fallback_reason)
    finally:
        inbox.close()
        asking.cancel()
        with contextlib.suppress(BaseException):
            await asking
    # Release the hold now, complete or not. Admission needs free blocks before it ends a
    # hold, so holds of requests still waiting for admission (and blocks reserved for KV
    # that never came) could pin every free block: no request could be admitted, ever. The
    # imported runs stay cached (evictable) and are found as prefix hits on admission; under
    # memory pressure some may be evicted first, and the engine recomputes them.
    await loop.call(lambda e: e.end_kv_import(rid))
    info.transfer_s = time.monotonic() - started
    info.num_imported_tokens = info.num_blocks * layout.block_size
    info.num_remote_cached_tokens = min(info.num_remote_cached_tokens, info.num_imported_tokens)
    return info


def _import(engine: Any, run: BlockRun) -> None:
    engine.import_kv(run)


async def _ask(runtime: Runtime, address: str, ask: PrefillRequest, timeout_s: float) -> Any:
    """Call the prefill worker; its `PrefillResult`, or TransferError."""
    frames = []
    stream = runtime.call(
        address, ENDPOINT_PREFILL, msgspec.msgpack.encode(ask), idle_timeout_s=timeout_s
    )
    try:
        async for frame in stream:
            frames.append(frame)
    except (PeerUnavailableError, RemoteError) as exc:
        raise TransferError(f"prefill worker unavailable: {exc}") from exc
    finally:
        await stream.aclose()
    if not frames:
        raise TransferError("prefill worker sent no result")
    result = _result_decoder.decode(frames[-1])
    if result.error is not None:
        raise TransferError(f"prefill worker: {result.error.message}")
    return result
