"""Tiny random-weight Hugging Face checkpoints for tests, built with transformers.

Owns: `make_tiny_model_dir` (writes config.json + model.safetensors) and `load_reference`
(the transformers model, for logits to compare against). Used by tests across the package;
keep this API stable. Imports transformers and torch, nothing from kvrelay.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

KINDS = ("llama", "qwen2", "llama3")
INIT_STD = 0.2  # larger than HF's 0.02 so greedy outputs depend on the prompt

_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def _build(kind: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind == "llama":
        cfg = LlamaConfig(**_COMMON, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    if kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
        cfg = LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_parameters=rope)
        return LlamaForCausalLM(cfg)
    if kind == "qwen2":
        qcfg = Qwen2Config(**_COMMON, tie_word_embeddings=False)
        return Qwen2ForCausalLM(qcfg)
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")


def make_tiny_model_dir(path: Path, kind: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random model of `kind` ("llama", "qwen2", "llama3") under `path`."""
    torch.manual_seed(seed)
    model = _build(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, INIT_STD)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_reference(path: Path, dtype: torch.dtype = torch.float64) -> Any:
    """The transformers model saved at `path`, in eval mode, with weights in `dtype`.

    In float64 the RMSNorms are patched to compute in float64 too (transformers upcasts
    only to float32, which would cap agreement at ~1e-6), and attention uses SDPA (the eager
    path runs softmax in float32), so a correct float64 implementation agrees to ~1e-12.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = types.MethodType(_float64_rms_norm, module)
    return model


def _float64_rms_norm(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
