"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF): the engine's first 32 greedy tokens
equal transformers' on the same GGUF file, on 3 prompts. Both run in float64 so rounding
cannot flip a near-tie. Slow (loads the model twice) but runs in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvrelay.engine.llm import LLM
from kvrelay.engine.models.loader import resolve_model_path
from kvrelay.protocol import SamplingParams
from tests.engine.test_engine_correctness import reference_greedy

PROMPTS = [
    "def fibonacci(n):",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "The capital of France is",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


def test_first_32_greedy_tokens_match_transformers(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(cache_dir))
    gguf = resolve_model_path("smollm2")
    llm = LLM(dtype="float64", max_num_batched_tokens=16)  # chunked prefill on the way
    # Dense weights (transformers otherwise keeps GGUF tensors packed and computes in fp32).
    dense = GgufConfig(gguf_file=gguf.name, dequantize=True)
    reference = (
        AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=dense
        )
        .to(torch.float64)
        .eval()
    )
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = llm.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        # A plain argmax loop: generate(min_new_tokens=...) would mask EOS, which we ignore
        # only after choosing it.
        ref = reference_greedy(reference, ids, 32)
        assert out.output_token_ids == ref, f"diverged on {prompt!r}"
        assert out.text == llm.tokenizer.decode(out.output_token_ids)
