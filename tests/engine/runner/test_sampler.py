"""Sampler: greedy ties, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import math

import torch

from kvrelay.engine.runner.sampler import Sampler, _filtered_probs
from kvrelay.protocol import SamplingParams


def test_greedy_ties_go_to_lowest_index() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    greedy = SamplingParams(temperature=0.0)
    assert Sampler().sample(logits, ["a", "b"], [greedy, greedy]) == [1, 0]


def test_top_k_one_is_greedy_even_when_sampling() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    params = SamplingParams(temperature=2.0, top_k=1, seed=3)
    assert Sampler().sample(logits, ["a"], [params]) == [1]


def test_top_k_keeps_k_best() -> None:
    probs = _filtered_probs(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), [SamplingParams(top_k=2)])
    expected = torch.softmax(torch.tensor([2.0, 3.0]), -1)
    torch.testing.assert_close(probs[0], torch.cat([torch.zeros(2), expected]))


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = _filtered_probs(logits, [SamplingParams(top_p=0.7)])
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = _filtered_probs(logits, [SamplingParams(top_p=0.1)])  # the top token always stays
    torch.testing.assert_close(probs[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_filters_are_per_row_and_combine() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)
    params = [
        SamplingParams(top_k=3, top_p=0.9),  # k keeps 3 (mass 0.95); p then keeps 3 of those
        SamplingParams(),
        SamplingParams(temperature=0.5, top_k=2),
    ]
    probs = _filtered_probs(logits, params)
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sharp = torch.tensor([0.25, 0.09])  # p ** (1 / 0.5)
    torch.testing.assert_close(probs[2], torch.cat([sharp / sharp.sum(), torch.zeros(2)]))


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler().sample(logits[2:3], ["x"], [seeded])[0] for _ in range(2)]
    sampler = Sampler()
    other = SamplingParams(temperature=1.0)
    together = [
        sampler.sample(logits, ["p", "q", "x", "r"], [other, other, seeded, other])[2],
        sampler.sample(logits, ["p", "q", "x", "r"], [other, other, seeded, other])[2],
    ]
    alone_seq = Sampler()
    expected = [alone_seq.sample(logits[2:3], ["x"], [seeded])[0] for _ in range(2)]
    assert alone[0] == alone[1] == expected[0]  # fresh generator, same seed, same first draw
    assert together == expected  # the generator advances per request, not per batch


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.7, 0.2, 0.1, 0.0]]).log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens = Sampler().sample(logits, [str(i) for i in range(4000)], params)
    freq = [tokens.count(t) / 4000 for t in range(4)]
    assert all(
        math.isclose(f, p, abs_tol=0.04) for f, p in zip(freq, [0.7, 0.2, 0.1, 0.0], strict=True)
    )
