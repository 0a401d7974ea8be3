"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Mistral) as plain torch functions.

Owns: weight validation and fusion (q/k/v and gate/up are concatenated at load time), RoPE
(default, "linear", "llama3"), RMSNorm, GQA projections, the SwiGLU MLP and the LM head.
The forward runs over a flat (varlen) batch of tokens; attention is delegated to the
`AttentionFn` the caller passes in, so this module never imports `engine.runner` (it sits
below it in the layer order) and never sees the KV cache layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kvrelay.engine.models.config import ModelArchConfig
from kvrelay.engine.models.cpu_kernels import (
    MAX_ROWS,
    LinearFn,
    native_layer_halves,
    native_linear,
)
from kvrelay.errors import CorruptModelError, ModelLoadError

# Buffers some older checkpoints carry; recomputed here, so ignored when present.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AttentionFn(Protocol):
    """Attention of one layer over the flat batch, through whatever KV cache the caller owns.

    q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim), with
    RoPE already applied to q and k. Returns (num_tokens, num_heads, head_dim).
    """

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer, with fused projections."""

    input_norm: torch.Tensor  # (hidden,)
    qkv: torch.Tensor  # ((num_heads + 2 * num_kv_heads) * head_dim, hidden)
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # (hidden, num_heads * head_dim)
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor  # (2 * intermediate, hidden)
    down: torch.Tensor  # (hidden, intermediate)


def rope_inv_freq(arch: ModelArchConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, computed as transformers does."""
    dim = arch.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    scaling = arch.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ModelLoadError(
        f"unsupported rope_scaling type {rope_type!r}: kvrelay implements 'default', 'linear' "
        "and 'llama3'; pick a checkpoint without dynamic/yarn/longrope scaling"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def pick_linear(dtype: torch.dtype, device: torch.device) -> LinearFn:
    """The matmul for the projections. On CPU in float32: kvrelay's compiled kernel for the
    few-row inputs of decoding (cpu_kernels.py) and oneDNN's linear for the rest, which is
    about 2x faster than F.linear's MKL path on the AMD CPUs we run on
    (benchmarks/engine_vs_peers.py); results equal up to fp32 rounding. Everywhere else (GPU,
    float64 tests) F.linear."""
    onednn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if device.type != "cpu" or dtype != torch.float32 or not onednn:
        return F.linear
    op = torch.ops.mkldnn._linear_pointwise

    def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return op(x, w, b, "none", [], "")  # type: ignore[no-any-return]

    return native_linear(onednn_linear)


class LlamaModel:
    """Weights of a Llama-family decoder and its forward over a flat batch of tokens."""

    def __init__(
        self,
        arch: ModelArchConfig,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        check_state_dict(arch, state_dict)
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)

        def get(name: str) -> torch.Tensor:
            return state_dict[name].to(device=self.device, dtype=dtype)

        self.embed = get("model.embed_tokens.weight")  # (vocab, hidden)
        self.lm_head = self.embed if arch.tie_word_embeddings else get("lm_head.weight")
        self.final_norm = get("model.norm.weight")
        self.layers = [_layer_weights(arch, i, get, state_dict) for i in range(arch.num_layers)]
        self.inv_freq = rope_inv_freq(arch).to(self.device)  # float32, as transformers does
        self._norm_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
        self._linear = pick_linear(dtype, self.device)
        # compiled layer halves for decoding on CPU
        self._halves = native_layer_halves(arch, dtype, self.device)

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for `positions`, each (num_tokens, 1, head_dim).

        Angles are computed in float32 like transformers (bitwise equal tables); sin carries
        the minus sign of rotate_half so RoPE is x * cos + roll(x) * sin.
        """
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        cos_full = torch.cat((cos, cos), dim=-1).to(self.dtype)
        sin_full = torch.cat((-sin, sin), dim=-1).to(self.dtype)
        return cos_full[:, None, :], sin_full[:, None, :]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn
    ) -> torch.Tensor:
        """Final-normed hidden states (num_tokens, hidden) of a flat batch.

        input_ids, positions: (num_tokens,) int64.
        """
        cos, sin = self.rope_cos_sin(positions)
        x = F.embedding(input_ids, self.embed)  # (num_tokens, hidden)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos, sin, attention)
        return self._rms_norm(x, self.final_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_rows, hidden) -> (num_rows, vocab) logits."""
        return self._linear(hidden, self.lm_head, None)

    def _layer(
        self,
        idx: int,
        layer: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        arch = self.arch
        num_tokens, head_dim = x.shape[0], arch.head_dim
        q_dim, kv_dim = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
        halves = self._halves if num_tokens <= MAX_ROWS else None
        if halves is not None:  # decoding on CPU: one compiled call before, one after
            qkv = halves.pre_attention(x, layer.input_norm, layer.qkv, layer.qkv_bias, cos, sin)
            q = qkv[:, :q_dim].view(num_tokens, arch.num_heads, head_dim)
            k = qkv[:, q_dim : q_dim + kv_dim].view(num_tokens, arch.num_kv_heads, head_dim)
        else:
            h = self._rms_norm(x, layer.input_norm)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias)  # (num_tokens, q_dim + 2 * kv_dim)
            # (num_tokens, num_heads + num_kv_heads, head_dim)
            qk = qkv[:, : q_dim + kv_dim].view(num_tokens, -1, head_dim)
            qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, dims=-1), sin)
            q, k = qk[:, : arch.num_heads], qk[:, arch.num_heads :]
        v = qkv[:, q_dim + kv_dim :].view(num_tokens, arch.num_kv_heads, head_dim)
        attn = attention(idx, q, k, v).reshape(num_tokens, q_dim)
        if halves is not None:
            return halves.post_attention(
                x, attn, layer.o_proj, layer.o_bias, layer.post_norm, layer.gate_up, layer.down
            )
        x = x + self._linear(attn, layer.o_proj, layer.o_bias)
        h = self._rms_norm(x, layer.post_norm)
        gate_up = self._linear(h, layer.gate_up, None)  # (num_tokens, 2 * intermediate)
        gate, up = gate_up.chunk(2, dim=-1)
        return x + self._linear(F.silu(gate) * up, layer.down, None)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xn = x.to(self._norm_dtype)
        variance = xn.pow(2).mean(-1, keepdim=True)
        return weight * (xn * torch.rsqrt(variance + self.arch.rms_norm_eps)).to(x.dtype)


