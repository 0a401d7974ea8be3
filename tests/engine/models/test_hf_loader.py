"""Loading Hugging Face model directories: configs, sharding, and every way it can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvrelay.engine.models.hf_loader import load_hf_dir
from kvrelay.errors import CorruptModelError, ModelLoadError, ModelNotFoundError
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama3", "llama3")


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_loads_arch_and_weights(tiny_dir: Path) -> None:
    model = load_hf_dir(tiny_dir, "float64")
    arch = model.arch
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (2, 4, 2, 16)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling is not None and arch.rope_scaling["rope_type"] == "llama3"
    assert not arch.tie_word_embeddings and arch.eos_token_ids == (2,)
    assert model.tokenizer is None
    assert all(t.dtype == torch.float64 for t in model.state_dict.values())
    assert "lm_head.weight" in model.state_dict


def test_qwen2_has_attention_bias(tmp_path: Path) -> None:
    model = load_hf_dir(make_tiny_model_dir(tmp_path / "q", "qwen2"), torch.float32)
    assert model.arch.attention_bias
    assert "model.layers.0.self_attn.q_proj.bias" in model.state_dict


def test_transformers4_rope_spelling(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(cfg))
    arch = load_hf_dir(path).arch
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling is not None and arch.rope_scaling["factor"] == 8.0


def test_sharded_checkpoint_equals_single_file(tmp_path: Path) -> None:
    from tests.tiny_models import load_reference

    single = make_tiny_model_dir(tmp_path / "single", "qwen2")
    sharded = tmp_path / "sharded"
    load_reference(single, torch.float32).save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_hf_dir(single).state_dict, load_hf_dir(sharded).state_dict
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_shard_is_corrupt(tmp_path: Path) -> None:
    from tests.tiny_models import load_reference

    path = tmp_path / "sharded"
    single = make_tiny_model_dir(tmp_path / "single", "llama")
    load_reference(single, torch.float32).save_pretrained(path, max_shard_size="50KB")
    next(path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CorruptModelError, match="missing"):
        load_hf_dir(path)


def test_nonexistent_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_hf_dir(tmp_path / "nope")


def test_missing_config(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_hf_dir(path)


def test_missing_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_hf_dir(path)


def test_truncated_safetensors_is_corrupt(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptModelError, match=r"model\.safetensors"):
        load_hf_dir(path)


def test_garbled_config_is_corrupt(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match=r"config\.json"):
        load_hf_dir(path)


def test_unsupported_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        load_hf_dir(path)


def test_unsupported_rope_scaling(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    edit_config(path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling"):
        load_hf_dir(path)


def test_config_disagreeing_with_weights_is_corrupt(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    edit_config(path, num_hidden_layers=3)
    with pytest.raises(CorruptModelError, match=r"model\.layers\.2\."):
        load_hf_dir(path)


def test_mistral_sliding_window_caps_context(tiny_dir: Path, tmp_path: Path) -> None:
    path = copy_of(tiny_dir, tmp_path)
    edit_config(
        path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=1024
    )
    assert load_hf_dir(path).arch.max_position_embeddings == 1024
