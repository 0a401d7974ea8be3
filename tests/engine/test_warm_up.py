"""EngineCore.warm_up: one dummy prefill + decode through the runner that leaves no trace —
no events, no cached blocks, no stats — and does not change what requests generate."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvrelay.config import CacheConfig, EngineConfig
from kvrelay.engine.batch import StepBatch
from kvrelay.engine.core import EngineCore
from kvrelay.protocol import SamplingParams
from tests.tiny_models import make_tiny_model_dir

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), kind="llama")


def make_engine(path: Path) -> tuple[EngineCore, list[int]]:
    """An engine in float32 (the CPU kernels' dtype) and a count of its runner steps."""
    engine = EngineCore(
        EngineConfig(model=str(path), dtype="float32", cache=CacheConfig(num_blocks=64))
    )
    steps: list[int] = []
    execute = engine.runner.execute

    def counted(batch: StepBatch) -> dict[str, int]:
        steps.append(batch.num_tokens)
        return execute(batch)

    engine.runner.execute = counted  # type: ignore[method-assign]
    return engine, steps


def outputs(engine: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


def test_warm_up_leaves_no_trace(tiny: Path) -> None:
    engine, steps = make_engine(tiny)
    engine.warm_up()
    assert steps == [32, 1]  # a two-block prefill and one decode step ran
    assert engine.take_kv_events() is None
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.prefix_cache.num_query_tokens == 0
    assert engine.kv.pool.num_cached_blocks == 0
    engine.check_integrity()

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 40, 33)]
    cold, _ = make_engine(tiny)
    assert outputs(engine, prompts) == outputs(cold, prompts)

    before = len(steps)
    engine.warm_up()  # the engine has cached blocks now: nothing runs
    assert len(steps) == before
