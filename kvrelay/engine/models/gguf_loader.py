"""Load a llama.cpp GGUF checkpoint (architectures `llama` and `qwen2`) as a `LoadedModel`.

Owns: reading GGUF metadata into `ModelArchConfig`, dequantizing every tensor to float32 with
`gguf.quants`, renaming GGUF tensors to Hugging Face Llama names, undoing llama.cpp's rotary
row permutation of Q/K (llama only). The result is kept in `weight_cache` so that later
start-ups skip the GGUF work.
Must not import the runner, the scheduler or anything above engine.models.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrelay.engine.models.config import LoadedModel, ModelArchConfig
from kvrelay.engine.models.tokenizer import Tokenizer
from kvrelay.engine.models.weight_cache import cache_path, read_cached, write_cached
from kvrelay.errors import CorruptModelError, ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_GGUF_MAGIC = b"GGUF"
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch floating dtype for a config value ("float32", "bf16", torch.float16, ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelLoadError(
            f"dtype {dtype!r} is not supported; use float32, bfloat16, float16 or float64"
        )
    return value


def load_gguf(path: Path, dtype: torch.dtype | str = "float32") -> LoadedModel:
    """Load a GGUF file; the first load dequantizes and caches, later loads read the cache."""
    path = Path(path)
    target = torch_dtype(dtype)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    start = time.perf_counter()
    cache = cache_path(path)
    model = read_cached(cache) if cache.is_dir() else None
    if model is None:
        model = _load_uncached(path)
        write_cached(cache, model)
        source = "gguf"
    else:
        source = "cache"
    if target != torch.float32:
        model.state_dict = {k: v.to(target) for k, v in model.state_dict.items()}
    model.extra["load_source"] = source
    logger.info("loaded %s from %s in %.2fs", path.name, source, time.perf_counter() - start)
    return model


# ---- reading the GGUF file -------------------------------------------------------------------


def _load_uncached(path: Path) -> LoadedModel:
    reader = _open_reader(path)
    fields = _read_fields(reader)
    arch_name = str(fields.get("general.architecture", ""))
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise CorruptModelError(
            f"{path.name}: GGUF architecture {arch_name or '(none)'!r} is not supported; "
            f"kvrelay loads {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files and Hugging Face "
            "model directories"
        )
    tokenizer = _tokenizer_or_none(path, fields)
    tensors = {t.name: t for t in reader.tensors}
    try:
        arch = _arch_config(path, arch_name, fields, tensors, tokenizer)
    except (TypeError, ValueError, ZeroDivisionError) as exc:  # values of the wrong type
        raise CorruptModelError(f"{path.name}: GGUF metadata is malformed ({exc})") from exc
    state_dict = _state_dict(path, arch_name, arch, tensors)
    extra = {
        "source": str(path),
        "gguf_architecture": arch_name,
        "gguf_name": str(fields.get("general.name", "")),
    }
    return LoadedModel(path.stem, arch, state_dict, tokenizer, extra)


def _open_reader(path: Path) -> Any:
    import gguf

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise CorruptModelError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader parses untrusted bytes and raises many types
        raise CorruptModelError(
            f"{path} is truncated or damaged: its GGUF header cannot be parsed "
            f"({type(exc).__name__}: {exc}); download or convert the file again"
        ) from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CorruptModelError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} "
                f"but the file has {size}; download or convert it again"
            )
    return reader


def _read_fields(reader: Any) -> dict[str, Any]:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        raise CorruptModelError(f"GGUF metadata is damaged: {exc}") from exc


def _tokenizer_or_none(path: Path, fields: dict[str, Any]) -> Tokenizer | None:
    try:
        return Tokenizer.from_gguf_fields(fields)
    except CorruptModelError as exc:
        logger.warning("%s: no usable tokenizer (%s); prompts must be token ids", path.name, exc)
        return None


def _arch_config(
    path: Path,
    arch_name: str,
    fields: dict[str, Any],
    tensors: dict[str, Any],
    tokenizer: Tokenizer | None,
) -> ModelArchConfig:
    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch_name}.{key}", default)
        if value is None:
            raise CorruptModelError(f"{path.name}: GGUF metadata lacks {arch_name}.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise CorruptModelError(f"{path.name}: per-layer KV head counts are not supported")
    head_dim = int(fields.get(f"{arch_name}.attention.key_length") or hidden // num_heads)
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise CorruptModelError(f"{path.name}: partial rotary embeddings are not supported")
    rope_theta = float(get("rope.freq_base", 10000.0))
    embed = tensors.get("token_embd.weight")
    vocab = fields.get(f"{arch_name}.vocab_size") or (embed.shape[-1] if embed is not None else 0)
    bos_id, eos_ids = _special_ids(fields, tokenizer)
    return ModelArchConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(path, arch_name, fields, tensors, head_dim, rope_theta),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
    )


def _special_ids(
    fields: dict[str, Any], tokenizer: Tokenizer | None
) -> tuple[int | None, tuple[int, ...]]:
    if tokenizer is not None:
        return tokenizer.bos_token_id, tokenizer.eos_token_ids
    bos, eos = (fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    return (None if bos is None else int(bos)), (() if eos is None else (int(eos),))


def _rope_scaling(
    path: Path,
    arch_name: str,
    fields: dict[str, Any],
    tensors: dict[str, Any],
    head_dim: int,
    theta: float,
) -> dict[str, Any] | None:
    """Rope scaling from metadata (linear / yarn), or Llama 3's, recognised from the per-frequency
    factors llama.cpp stores as the `rope_freqs.weight` tensor instead of metadata."""
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(tensors["rope_freqs.weight"]).reshape(-1)
        found = _llama3_rope_scaling(factors, head_dim, theta)
        if found is None:
            raise CorruptModelError(
                f"{path.name}: rope_freqs factors do not match Llama 3 rope scaling; unsupported"
            )
        return found
    kind = fields.get(f"{arch_name}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {
        "rope_type": str(kind),
        "factor": float(fields.get(f"{arch_name}.rope.scaling.factor", 1.0)),
    }
    original = fields.get(f"{arch_name}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    factor = float(factors.max())
    low, high, original = 1.0, 4.0, 8192  # the values every Llama 3.1 / 3.2 config uses
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        return None
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _state_dict(
    path: Path, arch_name: str, arch: ModelArchConfig, tensors: dict[str, Any]
) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(arch)
    state: dict[str, torch.Tensor] = {}
    for gguf_name, info in tensors.items():
        if gguf_name == "rope_freqs.weight":
            continue  # folded into arch.rope_scaling
        hf_name = _hf_name(path, gguf_name)
        weights = _dequantize(info, path)
        if hf_name in expected and tuple(weights.shape) != expected[hf_name]:
            raise CorruptModelError(
                f"{path.name}: tensor {gguf_name} has shape {tuple(weights.shape)}, "
                f"expected {expected[hf_name]} from the file's metadata"
            )
        if arch_name == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = arch.num_heads if ".attn_q." in gguf_name else arch.num_kv_heads
            weights = _unpermute_rotary_rows(weights, heads)
        state[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))
    missing = [n for n in expected if n not in state]
    if missing:
        raise CorruptModelError(f"{path.name}: GGUF lacks tensors for {', '.join(missing[:5])}")
    return state


def _hf_name(path: Path, gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise CorruptModelError(
        f"{path.name}: tensor {gguf_name!r} is not part of a dense Llama/Qwen2 decoder "
        "(mixture-of-experts and other variants are not supported)"
    )


def _expected_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    per_layer = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (arch.intermediate_size, h),
        "mlp.up_proj.weight": (arch.intermediate_size, h),
        "mlp.down_proj.weight": (h, arch.intermediate_size),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    if arch.attention_bias:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,)}
        per_layer["self_attn.v_proj.bias"] = (kv,)
    for i in range(arch.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def _dequantize(info: Any, path: Path | None = None) -> np.ndarray:
    from gguf import quants

    try:
        return np.asarray(quants.dequantize(info.data, info.tensor_type))
    except NotImplementedError:
        where = f"{path.name}: " if path else ""
        raise CorruptModelError(
            f"{where}tensor {info.name} uses quantization {info.tensor_type.name}, which kvrelay "
            "cannot dequantize; use a Q8_0, Q4_K_M or another llama.cpp type gguf-py supports"
        ) from None
    except ValueError as exc:
        raise CorruptModelError(f"tensor {info.name} is damaged: {exc}") from exc


def _unpermute_rotary_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's HF->GGUF Q/K permutation.

    HF orders each head's rotary rows as two halves [x_0..x_{d/2-1}, y_0..y_{d/2-1}]
    (rotate_half); llama.cpp wants interleaved pairs (x_0, y_0, x_1, y_1, ...). Its converter
    views the rows as (heads, 2, d/2) and swaps the last two axes; the inverse views them as
    (heads, d/2, 2) and swaps back. K uses the KV head count.
    """
    rows = weights.shape[0]
    half = rows // num_heads // 2
    grouped = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)
