"""float32 CPU kernels for decoding, compiled for the host at first use.

Owns: building `cpu_kernels.c` with the system C compiler (-O3 -march=native -fopenmp) into
the kvrelay cache, loading it with ctypes, and the torch-facing wrappers: `native_linear`
sends inputs of at most `MAX_ROWS` rows to the few-row linear and everything else to the
fallback linear (batch-1 decoding is bound by reading the weights; this kernel streams them
at the machine's read bandwidth, where oneDNN and MKL reach about 60-75 % of it on SmolLM2's
shapes); `NativeLayerHalves` runs a decoder layer's two halves around attention (norms,
projections, RoPE, SwiGLU, residuals) in one call each, for the same few-token inputs,
instead of ~30 small torch ops whose dispatch costs more than their arithmetic;
`native_decode_attention` attends single-token queries to their paged context in place,
without gathering it (used by engine/runner/attention.py).

The built library is keyed by the source, the flags and the host CPU's feature flags, written
atomically (several workers may build at once), and shares torch's OpenMP runtime (same
soname, already loaded), so torch.set_num_threads applies to it. No compiler, a failed build
or KVRELAY_CPU_KERNELS=0: `load_library` returns None and the engine uses torch (oneDNN,
SDPA).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from kvrelay.config import c_compiler, cpu_kernels_enabled, kernel_cache_dir
from kvrelay.engine.models.config import ModelArchConfig

logger = logging.getLogger(__name__)

MAX_ROWS = 3  # measured: faster than oneDNN up to 3 rows, even at 4, slower above
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (q, k_new, v_new, k_cache, v_cache, block_tables, ctx_lens, scale) -> out; see
# native_decode_attention
DecodeAttentionFn = Callable[
    [
        torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, float,
    ],
    torch.Tensor,
]  # fmt: skip
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


def _host_fingerprint() -> str:
    """The CPU feature flags (a library built with -march=native must not move to an older
    CPU through a shared home directory)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, str(_SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when disabled or they cannot be built."""
    if not cpu_kernels_enabled():
        return None
    compiler = c_compiler()
    if compiler is None:
        logger.info("no C compiler found: CPU decoding uses torch's kernels only")
        return None
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), _host_fingerprint().encode()])
    ).hexdigest()[:16]
    lib_path = kernel_cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not lib_path.exists():
            _build(compiler, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("could not build kvrelay's CPU kernels (%s): using torch's", detail)
        return None
    lib.kvrelay_linear_f32.argtypes = [_PTR] * 4 + [_I64] * 3 + [ctypes.c_int]
    lib.kvrelay_linear_f32.restype = None
    lib.kvrelay_decode_attention_f32.argtypes = (
        [_PTR] * 8 + [_I64] * 6 + [ctypes.c_float, ctypes.c_int]
    )
    lib.kvrelay_decode_attention_f32.restype = ctypes.c_int
    lib.kvrelay_pre_attention_f32.argtypes = (
        [_PTR] * 8 + [_I64] * 5 + [ctypes.c_float, ctypes.c_int]
    )
    lib.kvrelay_pre_attention_f32.restype = None
    lib.kvrelay_post_attention_f32.argtypes = (
        [_PTR] * 9 + [_I64] * 4 + [ctypes.c_float, ctypes.c_int]
    )
    lib.kvrelay_post_attention_f32.restype = None
    return lib


def native_linear(fallback: LinearFn) -> LinearFn:
    """A linear that runs inputs of <= MAX_ROWS rows through the kernel and the rest through
    `fallback`; `fallback` itself when the kernels are unavailable. float32, CPU, contiguous
    weights (the model's fused projections are)."""
    lib = load_library()
    if lib is None:
        return fallback
    kernel = lib.kvrelay_linear_f32

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        if rows > MAX_ROWS or x.dim() != 2 or not w.is_contiguous():
            return fallback(x, w, b)
        x = x.contiguous()
        y = torch.empty(rows, w.shape[0], dtype=x.dtype)
        kernel(
            w.data_ptr(), x.data_ptr(), _ptr(b), y.data_ptr(), rows, w.shape[0], w.shape[1],
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    return linear


class NativeLayerHalves:
    """A decoder layer before and after attention, for inputs of at most MAX_ROWS tokens,
    float32 on CPU, weights contiguous (the model's fused projections are). Equal to the
    torch path up to float32 rounding (tests/engine/models/test_llama.py)."""

    def __init__(self, lib: ctypes.CDLL, arch: ModelArchConfig) -> None:
        self._pre, self._post = lib.kvrelay_pre_attention_f32, lib.kvrelay_post_attention_f32
        self._arch = arch
        self._width = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim

    def pre_attention(
        self,
        x: torch.Tensor,
        norm: torch.Tensor,
        qkv_w: torch.Tensor,
        qkv_b: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """qkv (rows, (num_heads + 2 num_kv_heads) * head_dim), RoPE applied to q and k.
        x: (rows, hidden); cos, sin: (rows, 1, head_dim), sin sign-folded (LlamaModel)."""
        a, rows = self._arch, x.shape[0]
        h = torch.empty_like(x)
        qkv = torch.empty(rows, self._width, dtype=x.dtype)
        self._pre(
            x.data_ptr(), norm.data_ptr(), qkv_w.data_ptr(), _ptr(qkv_b),
            cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), h.data_ptr(),
            qkv.data_ptr(), rows, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
            a.rms_norm_eps, torch.get_num_threads(),
        )  # fmt: skip
        return qkv

    def post_attention(
        self,
        x: torch.Tensor,
        attn: torch.Tensor,
        o_w: torch.Tensor,
        o_b: torch.Tensor | None,
        norm: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
    ) -> torch.Tensor:
        """x + o-projection, then + the SwiGLU MLP of its norm: x (rows, hidden) is updated
        in place and returned. attn: (rows, num_heads * head_dim)."""
        a, rows = self._arch, x.shape[0]
        h = torch.empty_like(x)
        scratch = torch.empty(rows, 2 * a.intermediate_size, dtype=x.dtype)
        attn = attn.contiguous()
        self._post(
            x.data_ptr(), attn.data_ptr(), o_w.data_ptr(), _ptr(o_b), norm.data_ptr(),
            gate_up.data_ptr(), down.data_ptr(), h.data_ptr(), scratch.data_ptr(), rows,
            a.hidden_size, attn.shape[1], a.intermediate_size, a.rms_norm_eps,
            torch.get_num_threads(),
        )  # fmt: skip
        return x


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _library_for(dtype: torch.dtype, device: torch.device) -> ctypes.CDLL | None:
    """The kernels when they apply: float32 on CPU, and built."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return load_library()


def native_layer_halves(
    arch: ModelArchConfig, dtype: torch.dtype, device: torch.device
) -> NativeLayerHalves | None:
    """The fused layer halves for `arch`, or None when the kernels do not apply or are
    unavailable."""
    lib = _library_for(dtype, device)
    return None if lib is None else NativeLayerHalves(lib, arch)


def native_decode_attention(dtype: torch.dtype, device: torch.device) -> DecodeAttentionFn | None:
    """Attention of single-token queries read in place from the paged cache, or None when
    the kernels do not apply (float32 on CPU only) or are unavailable.

    q: (num_seqs, num_heads, head_dim); k_new, v_new: (num_seqs, num_kv_heads, head_dim),
    stored in the cache at position ctx_len - 1 first, or None when already stored; k_cache,
    v_cache: contiguous (num_blocks, num_kv_heads, block_size, head_dim); block_tables:
    contiguous int64 (num_seqs, max_blocks); ctx_lens: contiguous int64 (num_seqs,), each
    including the new token. Returns (num_seqs, num_heads, head_dim).
    """
    lib = _library_for(dtype, device)
    if lib is None:
        return None
    kernel = lib.kvrelay_decode_attention_f32

    def attend(
        q: torch.Tensor,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        ctx_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        num_seqs, num_heads, head_dim = q.shape
        _, num_kv_heads, block_size, _ = k_cache.shape
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.is_contiguous()
        q = q.contiguous()
        out = torch.empty_like(q)
        new_k = new_v = None
        if k_new is not None and v_new is not None:
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
            new_k, new_v = k_new.data_ptr(), v_new.data_ptr()
        failed = kernel(
            q.data_ptr(), new_k, new_v, k_cache.data_ptr(), v_cache.data_ptr(),
            block_tables.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(), num_seqs, num_heads,
            num_kv_heads, head_dim, block_size, block_tables.shape[1], scale,
            torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("decode attention could not allocate its score buffer")
        return out

    return attend
