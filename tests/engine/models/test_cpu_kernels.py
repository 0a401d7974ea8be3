"""The compiled few-row CPU linear: equal to F.linear, routed only for few rows, and a
missing or broken compiler falls back to the library linear instead of failing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvrelay.config import c_compiler
from kvrelay.engine.models import cpu_kernels
from kvrelay.engine.models.cpu_kernels import MAX_ROWS, load_library, native_linear

needs_compiler = pytest.mark.skipif(c_compiler() is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def fresh_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test builds into its own cache (and forgets the process-wide loaded kernel)."""
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path))
    load_library.cache_clear()
    yield tmp_path / "kernels"
    load_library.cache_clear()


def _calls(log: list[int]) -> cpu_kernels.LinearFn:
    def fallback(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        log.append(x.shape[0])
        return F.linear(x, w, b)

    return fallback


@needs_compiler
@pytest.mark.parametrize("out_features,in_features", [(13, 70), (1, 16), (64, 576), (6, 33)])
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_f_linear(
    out_features: int, in_features: int, rows: int, bias: bool
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen)
    fallback_rows: list[int] = []
    y = native_linear(_calls(fallback_rows))(x, w, b)
    assert fallback_rows == []  # the kernel computed it
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_non_contiguous_input_and_many_rows() -> None:
    w = torch.randn(40, 24)
    fallback_rows: list[int] = []
    linear = native_linear(_calls(fallback_rows))
    x = torch.randn(24, 8)[:, :2].t()  # (2, 24), not contiguous
    torch.testing.assert_close(linear(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert fallback_rows == []
    many = torch.randn(MAX_ROWS + 1, 24)
    torch.testing.assert_close(linear(many, w, None), F.linear(many, w))
    assert fallback_rows == [MAX_ROWS + 1]


@needs_compiler
def test_built_once_per_cache(fresh_kernel: Path) -> None:
    assert load_library() is not None
    built = list(fresh_kernel.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left behind
    mtime = built[0].stat().st_mtime_ns
    load_library.cache_clear()
    assert load_library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_CPU_KERNELS", "0")
    fallback = _calls([])
    assert load_library() is None
    assert native_linear(fallback) is fallback


def test_broken_compiler_falls_back(
    monkeypatch: pytest.MonkeyPatch, fresh_kernel: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    with caplog.at_level(logging.WARNING):
        assert load_library() is None
    assert "could not build kvrelay's CPU kernels" in caplog.text
    assert not fresh_kernel.exists() or list(fresh_kernel.iterdir()) == []
