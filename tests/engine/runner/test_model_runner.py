"""ModelRunner against transformers (float64): varlen batches, chunked prefill, batched decode
mixed with prefill, shuffled block tables, greedy generation, seeded sampling."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrelay.engine.batch import ScheduledChunk, StepBatch
from kvrelay.engine.models.hf_loader import load_hf_dir
from kvrelay.engine.runner.model_runner import ModelRunner
from kvrelay.protocol import SamplingParams
from tests.tiny_models import KINDS, load_reference, make_tiny_model_dir

TOL = 1e-9
BLOCK_SIZE = 4
NUM_BLOCKS = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


@pytest.fixture(scope="module", params=KINDS)
def kind_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def reference(kind_dir: Path) -> Any:
    return load_reference(kind_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


def new_runner(path: Path, dtype: str = "float64") -> ModelRunner:
    return ModelRunner(load_hf_dir(path, dtype), NUM_BLOCKS, BLOCK_SIZE, dtype=dtype)


@dataclass
class Seq:
    """A request as a toy scheduler sees it; block ids come from a shuffled pool."""

    rid: str
    tokens: list[int]
    pool: list[int]
    sampling: SamplingParams = GREEDY
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)

    def chunk(self, num_tokens: int, sample: bool | None = None) -> ScheduledChunk:
        end = self.num_computed + num_tokens
        while len(self.blocks) * BLOCK_SIZE < end:
            self.blocks.append(self.pool.pop())
        sample = end == len(self.tokens) if sample is None else sample
        chunk = ScheduledChunk(
            self.rid, self.tokens[self.num_computed : end], self.num_computed,
            list(self.blocks), sample, self.sampling,
        )  # fmt: skip
        self.num_computed = end
        return chunk


def block_pool(seed: int = 0) -> list[int]:
    pool = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(pool)
    return pool


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 512) for _ in range(length - 1)]


def ref_last_logits(ref: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0, -1]  # type: ignore[no-any-return]


def assert_logits(ours: torch.Tensor, ref: Any, tokens: list[int]) -> None:
    torch.testing.assert_close(ours, ref_last_logits(ref, tokens), atol=TOL, rtol=TOL)


def test_mixed_length_prompts_in_one_step(kind_dir: Path, reference: Any) -> None:
    runner, pool = new_runner(kind_dir), block_pool()
    seqs = [Seq(f"r{n}", prompt(n, n), pool) for n in (1, 5, 17, 40, 2)]
    out = runner.execute_logits(StepBatch([s.chunk(len(s.tokens)) for s in seqs]))
    assert out.keys() == {s.rid for s in seqs}
    for s in seqs:
        assert_logits(out[s.rid], reference, s.tokens)


def test_chunked_prefill_then_decode(kind_dir: Path, reference: Any) -> None:
    runner, pool = new_runner(kind_dir), block_pool(1)
    seq = Seq("a", prompt(50, 3), pool)
    for size in (16, 7, 1, 26):
        out = runner.execute_logits(StepBatch([seq.chunk(size)]))
    assert_logits(out["a"], reference, seq.tokens)
    for _ in range(5):
        seq.tokens.append(int(out["a"].argmax()))
        out = runner.execute_logits(StepBatch([seq.chunk(1)]))
        assert_logits(out["a"], reference, seq.tokens)


def test_decode_batched_with_prefills(kind_dir: Path, reference: Any) -> None:
    runner, pool = new_runner(kind_dir), block_pool(2)
    olds = [Seq(f"old{i}", prompt(n, 10 + i), pool) for i, n in enumerate((9, 23, 4))]
    out = runner.execute_logits(StepBatch([s.chunk(len(s.tokens)) for s in olds]))
    fresh = Seq("fresh", prompt(30, 20), pool)
    partial = Seq("partial", prompt(40, 21), pool)
    runner.execute_logits(StepBatch([partial.chunk(12)]))
    for fresh_size in (10, 10, 9):
        for s in olds:
            s.tokens.append(int(out[s.rid].argmax()))
        chunks = [olds[0].chunk(1), fresh.chunk(fresh_size), olds[1].chunk(1), partial.chunk(9)]
        chunks.append(olds[2].chunk(1))
        out = runner.execute_logits(StepBatch(chunks))
        assert out.keys() == {s.rid for s in olds}  # fresh and partial are mid-prompt
        for s in olds:
            assert_logits(out[s.rid], reference, s.tokens)
    # both prompts end with a single-token chunk, which takes the batched decode path
    out = runner.execute_logits(StepBatch([partial.chunk(1), fresh.chunk(1)]))
    assert_logits(out["partial"], reference, partial.tokens)
    assert_logits(out["fresh"], reference, fresh.tokens)


def run_greedy(
    runner: ModelRunner, seqs: list[Seq], num_new: int, chunk_size: int
) -> dict[str, list[int]]:
    """A toy scheduler: every step, each sequence adds a prefill chunk or a decode token."""
    outputs: dict[str, list[int]] = {s.rid: [] for s in seqs}
    while any(len(outputs[s.rid]) < num_new for s in seqs):
        live = [s for s in seqs if len(outputs[s.rid]) < num_new]
        chunks = [s.chunk(min(chunk_size, len(s.tokens) - s.num_computed)) for s in live]
        finished = []
        for rid, tok in runner.execute(StepBatch(chunks)).items():
            seq = next(s for s in seqs if s.rid == rid)
            seq.tokens.append(tok)
            outputs[rid].append(tok)
            if len(outputs[rid]) == num_new:
                finished.append(rid)
        runner.sampler.drop(finished)
    return outputs


def test_greedy_generation_matches_generate(kind_dir: Path, reference: Any) -> None:
    runner, pool = new_runner(kind_dir), block_pool(3)
    prompts = [prompt(n, 30 + n) for n in (3, 21, 12, 1)]
    seqs = [Seq(f"g{i}", list(p), pool) for i, p in enumerate(prompts)]
    outputs = run_greedy(runner, seqs, num_new=12, chunk_size=8)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            gen = reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)
        expected = gen[0, len(p) :].tolist()  # stops early at eos
        assert outputs[f"g{i}"][: len(expected)] == expected
    assert len({tuple(o) for o in outputs.values()}) > 1, "outputs should depend on the prompt"


def sample_alone_and_in_batch(path: Path, target: SamplingParams) -> tuple[list[int], ...]:
    results = []
    for companions in ([], [None, 5, None], [11]):
        runner, pool = new_runner(path, "float32"), block_pool(len(companions))
        seqs = [Seq("target", prompt(13, 1), pool, target)]
        for j, seed in enumerate(companions):
            params = SamplingParams(temperature=1.0, seed=seed)
            seqs.insert(0, Seq(f"c{j}", prompt(5 + 4 * j, 50 + j), pool, params))
        results.append(run_greedy(runner, seqs, num_new=10, chunk_size=6)["target"])
    return tuple(results)


def test_seeded_sampling_is_reproducible_and_batch_independent(llama_dir: Path) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=1234)
    alone, with_three, with_one = sample_alone_and_in_batch(llama_dir, params)
    assert alone == with_three == with_one
    other_seed = sample_alone_and_in_batch(llama_dir, SamplingParams(temperature=0.9, seed=99))
    assert other_seed[0] != alone
    greedy = sample_alone_and_in_batch(llama_dir, GREEDY)[0]
    assert alone != greedy  # temperature really samples


def test_top_k_one_equals_greedy(llama_dir: Path) -> None:
    greedy = sample_alone_and_in_batch(llama_dir, GREEDY)[0]
    top1 = SamplingParams(temperature=1.5, top_k=1)
    assert sample_alone_and_in_batch(llama_dir, top1) == (greedy, greedy, greedy)


def test_finished_requests_drop_sampler_state(llama_dir: Path) -> None:
    runner, pool = new_runner(llama_dir, "float32"), block_pool()
    seq = Seq("s", prompt(6, 0), pool, SamplingParams(temperature=1.0, seed=3))
    runner.execute(StepBatch([seq.chunk(6)]))
    assert runner.sampler.num_generators == 1
    assert runner.execute(StepBatch([], finished_request_ids=["s"])) == {}
    assert runner.sampler.num_generators == 0


def test_sizes(llama_dir: Path) -> None:
    runner = new_runner(llama_dir, "float32")
    arch = runner.arch
    # K and V, every layer, block_size tokens, kv heads x head_dim floats of 4 bytes
    expected = 2 * arch.num_layers * BLOCK_SIZE * arch.num_kv_heads * arch.head_dim * 4
    assert ModelRunner.bytes_per_block(arch, BLOCK_SIZE, "float32") == expected
    assert ModelRunner.bytes_per_block(arch, BLOCK_SIZE, "bfloat16") == expected // 2
    assert runner.kv_cache.data.numel() * 4 == expected * NUM_BLOCKS
    assert runner.max_model_len == 4096


@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 0.5), ("float16", 0.1)])
def test_low_precision_stays_close_to_float32(llama_dir: Path, dtype: str, tol: float) -> None:
    results = []
    for dt in ("float32", dtype):
        runner, pool = new_runner(llama_dir, dt), block_pool()
        seq = Seq("a", prompt(30, 4), pool)
        first = runner.execute_logits(StepBatch([seq.chunk(30)]))["a"]
        seq.tokens.append(77)
        second = runner.execute_logits(StepBatch([seq.chunk(1)]))["a"]
        results.append((first.float(), second.float()))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, atol=tol, rtol=0.0)
