"""Frozen configuration dataclasses, one per component; environment variables are read here only.

Layer L0: imports only `errors`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import InvalidRequestError

DEFAULT_MODEL = "smollm2-135m-instruct"


def weight_cache_dir() -> Path:
    """Where dequantized GGUF weights are cached: $KVRELAY_CACHE_DIR or the user cache dir."""
    override = os.environ.get("KVRELAY_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvrelay" / "weights"


def kernel_cache_dir() -> Path:
    """Where CPU kernels compiled for this host are kept: inside the weight cache."""
    return weight_cache_dir() / "kernels"


def c_compiler() -> str | None:
    """The C compiler for kvrelay's CPU kernels: $CC, else `cc` or `gcc` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_kernels_enabled() -> bool:
    """KVRELAY_CPU_KERNELS=0 turns off kvrelay's compiled CPU kernels (torch's are used)."""
    return os.environ.get("KVRELAY_CPU_KERNELS", "1") != "0"


# Idle OpenMP threads spin about 0.1 ms, then sleep: awake between the matmuls of one step
# (tens of microseconds apart), asleep between steps. libgomp reads GOMP_SPINCOUNT (about
# 100k spins per ms), LLVM/Intel OpenMP KMP_BLOCKTIME (ms).
OPENMP_WAIT_DEFAULTS = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}


def default_openmp_waits() -> None:
    """Bound how long idle OpenMP threads spin unless the user chose (OMP_WAIT_POLICY or the
    variables above). Must run before torch is imported.

    libgomp's default 3 ms spin collapses throughput on a shared machine (2 threads on 2 busy
    cores measured 2 tok/s vs 18 with 1); sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a
    wake-up per matmul: batch-1 decode 40 vs 51 tok/s, throughput 67 vs 76 tok/s with the
    default model (benchmarks/engine_vs_peers.py). With both cores busy the bounded spin
    measured as fast as PASSIVE.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    for name, value in OPENMP_WAIT_DEFAULTS.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV memory: block size in tokens and either a block count or a byte budget."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derive from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidRequestError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: tokens computed per step and sequences per batch."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_batched_tokens and max_num_seqs must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """One model replica: which model, on what device, with which memory and batching."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's own context length
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch default
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
