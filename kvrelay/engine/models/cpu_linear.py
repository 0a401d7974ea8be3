"""A few-row float32 linear for CPU decoding, compiled for the host at first use.

Owns: building `cpu_linear.c` with the system C compiler (-O3 -march=native -fopenmp) into
the kvrelay cache, loading it with ctypes, and `native_linear`, which sends inputs of at most
`MAX_ROWS` rows to it and everything else to the fallback linear. Batch-1 decoding is bound by
reading the weights; this kernel streams them at the machine's read bandwidth, where oneDNN
and MKL reach about 60-75 % of it on SmolLM2's shapes (benchmarks/engine_vs_peers.py).

The built library is keyed by the source, the flags and the host CPU's feature flags, written
atomically (several workers may build at once), and shares torch's OpenMP runtime (same
soname, already loaded), so torch.set_num_threads applies to it. No compiler, a failed build
or KVRELAY_CPU_KERNELS=0: `load_kernel` returns None and the engine uses oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from kvrelay.config import cpu_kernels_enabled, kernel_cache_dir

logger = logging.getLogger(__name__)

MAX_ROWS = 3  # measured: faster than oneDNN up to 3 rows, even at 4, slower above
_SOURCE = Path(__file__).with_name("cpu_linear.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_SYMBOL = "kvrelay_linear_f32"

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


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
def load_kernel() -> Callable[..., None] | None:
    """The compiled kernel, built on first use; None when disabled or it cannot be built."""
    if not cpu_kernels_enabled():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: CPU projections use oneDNN")
        return None
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), _host_fingerprint().encode()])
    ).hexdigest()[:16]
    lib_path = kernel_cache_dir() / f"cpu_linear-{key}.so"
    try:
        if not lib_path.exists():
            _build(compiler, lib_path)
        fn = getattr(ctypes.CDLL(str(lib_path)), _SYMBOL)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("could not build the CPU linear kernel (%s): using oneDNN", detail)
        return None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    fn.restype = None
    return fn  # type: ignore[no-any-return]


def native_linear(fallback: LinearFn) -> LinearFn:
    """A linear that runs inputs of <= MAX_ROWS rows through the kernel and the rest through
    `fallback`; `fallback` itself when the kernel is unavailable. float32, CPU, contiguous
    weights (the model's fused projections are)."""
    kernel = load_kernel()
    if kernel is None:
        return fallback

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        if rows > MAX_ROWS or x.dim() != 2 or not w.is_contiguous():
            return fallback(x, w, b)
        x = x.contiguous()
        y = torch.empty(rows, w.shape[0], dtype=x.dtype)
        bias = None if b is None else b.data_ptr()
        kernel(w.data_ptr(), x.data_ptr(), bias, y.data_ptr(), rows, w.shape[0], w.shape[1])
        return y

    return linear
