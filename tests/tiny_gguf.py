"""Tiny GGUF files for tests, written with `gguf.GGUFWriter` the way llama.cpp's converter does.

Owns: `write_tiny_gguf` (random small llama / qwen2 weights, F32 or Q8_0, a 263-token
byte-level BPE vocabulary) and `llama_cpp_permute` (the converter's Q/K row permutation, so a
test can check that the loader undoes it). Imports gguf and numpy, nothing from kvrelay.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

HIDDEN = 64
INTERMEDIATE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN // NUM_HEADS
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("h e", "l l", "he ll", "Ġ w")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokens() -> list[str]:
    """GPT-2's 256 single-byte tokens, in its printable spelling, ordered by byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelled = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def vocab() -> list[str]:
    merged = [m.replace(" ", "") for m in MERGES]
    return [*SPECIAL_TOKENS, *byte_tokens(), *merged]


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """HF -> GGUF: each head's rows go from two rotary halves to interleaved pairs."""
    rows = weights.shape[0]
    grouped = weights.reshape(num_heads, 2, rows // num_heads // 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(theta: float, factor: float = 8.0, original: int = 8192) -> np.ndarray:
    """What llama.cpp's converter stores as `rope_freqs.weight` for Llama 3.1 rope scaling."""
    low, high = 1.0, 4.0
    out = []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * math.pi * theta ** (i / HEAD_DIM)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def hf_weights(arch: str, tied: bool, seed: int) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face names and layout (before any llama.cpp permutation)."""
    rng = np.random.default_rng(seed)
    v, h, f = len(vocab()), HIDDEN, INTERMEDIATE
    q, kv = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM

    def rand(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.2, size=shape).astype(np.float32)

    out = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h) + 1}
    if not tied:
        out["lm_head.weight"] = rand(v, h)
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(f, h),
            p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
            p + "input_layernorm.weight": rand(h) + 1,
            p + "post_attention_layernorm.weight": rand(h) + 1,
        }
        if arch == "qwen2":
            out |= {p + "self_attn.q_proj.bias": rand(q), p + "self_attn.k_proj.bias": rand(kv)}
            out[p + "self_attn.v_proj.bias"] = rand(kv)
    return out


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{_TO_GGUF['.'.join(module)]}.{kind}"


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    tied: bool = True,
    rope_theta: float = 10000.0,
    llama3_rope: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny model to `path`; return its weights in HF names and layout (float32).

    2-D weights are stored as `qtype` (norms and biases stay F32, as llama.cpp keeps them).
    """
    weights = hf_weights(arch, tied, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, arch, rope_theta)
    for hf_name, array in weights.items():
        data = array
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = NUM_HEADS if "q_proj" in hf_name else NUM_KV_HEADS
            data = llama_cpp_permute(array, heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(
                gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype
            )
        else:
            writer.add_tensor(gguf_name(hf_name), data)
    if llama3_rope:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope_theta))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def _write_metadata(writer: gguf.GGUFWriter, arch: str, rope_theta: float) -> None:
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_block_count(NUM_LAYERS)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_theta)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    tokens = vocab()
    writer.add_token_list(tokens)
    control = gguf.TokenType.CONTROL
    writer.add_token_types(
        [control if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
