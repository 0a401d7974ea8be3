"""GGUF loading: SmolLM2 against transformers tensor by tensor, the weight cache, tiny files
written here (llama / qwen2, F32 / Q8_0, Llama 3 rope) and every way a file can be broken."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from kvrelay.engine.models.config import LoadedModel
from kvrelay.engine.models.gguf_loader import load_gguf, torch_dtype
from kvrelay.engine.models.loader import default_model_path
from kvrelay.errors import CorruptModelError, ModelLoadError, ModelNotFoundError
from tests import tiny_gguf

Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "weight-cache"
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def smollm2_loads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Load SmolLM2 twice into a fresh cache: the first load converts, the second hits."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("smollm2-cache")
        mp.setenv("KVRELAY_CACHE_DIR", str(cache))
        path = default_model_path()
        start = time.perf_counter()
        first = load_gguf(path)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        second = load_gguf(path)
        second_s = time.perf_counter() - start
        yield {"first": first, "second": second, "first_s": first_s, "second_s": second_s}


@pytest.fixture(scope="module")
def smollm2_reference() -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    path = default_model_path()
    # Dense float32 weights: transformers otherwise may keep them packed for GGUF kernels.
    dense = transformers.GgufConfig(gguf_file=path.name, dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=dense
    )


@pytest.mark.slow
def test_smollm2_matches_transformers(
    smollm2_loads: dict[str, Any], smollm2_reference: Any
) -> None:
    ours: LoadedModel = smollm2_loads["first"]
    ref = smollm2_reference.state_dict()
    cfg = smollm2_reference.config
    assert ours.arch.tie_word_embeddings and "lm_head.weight" not in ours.state_dict
    assert set(ref) - {"lm_head.weight"} == set(ours.state_dict)
    for name, tensor in ours.state_dict.items():
        # Bit-identical: same dequantization, and the Q/K permutation undone exactly.
        assert torch.equal(tensor, ref[name]), name
    a = ours.arch
    assert (a.num_layers, a.hidden_size, a.intermediate_size) == (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
    )
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (9, 3, 64)
    assert (a.num_heads, a.num_kv_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads)
    assert a.vocab_size == cfg.vocab_size == 49152
    assert a.rope_theta == 100000.0
    assert a.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)
    assert a.max_position_embeddings == cfg.max_position_embeddings == 8192
    assert (a.bos_token_id, a.eos_token_ids) == (1, (2,))


def test_smollm2_cache_hit(smollm2_loads: dict[str, Any]) -> None:
    first: LoadedModel = smollm2_loads["first"]
    second: LoadedModel = smollm2_loads["second"]
    assert first.extra["load_source"] == "gguf"
    assert second.extra["load_source"] == "cache"
    assert smollm2_loads["second_s"] < smollm2_loads["first_s"] / 3
    assert second.arch == first.arch
    assert second.state_dict.keys() == first.state_dict.keys()
    for name, tensor in first.state_dict.items():
        assert torch.equal(second.state_dict[name], tensor), name
    assert second.tokenizer is not None and first.tokenizer is not None
    text = "<|im_start|>user\ndef f(x):\n    return 42 😀<|im_end|>"
    assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert second.tokenizer.apply_chat_template(chat) == first.tokenizer.apply_chat_template(chat)


@pytest.mark.parametrize(
    ("arch", "qtype", "tied"),
    [
        ("llama", gguf.GGMLQuantizationType.F32, True),
        ("llama", Q8_0, False),
        ("qwen2", Q8_0, False),
    ],
)
def test_tiny_gguf_round_trip(
    tmp_path: Path, arch: str, qtype: gguf.GGMLQuantizationType, tied: bool
) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    weights = tiny_gguf.write_tiny_gguf(path, arch=arch, qtype=qtype, tied=tied)
    model = load_gguf(path)
    a = model.arch
    assert (a.num_layers, a.hidden_size, a.intermediate_size) == (2, 64, 128)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (4, 2, 16, 263)
    assert a.tie_word_embeddings is tied
    assert a.attention_bias is (arch == "qwen2")
    assert a.rope_scaling is None
    assert set(model.state_dict) == set(weights)
    for name, original in weights.items():
        expected = original
        if qtype != gguf.GGMLQuantizationType.F32 and original.ndim == 2:
            # Quantization is per row, so un-permuting after it is exact.
            expected = gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype)
        assert torch.equal(model.state_dict[name], torch.from_numpy(expected)), name
    assert model.tokenizer is not None
    assert model.tokenizer.encode("hello world<|im_end|>")[-1] == 2
    assert model.name == path.stem


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    path = tmp_path / "llama3.gguf"
    weights = tiny_gguf.write_tiny_gguf(path, rope_theta=500000.0, llama3_rope=True, tied=False)
    model = load_gguf(path)
    assert model.arch.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert set(model.state_dict) == set(weights)  # rope_freqs is folded into the config


def test_dtype_conversion(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    model = load_gguf(path, "bfloat16")
    assert {t.dtype for t in model.state_dict.values()} == {torch.bfloat16}
    assert load_gguf(path, torch.float64).state_dict["model.norm.weight"].dtype == torch.float64
    assert torch_dtype("fp16") == torch.float16
    with pytest.raises(ModelLoadError, match="int8"):
        load_gguf(path, "int8")


def test_cache_written_atomically_and_reused(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    assert load_gguf(path).extra["load_source"] == "gguf"
    (entry,) = cache_dir.iterdir()  # one directory, no temporary leftovers
    assert entry.name.startswith("tiny-")
    assert {p.name for p in entry.iterdir()} == {"model.safetensors", "model.json", "tokenizer"}
    assert load_gguf(path).extra["load_source"] == "cache"


def test_changed_file_misses_the_cache(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path, seed=0)
    load_gguf(path)
    weights = tiny_gguf.write_tiny_gguf(path, seed=1)
    model = load_gguf(path)
    assert model.extra["load_source"] == "gguf"
    expected = torch.from_numpy(weights["model.norm.weight"])
    assert torch.equal(model.state_dict["model.norm.weight"], expected)


def test_damaged_cache_is_rebuilt(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    load_gguf(path)
    (entry,) = cache_dir.iterdir()
    (entry / "model.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        model = load_gguf(path)
    assert model.extra["load_source"] == "gguf"
    assert "damaged weight cache" in caplog.text
    assert load_gguf(path).extra["load_source"] == "cache"


def test_unwritable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    assert load_gguf(path).extra["load_source"] == "gguf"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"nope\.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"\x00\x01not a gguf file at all" * 10)
    with pytest.raises(CorruptModelError, match="not a GGUF file"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    full = tmp_path / "full.gguf"
    tiny_gguf.write_tiny_gguf(full)
    data = full.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptModelError, match=r"truncated|damaged"):
        load_gguf(path)


def test_truncated_header(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    tiny_gguf.write_tiny_gguf(full)
    for size in (4, 20, 300, 3000):
        path = tmp_path / f"cut{size}.gguf"
        path.write_bytes(full.read_bytes()[:size])
        with pytest.raises(CorruptModelError, match=r"damaged|truncated"):
            load_gguf(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    patched = tmp_path / "gpt2.gguf"
    data = path.read_bytes()
    # Same length, so the rest of the file stays valid: "llama" -> "gpt2x" everywhere.
    patched.write_bytes(data.replace(b"llama", b"gpt2x"))
    with pytest.raises(CorruptModelError, match="architecture 'gpt2x' is not supported"):
        load_gguf(patched)


def test_mixture_of_experts_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    experts = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 128, 64), dtype=np.float32)}
    tiny_gguf.write_tiny_gguf(path, extra_tensors=experts)
    with pytest.raises(CorruptModelError, match="ffn_gate_exps"):
        load_gguf(path)


def test_wrong_shape_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    data = path.read_bytes()
    # Claim 3 KV heads instead of 2: k_proj then has the wrong number of rows.
    key = b"llama.attention.head_count_kv"
    at = data.index(key) + len(key) + 4  # skip the value type (uint32)
    patched = tmp_path / "bad.gguf"
    patched.write_bytes(data[:at] + (3).to_bytes(4, "little") + data[at + 4 :])
    with pytest.raises(CorruptModelError, match="shape"):
        load_gguf(patched)


def test_copy_in_a_new_place_loads(tmp_path: Path) -> None:
    src = tmp_path / "a" / "tiny.gguf"
    src.parent.mkdir()
    tiny_gguf.write_tiny_gguf(src)
    dst = tmp_path / "b" / "tiny.gguf"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    assert load_gguf(src).arch == load_gguf(dst).arch


def test_missing_metadata_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    patched = tmp_path / "no-blocks.gguf"
    patched.write_bytes(path.read_bytes().replace(b"llama.block_count", b"llama.block_cxunt"))
    with pytest.raises(CorruptModelError, match=r"lacks llama\.block_count"):
        load_gguf(patched)


def test_unsupported_tokenizer_leaves_the_model_loadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(path)
    patched = tmp_path / "spm.gguf"
    # tokenizer.ggml.model "gpt2" -> "t5xx" (same length): no tokenizer, weights still load.
    data = path.read_bytes()
    key = b"tokenizer.ggml.model"
    at = data.index(key) + len(key)
    patched.write_bytes(data[:at] + data[at:].replace(b"gpt2", b"t5xx", 1))
    with caplog.at_level(logging.WARNING):
        model = load_gguf(patched)
    assert model.tokenizer is None
    assert "no usable tokenizer" in caplog.text
    assert (model.arch.bos_token_id, model.arch.eos_token_ids) == (1, (2,))
