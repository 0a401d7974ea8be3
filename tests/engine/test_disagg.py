"""Disaggregated prefill at the engine level: a prompt prefilled on engine A, its blocks
exported as each chunk completes, imported into engine B, and B's greedy output equals an
aggregated run token for token — also when B or A already hold part of the prefix, when a
transfer stops halfway, and over the TCP transport with sending overlapped with prefill."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest
import torch

from kvrelay.config import CacheConfig, EngineConfig, SchedulerConfig
from kvrelay.engine.core import EngineCore, KVExport
from kvrelay.engine.models.hf_loader import load_hf_dir
from kvrelay.engine.runner.model_runner import ModelRunner
from kvrelay.errors import CorruptTransferError, InvalidRequestError, TransferError
from kvrelay.kv.events import BlockStored
from kvrelay.kv.tcp_transport import TcpTransport
from kvrelay.kv.transfer import BlockRun
from kvrelay.protocol import SamplingParams
from tests.tiny_models import make_tiny_model_dir

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def kinds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), kind=request.param)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), kind="llama")


def make_engine(path: Path, num_blocks: int = 256, budget: int = 48) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(path),
            dtype="float64",
            cache=CacheConfig(block_size=BS, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
        )
    )


def generate(engine: EngineCore, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(rid, prompt, GREEDY)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                result = out.output_token_ids
        engine.check_integrity()
    return result


def prefill_and_export(
    engine: EngineCore, rid: str, prompt: list[int], first: int, hashes: list[int]
) -> list[tuple[int, KVExport]]:
    """Run A's prefill request to the end; each export with the step it came after."""
    engine.add_prefill_request(rid, prompt, first, hashes)
    got = [(0, e) for e in engine.take_kv_exports()]
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        got += [(step, e) for e in engine.take_kv_exports()]
        engine.check_integrity()
    return got


def transfer(
    a: EngineCore, b: EngineCore, rid: str, prompt: list[int]
) -> list[tuple[int, KVExport]]:
    """Plan on B, prefill and export on A, import on B; the exports (for assertions)."""
    imp = b.begin_kv_import(rid, prompt)
    assert imp is not None
    if not imp.missing_hashes:
        return []
    exports = prefill_and_export(a, f"prefill-{rid}", prompt, imp.next_block, imp.missing_hashes)
    for _, export in exports:
        assert export.run is not None and not export.error
        b.import_kv(dataclasses.replace(export.run, request_id=rid))
        export.run.release()
        b.check_integrity()
    assert exports[-1][1].done
    return exports


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def test_exported_blocks_give_the_aggregated_output(kinds: Path) -> None:
    a, b, ref = make_engine(kinds), make_engine(kinds), make_engine(kinds)
    vocab = ref.model.arch.vocab_size
    for i, prompt in enumerate(prompts(vocab, [17, 33, 100, 161], seed=1)):
        expected = generate(ref, f"ref-{i}", prompt)
        b.take_kv_events()
        exports = transfer(a, b, f"r{i}", prompt)
        usable = (len(prompt) - 1) // BS
        assert sum(len(e.run.block_hashes) for _, e in exports if e.run) == usable
        stored = [h for ev in _events(b) if isinstance(ev, BlockStored) for h in ev.block_hashes]
        assert stored == b.prompt_block_hashes(prompt)  # imported blocks announced
        hits_before = b.kv.stats.num_hit_tokens
        assert generate(b, f"r{i}", prompt) == expected
        assert b.kv.stats.num_hit_tokens - hits_before == usable * BS  # realized on B
        if len(prompt) > 150:  # chunked prefill: blocks leave A chunk by chunk
            steps = [s for s, _ in exports]
            assert len(set(steps)) > 2 and steps == sorted(steps)


def _events(engine: EngineCore) -> list[object]:
    batch = engine.take_kv_events()
    return [] if batch is None else list(batch.events)


def test_only_missing_blocks_move_when_decode_holds_part_of_the_prefix(tiny: Path) -> None:
    a, b, ref = make_engine(tiny), make_engine(tiny), make_engine(tiny)
    shared = prompts(ref.model.arch.vocab_size, [96], seed=2)[0]
    tails = prompts(ref.model.arch.vocab_size, [70, 5, 40], seed=3)
    generate(b, "warm", [*shared, 7])  # B computed the shared 6 blocks itself
    for i, tail in enumerate(tails):
        prompt = shared + tail
        expected = generate(ref, f"ref-{i}", prompt)
        num_cached, missing = b.missing_blocks(prompt)
        assert num_cached >= 6
        exports = transfer(a, b, f"r{i}", prompt)
        runs = [e.run for _, e in exports if e.run is not None]
        assert [h for r in runs for h in r.block_hashes] == missing
        if missing:
            assert runs[0].first_block == num_cached
        assert generate(b, f"r{i}", prompt) == expected


