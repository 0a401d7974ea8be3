"""Architecture description of a Llama-family decoder and the result of loading a checkpoint.

Every loader (Hugging Face directory, GGUF file) produces a `LoadedModel`: an
`ModelArchConfig`, a state dict in Hugging Face Llama parameter names and a tokenizer.
No torch import at module level beyond typing, so this module is cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvrelay.engine.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelArchConfig:
    """What the runner needs to build a Llama / Qwen2 style decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArchConfig:
        """Build from a Hugging Face config.json dict (LlamaForCausalLM / Qwen2ForCausalLM)."""
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        archs = cfg.get("architectures") or []
        is_qwen2 = cfg.get("model_type") == "qwen2" or any("Qwen2" in a for a in archs)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", is_qwen2)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass
class LoadedModel:
    """A checkpoint ready for the runner: weights use Hugging Face Llama names, e.g.
    `model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`
    (absent when embeddings are tied)."""

    name: str
    arch: ModelArchConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None = None
    extra: dict[str, Any] = field(default_factory=dict)
