"""LlamaModel against transformers, with a plain (unpaged) causal attention; weight checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvrelay.engine.models.config import ModelArchConfig
from kvrelay.engine.models.cpu_kernels import MAX_ROWS
from kvrelay.engine.models.hf_loader import load_hf_dir
from kvrelay.engine.models.llama import LlamaModel, rope_inv_freq
from kvrelay.errors import CorruptModelError, ModelLoadError
from tests.tiny_models import KINDS, load_reference, make_tiny_model_dir

TOL = 1e-9


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model_dir(root / kind, kind) for kind in KINDS}


def dense_attention(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """One sequence, full causal attention, no cache: (T, H, D) -> (T, H, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return out.transpose(0, 1)


def our_logits(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor(tokens)
    hidden = model.forward(ids, torch.arange(len(tokens)), dense_attention)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(model_dirs: dict[str, Path], kind: str) -> None:
    loaded = load_hf_dir(model_dirs[kind], torch.float64)
    model = LlamaModel(loaded.arch, loaded.state_dict, torch.float64)
    ref = load_reference(model_dirs[kind])
    # long enough that llama3's scaled low frequencies matter (original context 256)
    tokens = [
        int(t) for t in torch.randint(3, 512, (700,), generator=torch.Generator().manual_seed(1))
    ]
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(our_logits(model, tokens), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_close_to_transformers(model_dirs: dict[str, Path], kind: str) -> None:
    loaded = load_hf_dir(model_dirs[kind], torch.float32)
    model = LlamaModel(loaded.arch, loaded.state_dict, torch.float32)
    ref = load_reference(model_dirs[kind], torch.float32)
    tokens = list(range(3, 60))
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(our_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_layer_halves_close_to_transformers(
    model_dirs: dict[str, Path], kind: str, num_tokens: int
) -> None:
    """Inputs of at most MAX_ROWS tokens take the compiled layer halves in float32 on CPU
    (norms, projections with biases, RoPE, SwiGLU, residuals); same logits as transformers."""
    loaded = load_hf_dir(model_dirs[kind], torch.float32)
    model = LlamaModel(loaded.arch, loaded.state_dict, torch.float32)
    if model._halves is None:
        pytest.skip("kvrelay's CPU kernels could not be built here (no C compiler)")
    ref = load_reference(model_dirs[kind], torch.float32)
    tokens = [7, 300, 41][:num_tokens]
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(our_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def _hf_rope_config(arch_kwargs: dict[str, Any], rope: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 500000.0, **rope},
        **arch_kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ],
)
def test_rope_inv_freq_matches_transformers(rope: dict[str, Any]) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _hf_rope_config({}, rope)
    if rope["rope_type"] == "default":
        head_dim = 16
        expected = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    arch = tiny_arch(rope_theta=500000.0, rope_scaling=rope)
    assert torch.equal(rope_inv_freq(arch), expected)


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
def test_unsupported_rope_scaling_raises(rope_type: str) -> None:
    arch = tiny_arch(rope_scaling={"rope_type": rope_type, "factor": 2.0})
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling"):
        rope_inv_freq(arch)


def tiny_arch(**kwargs: Any) -> ModelArchConfig:
    base: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
    }
    return ModelArchConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def llama_weights(model_dirs: dict[str, Path]) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    loaded = load_hf_dir(model_dirs["llama"], torch.float32)
    return loaded.arch, loaded.state_dict


def test_missing_weight_is_named(
    llama_weights: tuple[ModelArchConfig, dict[str, torch.Tensor]],
) -> None:
    arch, sd = llama_weights
    bad = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CorruptModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        LlamaModel(arch, bad)


def test_unexpected_weight_is_named(
    llama_weights: tuple[ModelArchConfig, dict[str, torch.Tensor]],
) -> None:
    arch, sd = llama_weights
    bad = {**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(CorruptModelError, match=r"self_attn\.q_norm\.weight"):
        LlamaModel(arch, bad)


def test_misshaped_weight_is_named(
    llama_weights: tuple[ModelArchConfig, dict[str, torch.Tensor]],
) -> None:
    arch, sd = llama_weights
    bad = {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(CorruptModelError, match=r"k_proj\.weight.*shape"):
        LlamaModel(arch, bad)


def test_untied_config_without_lm_head_is_corrupt(
    llama_weights: tuple[ModelArchConfig, dict[str, torch.Tensor]],
) -> None:
    arch, sd = llama_weights
    untied = ModelArchConfig(**{**arch.__dict__, "tie_word_embeddings": False})
    with pytest.raises(CorruptModelError, match=r"lm_head\.weight"):
        LlamaModel(untied, sd)


def test_tied_model_shares_embedding(
    llama_weights: tuple[ModelArchConfig, dict[str, torch.Tensor]],
) -> None:
    arch, sd = llama_weights
    model = LlamaModel(arch, sd)
    assert model.lm_head is model.embed