def test_prefill_engine_exports_its_cached_blocks_at_once(tiny: Path) -> None:
    a, b, ref = make_engine(tiny), make_engine(tiny), make_engine(tiny)
    prompt = prompts(ref.model.arch.vocab_size, [200], seed=4)[0]
    generate(a, "warm", prompt[:120])  # A has 7 blocks of the prompt cached
    imp = b.begin_kv_import("r", prompt)
    assert imp is not None and imp.next_block == 0
    a.add_prefill_request("p", prompt, 0, imp.missing_hashes)
    first = a.take_kv_exports()
    assert first and first[0].run is not None and len(first[0].run.block_hashes) == 7
    a.abort_request("p")
    assert a.take_kv_exports() == [] and not a.has_unfinished()
    b.end_kv_import("r")
    b.check_integrity()
    assert b.kv.num_free_blocks == b.kv.pool.num_blocks


def test_interrupted_transfer_recomputes_the_rest(tiny: Path) -> None:
    a, b, ref = make_engine(tiny), make_engine(tiny), make_engine(tiny)
    prompt = prompts(ref.model.arch.vocab_size, [150], seed=5)[0]
    expected = generate(ref, "ref", prompt)
    imp = b.begin_kv_import("r", prompt)
    assert imp is not None
    exports = prefill_and_export(a, "p", prompt, 0, imp.missing_hashes)
    run = exports[0][1].run
    assert run is not None and len(exports) > 1
    first = BlockRun("r", run.first_block, run.block_hashes, run.payload)
    b.import_kv(first)
    with pytest.raises(CorruptTransferError):
        b.import_kv(first)  # not the next planned run: refused, nothing written or cached
    b.check_integrity()
    assert generate(b, "r", prompt) == expected  # the rest is recomputed on B
    assert b.kv.stats.num_hit_tokens == len(first.block_hashes) * BS


def test_import_api_errors(tiny: Path) -> None:
    a, b = make_engine(tiny), make_engine(tiny, num_blocks=8)
    prompt = prompts(a.model.arch.vocab_size, [200], seed=6)[0]
    assert b.begin_kv_import("big", prompt) is None  # 12 blocks do not fit in 8
    with pytest.raises(TransferError):
        b.import_kv(BlockRun("nobody", 0, [1], memoryview(b"")))
    imp = b.begin_kv_import("r", prompt[:40])
    assert imp is not None
    with pytest.raises(InvalidRequestError):
        b.begin_kv_import("r", prompt[:40])
    b.abort_request("r")  # releases the hold
    b.check_integrity()
    assert b.kv.num_free_blocks == 8
    hashes = a.prompt_block_hashes(prompt)
    with pytest.raises(InvalidRequestError, match="cache salt"):
        a.add_prefill_request("p", prompt, 0, hashes, cache_salt="other-tenant")
    with pytest.raises(InvalidRequestError, match="full blocks"):
        a.add_prefill_request("p", prompt[:20], 0, hashes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_runner_export_import_round_trip(tiny: Path, dtype: str) -> None:
    src = ModelRunner(load_hf_dir(tiny, dtype), 32, BS, dtype=dtype)
    dst = ModelRunner(load_hf_dir(tiny, dtype), 32, BS, dtype=dtype)
    src.kv_cache.data.copy_(torch.randn_like(src.kv_cache.data, dtype=torch.float32))
    payload = src.export_blocks([5, 2, 9])
    assert payload.nbytes == 3 * src.kv_layout().bytes_per_block
    dst.import_blocks([0, 31, 7], payload)
    for s, d in [(5, 0), (2, 31), (9, 7)]:
        assert torch.equal(dst.kv_cache.data[:, :, d], src.kv_cache.data[:, :, s])
    assert dst.kv_cache.data[:, :, 1].abs().sum() == 0
    with pytest.raises(CorruptTransferError):
        dst.import_blocks([1], payload)


def test_pipelined_transfer_over_tcp(tiny: Path) -> None:
    """A's steps run in a thread while the loop sends what the previous step exported and
    B imports runs as they arrive: sending block i overlaps computing block i+1."""
    a, b, ref = make_engine(tiny), make_engine(tiny), make_engine(tiny)
    batch = prompts(ref.model.arch.vocab_size, [180, 64], seed=7)
    expected = [generate(ref, f"ref-{i}", p) for i, p in enumerate(batch)]

    async def one(rx: TcpTransport, tx: TcpTransport, rid: str, prompt: list[int]) -> None:
        imp = b.begin_kv_import(rid, prompt)
        assert imp is not None
        inbox = rx.expect(rid, b.kv_layout())
        stream = await tx.open(rx.address, rid, a.kv_layout())
        a.add_prefill_request(rid, prompt, imp.next_block, imp.missing_hashes)

        async def produce() -> None:
            while True:
                for export in a.take_kv_exports():
                    assert export.run is not None
                    await stream.send(export.run)
                    if export.done:
                        await stream.finish()
                        return
                await asyncio.to_thread(a.step)

        producing = asyncio.create_task(produce())
        async for run in inbox.runs(timeout_s=10):
            b.import_kv(run)
            run.release()
        await producing

    async def body() -> None:
        rx, tx = TcpTransport(), TcpTransport()
        await rx.start()
        for i, prompt in enumerate(batch):
            await one(rx, tx, f"r{i}", prompt)
        await rx.close()

    asyncio.run(body())
    for i, prompt in enumerate(batch):
        assert generate(b, f"r{i}", prompt) == expected[i]
