"""Loader for Hugging Face model directories: config.json + *.safetensors (sharded or not).

Owns: reading and normalising config.json (transformers 4 and 5 spellings of RoPE settings),
rejecting architectures the Llama decoder cannot run, and reading the weights into a
`LoadedModel` (tokenizer=None: the tokenizer loader attaches it). Must not import the runner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from kvrelay.engine.models.config import LoadedModel, ModelArchConfig
from kvrelay.engine.models.llama import check_state_dict, rope_inv_freq
from kvrelay.errors import CorruptModelError, ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_INDEX_FILE = "model.safetensors.index.json"


def load_hf_dir(path: Path, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """Load a Hugging Face checkpoint directory; weights are converted to `dtype`."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a directory; pass a Hugging Face model dir")
    torch_dtype = _torch_dtype(dtype)
    cfg = read_hf_config(path)
    arch = arch_from_hf_config(cfg, path)
    state_dict = _read_weights(path, torch_dtype)
    check_state_dict(arch, state_dict)
    logger.info("loaded %s: %d tensors, %s", path, len(state_dict), torch_dtype)
    return LoadedModel(
        name=path.name, arch=arch, state_dict=state_dict, tokenizer=None, extra={"hf_config": cfg}
    )


def read_hf_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{str(path)!r} has no config.json; a Hugging Face model directory needs config.json "
            "and *.safetensors weights"
        )
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"cannot parse {str(config_path)!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CorruptModelError(f"{str(config_path)!r} is not a JSON object")
    return cfg


def arch_from_hf_config(cfg: dict[str, Any], path: Path) -> ModelArchConfig:
    """Check the architecture is supported and build the ModelArchConfig."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type not in (
        SUPPORTED_MODEL_TYPES
    ):
        raise ModelLoadError(
            f"{str(path)!r}: unsupported architecture {archs or model_type!r}; kvrelay runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints (Llama 2/3, SmolLM2, Qwen2/2.5, "
            "Mistral); choose one of those"
        )
    _check_unsupported_features(cfg, path)
    try:
        arch = ModelArchConfig.from_hf_config(_normalized(cfg))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptModelError(f"{str(path)!r}: config.json lacks or mangles {exc}") from exc
    rope_inv_freq(arch)  # raises ModelLoadError for an unsupported rope_scaling, at load time
    return arch


def _normalized(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes rope_theta and the scaling into `rope_parameters`; older
    versions use top-level `rope_theta` and `rope_scaling`. Return the old spelling."""
    out = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        out["rope_scaling"] = None if rope_type == "default" else dict(rope)
    elif isinstance(out.get("rope_scaling"), dict):
        scaling = out["rope_scaling"]
        if scaling.get("rope_type", scaling.get("type")) == "default":
            out["rope_scaling"] = None
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral")
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    if uses_window and window is not None and int(window) < max_pos:
        # Sliding-window attention equals full attention while the context fits the window.
        logger.warning(
            "sliding_window %s < max_position_embeddings %s: capping context", window, max_pos
        )
        out["max_position_embeddings"] = int(window)
    return out


def _check_unsupported_features(cfg: dict[str, Any], path: Path) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(
            f"{str(path)!r}: hidden_act {act!r} is not supported; the Llama decoder uses silu"
        )
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{str(path)!r}: mlp_bias=true is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError(f"{str(path)!r}: partial_rotary_factor != 1 is not supported")


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def _weight_files(path: Path) -> list[Path]:
    index_path = path / _INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptModelError(f"cannot read {str(index_path)!r}: {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CorruptModelError(
                    f"{str(index_path)!r} lists shard {f.name!r}, which is missing; "
                    "download the complete checkpoint"
                )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{str(path)!r} has no *.safetensors weights; convert .bin/.pt checkpoints to "
            "safetensors (transformers: save_pretrained(..., safe_serialization=True))"
        )
    return files


def _read_weights(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptModelError(f"cannot read weights {str(f)!r}: {exc}") from exc
        for name, tensor in shard.items():
            if name in state_dict:
                raise CorruptModelError(f"tensor {name!r} appears in more than one shard")
            state_dict[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state_dict
