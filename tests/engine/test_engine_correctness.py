"""Greedy outputs of the whole engine equal an independent reference (transformers, same
weights, float64) token for token: mixed-length batches, chunked prefill, prefix-cache hits,
preemption and resumption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvrelay.config import CacheConfig, EngineConfig, SchedulerConfig
from kvrelay.engine.core import EngineCore
from kvrelay.protocol import RequestOutput, SamplingParams
from tests.tiny_models import load_reference, make_tiny_model_dir

KINDS = ["llama", "qwen2", "llama3"]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), kind=request.param)


def reference_greedy(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' own forward with its own (contiguous) KV cache, argmax each step."""
    ids: list[int] = []
    past = None
    step_input = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(num_tokens):
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ids.append(int(torch.argmax(out.logits[0, -1])))
            step_input = torch.tensor([[ids[-1]]])
    return ids


def make_engine(path: Path, num_blocks: int = 512, budget: int = 64) -> EngineCore:
    config = EngineConfig(
        model=str(path),
        dtype="float64",
        cache=CacheConfig(block_size=16, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
    )
    return EngineCore(config)


def run_all(
    engine: EngineCore, prompts: list[list[int]], max_tokens: list[int]
) -> list[RequestOutput]:
    ids = []
    for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        rid = f"req-{len(engine.scheduler.requests)}-{i}-{random.random()}"
        engine.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        ids.append(rid)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    return [done[i] for i in ids]


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def check(reference: torch.nn.Module, prompts: list[list[int]], outs: list[RequestOutput]) -> None:
    for prompt, out in zip(prompts, outs, strict=True):
        expected = reference_greedy(reference, prompt, len(out.output_token_ids))
        assert out.output_token_ids == expected, f"prompt of {len(prompt)} tokens diverged"


def test_mixed_batch_with_chunked_prefill_and_prefix_hits(tiny: Path) -> None:
    engine = make_engine(tiny, budget=48)
    reference = load_reference(tiny)
    vocab = engine.model.arch.vocab_size
    lengths = [1, 3, 15, 16, 17, 31, 33, 47, 64, 90, 130, 200]
    prompts = random_prompts(vocab, lengths, seed=1)
    outs = run_all(engine, prompts, [6 + i % 5 for i in range(len(prompts))])
    check(reference, prompts, outs)
    # Round two: shared prefixes with round one (and an exact repeat) must hit the cache.
    rng = random.Random(2)
    second = [[*p[: max(1, len(p) - rng.randrange(1, 10))], rng.randrange(vocab)] for p in prompts]
    second += [prompts[-1]]
    outs2 = run_all(engine, second, [7] * len(second))
    check(reference, second, outs2)
    assert sum(o.num_cached_tokens for o in outs2) >= 16 * 15
    assert outs2[-1].num_cached_tokens == 192  # 200 tokens: 12 full blocks, last token recomputed


def test_preemption_and_resume_give_identical_tokens(tiny: Path) -> None:
    engine = make_engine(tiny, num_blocks=14, budget=64)
    reference = load_reference(tiny)
    prompts = random_prompts(engine.model.arch.vocab_size, [20, 40, 25, 50, 30, 35, 45, 28], 3)
    outs = run_all(engine, prompts, [40] * len(prompts))
    assert sum(o.metrics.num_preemptions for o in outs if o.metrics) > 0, "must preempt"
    check(reference, prompts, outs)
    assert engine.kv.num_free_blocks == 14
