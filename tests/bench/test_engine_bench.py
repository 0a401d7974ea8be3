"""Engine benchmark: the workload builder (seeded, within spec, exact shared prefix), the suite
run against a fake system, and the report arithmetic. No model, no torch: fast."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kvrelay.bench.engine import _common_prefix, compare, count_params, format_table
from kvrelay.bench.engine_suite import (
    Gen,
    Workload,
    WorkloadSpec,
    build_workload,
    run_suite,
    stdlib_sources,
)
from kvrelay.engine.models.config import ModelArchConfig


def encode(text: str) -> list[int]:
    """A byte-level stand-in for the model's tokenizer: deterministic and fast."""
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def sources() -> list[Path]:
    return stdlib_sources()


@pytest.fixture(scope="module")
def workload(sources: list[Path]) -> Workload:
    return build_workload(encode, WorkloadSpec(), seed=0, files=sources)


def test_sources_are_real_stdlib_files_without_tests(sources: list[Path]) -> None:
    assert len(sources) > 100
    assert all(p.suffix == ".py" and p.is_file() for p in sources)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in sources)
    assert sources == sorted(sources, key=lambda p: p.as_posix())


def test_same_seed_same_workload_other_seed_other(sources: list[Path], workload: Workload) -> None:
    again = build_workload(encode, WorkloadSpec(), seed=0, files=sources)
    assert again == workload
    other = build_workload(encode, WorkloadSpec(), seed=1, files=sources)
    assert other.prompts != workload.prompts
    assert other.max_tokens != workload.max_tokens


def test_throughput_requests_within_spec(workload: Workload) -> None:
    spec = workload.spec
    assert len(workload.prompts) == len(workload.max_tokens) == 32
    lens = [len(p) for p in workload.prompts]
    assert all(64 <= n <= 1024 for n in lens)
    assert all(16 <= m <= 128 for m in workload.max_tokens)
    assert max(lens) - min(lens) > 300  # mixed lengths, not one size
    assert len(workload.batch1_prompt) == spec.batch1_prompt_len == 128
    assert spec.batch1_output_len == 128
    assert len({tuple(p[:16]) for p in workload.prompts}) == 32  # no accidental shared block


def test_prefix_prompts_share_exactly_1920_tokens(workload: Workload) -> None:
    prompts = workload.prefix_prompts
    assert len(prompts) == 8
    assert all(len(p) == 2048 for p in prompts)
    assert workload.spec.shared_prefix_len == 1920
    for i, a in enumerate(prompts):
        for b in prompts[i + 1 :]:
            assert _common_prefix(a, b) == 1920
    # the prefix is new to the engine: no throughput prompt starts with its first block
    assert all(p[:16] != prompts[0][:16] for p in workload.prompts)


def test_quick_workload_is_small(sources: list[Path]) -> None:
    wl = build_workload(encode, WorkloadSpec.quick(), seed=0, files=sources)
    assert len(wl.prompts) == 8 and sum(wl.max_tokens) < 300
    assert all(len(p) == 512 for p in wl.prefix_prompts)
    assert _common_prefix(wl.prefix_prompts[0], wl.prefix_prompts[1]) == 480


def test_workload_json_round_trip(workload: Workload) -> None:
    assert Workload.from_json(workload.to_json()) == workload
    described = workload.describe()
    assert described["throughput"]["num_output_tokens"] == sum(workload.max_tokens)


class FakeTarget:
    """Answers instantly; caches prompts it has seen (whole 16-token blocks)."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Gen]:
        gens = []
        for prompt, m in zip(prompts, max_tokens, strict=True):
            hit = max((_common_prefix(prompt, s) for s in self.seen), default=0) // 16 * 16
            self.seen.append(prompt)
            gens.append(Gen(m, hit, None, tuple(range(m))))
        return gens


def test_suite_on_a_fake_system(sources: list[Path]) -> None:
    wl = build_workload(encode, WorkloadSpec.quick(), seed=3, files=sources)
    res = run_suite(FakeTarget(), wl)
    assert res["num_output_tokens"] == sum(wl.max_tokens)
    assert res["num_requests_wrong_length"] == 0
    assert res["output_tok_per_s"] > 0 and res["batch1_decode_tok_per_s"] > 0
    assert res["prefix_cached_tokens"] == [0, 480, 480, 480]
    assert len(res["ttft_all_s"]) == 4


def _system(tok_s: float, ratio: float, b1: float) -> dict[str, object]:
    return {
        "output_tok_per_s": tok_s,
        "total_s": 1.0,
        "ttft_cold_s": 1.0,
        "ttft_warm_s": ratio,
        "warm_cold_ratio": ratio,
        "batch1_decode_tok_per_s": b1,
        "batch1_fraction_of_bound": b1 / 40,
        "batch1_first_tokens": [1, 2, 3],
    }


def test_compare_targets_against_vllm_or_transformers() -> None:
    systems = {
        "kvrelay": _system(30.0, 0.08, 25.0),
        "transformers": _system(3.0, 1.0, 11.0),
        "vllm": {"skipped": "not installed"},
    }
    ratios, targets = compare(systems)  # type: ignore[arg-type]
    assert set(ratios) == {"transformers"}
    assert ratios["transformers"]["output_tok_per_s"] == pytest.approx(10.0)
    assert ratios["transformers"]["batch1_greedy_tokens_agreeing"] == 3
    assert targets["throughput"] == {
        "vs": "transformers",
        "min_ratio": 7.0,
        "ratio": pytest.approx(10.0),
        "met": True,
    }
    assert targets["warm_cold_ttft"]["met"] and targets["batch1_fraction_of_bound"]["met"]
    systems["vllm"] = _system(40.0, 0.1, 10.0)
    _, targets = compare(systems)  # type: ignore[arg-type]
    assert targets["throughput"]["vs"] == "vllm" and targets["throughput"]["met"] is False
    report = {
        "systems": systems,
        "machine": {
            "cpu_count": 2,
            "torch_threads": 2,
            "bandwidth_gb_s": 20.0,
            "bound_tok_per_s": 37.0,
            "weight_bytes": 538e6,
        },
        "ratios": ratios,
        "targets": targets,
    }
    table = format_table(report)
    assert "kvrelay" in table and "vllm" in table and "MISSED" in table


def test_count_params_matches_smollm2_135m() -> None:
    arch = ModelArchConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )
    assert count_params(arch) == 134_515_008  # transformers' count of the same GGUF