def _layer_weights(
    arch: ModelArchConfig,
    i: int,
    get: Callable[[str], torch.Tensor],
    state_dict: dict[str, torch.Tensor],
) -> LayerWeights:
    p = f"model.layers.{i}."
    attn, mlp = p + "self_attn.", p + "mlp."
    qkv_bias = None
    if arch.attention_bias:
        qkv_bias = torch.cat([get(f"{attn}{n}_proj.bias") for n in "qkv"])
    o_bias_name = f"{attn}o_proj.bias"
    return LayerWeights(
        input_norm=get(p + "input_layernorm.weight"),
        qkv=torch.cat([get(f"{attn}{n}_proj.weight") for n in "qkv"]),
        qkv_bias=qkv_bias,
        o_proj=get(attn + "o_proj.weight"),
        o_bias=get(o_bias_name) if o_bias_name in state_dict else None,
        post_norm=get(p + "post_attention_layernorm.weight"),
        gate_up=torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]),
        down=get(mlp + "down_proj.weight"),
    )


def expected_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    hidden, head_dim, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q_dim, kv_dim = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        if arch.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
    return shapes


def _optional_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Tensors that may be present: a redundant lm_head when tied, o_proj bias (Llama with
    attention_bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    if arch.attention_bias:
        for i in range(arch.num_layers):
            shapes[f"model.layers.{i}.self_attn.o_proj.bias"] = (arch.hidden_size,)
    return shapes


def check_state_dict(arch: ModelArchConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise CorruptModelError naming the first missing, unexpected or misshaped tensor."""
    expected = expected_shapes(arch)
    allowed = {**expected, **_optional_shapes(arch)}
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise CorruptModelError(
            f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in total); "
            "is the config (layers, tie_word_embeddings, attention_bias) right for these weights?"
        )
    for name, tensor in state_dict.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in allowed:
            raise CorruptModelError(
                f"checkpoint has unexpected tensor {name!r}; this is not a plain Llama-family "
                "decoder as described by its config"
            )
        if tuple(tensor.shape) != allowed[name]:
            raise CorruptModelError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {allowed[name]} "
                "from the model config"
            )
        if not tensor.is_floating_point():
            raise CorruptModelError(f"tensor {name!r} has non-float dtype {tensor.dtype}")
