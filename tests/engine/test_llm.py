"""The offline API `kvrelay.LLM`: text and token prompts, streaming, cached-token and timing
fields, and typed errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvrelay
from kvrelay.errors import (
    CorruptModelError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelNotFoundError,
    PromptTooLongError,
)
from kvrelay.protocol import SamplingParams
from tests.tiny_models import make_tiny_model_dir
from tests.tiny_tokenizer import add_tiny_tokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> kvrelay.LLM:
    path = make_tiny_model_dir(tmp_path_factory.mktemp("llm"), kind="llama")
    add_tiny_tokenizer(path)
    return kvrelay.LLM(str(path), max_model_len=256, num_kv_blocks=64)


def test_text_prompts_return_text_tokens_and_timings(llm: kvrelay.LLM) -> None:
    prompts = ["def fibonacci(n):", "import os\n"]
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.finished and out.finish_reason == "length"
        assert len(out.output_token_ids) == 8
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert out.text == llm.tokenizer.decode(out.output_token_ids)
        assert out.metrics is not None
        assert out.metrics.queue_s >= 0 and out.metrics.prefill_s > 0 and out.metrics.decode_s > 0


def test_repeat_reports_cached_prompt_tokens(llm: kvrelay.LLM) -> None:
    prompt = list(range(3, 60))  # 57 tokens: 3 full blocks of 16 can be reused
    first = llm.generate(prompt, GREEDY)[0]
    second = llm.generate(prompt, GREEDY)[0]
    assert second.num_cached_tokens == 48
    assert second.output_token_ids == first.output_token_ids


def test_stream_yields_growing_outputs(llm: kvrelay.LLM) -> None:
    seen = list(llm.stream("class Config:", GREEDY))
    lengths = [len(o.output_token_ids) for o in seen]
    assert lengths == list(range(1, 9))
    assert seen[-1].finished and not any(o.finished for o in seen[:-1])
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_stop_token_ids_and_seeded_sampling(llm: kvrelay.LLM) -> None:
    first = llm.generate([5, 6, 7], GREEDY)[0]
    stop_at = first.output_token_ids[2]
    stopped = llm.generate([5, 6, 7], SamplingParams(temperature=0.0, stop_token_ids=[stop_at]))
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].output_token_ids[-1] == stop_at
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert llm.generate([5, 6], sampled)[0].output_token_ids == (
        llm.generate([5, 6], sampled)[0].output_token_ids
    )


def test_prompt_over_context_is_a_typed_error(llm: kvrelay.LLM) -> None:
    with pytest.raises(PromptTooLongError, match="shorten the prompt or lower max_tokens"):
        llm.generate(list(range(250)), GREEDY)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_bad_token_ids_and_empty_prompt(llm: kvrelay.LLM) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([1, 10**6], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", GREEDY)


def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        kvrelay.LLM(str(tmp_path / "nope"))


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(CorruptModelError):
        kvrelay.LLM(str(bad))
