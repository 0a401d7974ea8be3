"""PNG plots of benchmark runs, drawn with matplotlib's object API on the Agg renderer.

Owns: `plot_run` (ttft_vs_cached.png: TTFT against each request's cached fraction, the "hit
rate drives latency" picture; latency_cdf.png: TTFT and ITL CDFs; timeline.png: hit rate and
throughput over time) and `plot_comparison` (several runs' CDFs overlaid). Uses
`matplotlib.figure.Figure` directly, never pyplot, so no global state or GUI backend is touched.
Must not import the load client.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from kvrelay.bench.results import RequestResult, RunResult

DPI = 110


def plot_run(run: RunResult, out_dir: Path) -> list[Path]:
    """Write the three plots of `run` into `out_dir`; return their paths."""
    ok = [r for r in run.requests if r.ok]
    title = f"{run.workload.get('name', '?')} on {run.model}"
    paths = [
        _save(_ttft_vs_cached(ok, title), out_dir / "ttft_vs_cached.png"),
        _save(_cdfs([("", ok)], title), out_dir / "latency_cdf.png"),
        _save(_timeline(ok, run.duration_s, title), out_dir / "timeline.png"),
    ]
    return paths


def plot_comparison(labels: Sequence[str], runs: Sequence[RunResult], path: Path) -> Path:
    """TTFT and ITL CDFs of several runs on shared axes."""
    series = [
        (label, [r for r in run.requests if r.ok]) for label, run in zip(labels, runs, strict=True)
    ]
    return _save(_cdfs(series, "comparison"), path)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _ttft_vs_cached(ok: Sequence[RequestResult], title: str) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    rows = [(r.cached_fraction, r.ttft_s, r.num_prompt_tokens or 0) for r in ok]
    points = [(c, t, n) for c, t, n in rows if c is not None and t is not None]
    if points:
        x = np.array([p[0] for p in points])
        y = np.array([p[1] for p in points]) * 1000
        size = np.array([p[2] for p in points], dtype=np.float64)
        scatter = ax.scatter(x * 100, y, c=size, cmap="viridis", s=14, alpha=0.75)
        fig.colorbar(scatter, ax=ax, label="prompt tokens")
        _binned_median(ax, x * 100, y)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    else:
        _empty(ax, "no requests reported cached_tokens")
    ax.set_xlabel("prompt tokens served from the KV cache (%)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_xlim(-2, 102)
    ax.set_title(f"TTFT vs cache hit per request: {title}")
    ax.grid(True, alpha=0.3)
    return fig


def _binned_median(ax: Axes, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> None:
    edges = np.linspace(0, 100, 11)
    centers, medians = [], []
    for lo, hi in itertools.pairwise(edges):
        mask = (x >= lo) & ((x < hi) | (hi == 100) & (x <= hi))
        if mask.any():
            centers.append((lo + hi) / 2)
            medians.append(float(np.median(y[mask])))
    if centers:
        ax.plot(centers, medians, color="tab:red", marker="o", label="median per 10 % bin")
        ax.legend(loc="upper right")


def _cdfs(series: Sequence[tuple[str, Sequence[RequestResult]]], title: str) -> Figure:
    fig = Figure(figsize=(10, 4))
    ax_ttft, ax_itl = fig.subplots(1, 2)
    for label, rows in series:
        ttft = [r.ttft_s * 1000 for r in rows if r.ttft_s is not None]
        itl = [gap * 1000 for r in rows for gap in r.itl_s]
        _cdf(ax_ttft, ttft, label)
        _cdf(ax_itl, itl, label)
    for ax, name in ((ax_ttft, "TTFT"), (ax_itl, "inter-token latency")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of " + ("requests" if name == "TTFT" else "tokens"))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.01)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{name} CDF")
        if any(label for label, _ in series):
            ax.legend(loc="lower right")
    fig.suptitle(title)
    return fig


def _cdf(ax: Axes, values: Sequence[float], label: str) -> None:
    if not values:
        return
    data = np.sort(np.asarray(values, dtype=np.float64))
    data = np.maximum(data, 1e-3)  # log axis: keep zero gaps visible
    ax.step(data, np.arange(1, len(data) + 1) / len(data), where="post", label=label or None)


def _timeline(ok: Sequence[RequestResult], duration_s: float, title: str) -> Figure:
    fig = Figure(figsize=(9, 5.5))
    ax_hit, ax_tput = fig.subplots(2, 1, sharex=True)
    width = max(1.0, duration_s / 30)
    edges = np.arange(0.0, max(duration_s, width) + width, width)
    centers = (edges[:-1] + edges[1:]) / 2
    prompt = np.zeros(len(centers))
    cached = np.zeros(len(centers))
    for r in ok:
        if r.num_prompt_tokens and r.num_cached_tokens is not None:
            i = min(int(r.start_s // width), len(centers) - 1)
            prompt[i] += r.num_prompt_tokens
            cached[i] += r.num_cached_tokens
    has = prompt > 0
    if has.any():
        ax_hit.plot(centers[has], 100 * cached[has] / prompt[has], marker="o", ms=3)
    else:
        _empty(ax_hit, "no requests reported cached_tokens")
    ax_hit.set_ylabel("KV cache hit rate (%)\n(requests sent in window)")
    ax_hit.set_ylim(-2, 102)
    token_times = [t for r in ok for t in r.token_times_s()]
    ends = [r.end_s for r in ok if r.end_s is not None]
    tokens, _ = np.histogram(token_times, bins=edges)
    done, _ = np.histogram(ends, bins=edges)
    (tokens_line,) = ax_tput.plot(centers, tokens / width, color="tab:green", label="tokens/s")
    ax_tput.set_ylabel("output tokens/s")
    ax_req = ax_tput.twinx()
    (done_line,) = ax_req.plot(
        centers, done / width, color="tab:purple", ls="--", label="requests done/s"
    )
    ax_req.set_ylabel("requests/s")
    ax_tput.legend(handles=[tokens_line, done_line], loc="upper right", fontsize="small")
    ax_tput.set_xlabel(f"time since run start (s), {width:.0f} s windows")
    for ax in (ax_hit, ax_tput):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Hit rate and throughput over time: {title}")
    return fig


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
