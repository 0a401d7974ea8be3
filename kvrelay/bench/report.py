"""Reports of benchmark runs: aggregate numbers, results.json, a Markdown summary, plots, and
`compare` for several runs side by side.

Owns: `Slo`, `aggregate(run, slo)` (TTFT / ITL / TPOT / end-to-end percentiles, throughput,
goodput under the SLO, hit rates from responses and from /metrics), `write_report(run, out)`
(results.json, summary.md, PNG plots) and `compare_runs`/`write_comparison`.
Goodput counts requests whose TTFT <= the TTFT target and whose mean inter-token latency
(TPOT) <= the ITL target, per second of run. Hit rates are token-weighted: sum of cached
prompt tokens / sum of prompt tokens. Must not import the load client.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvrelay.bench.plots import plot_comparison, plot_run
from kvrelay.bench.prom import metrics_hit_rate
from kvrelay.bench.results import RequestResult, RunResult, load_run

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.md"
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Slo:
    """Service-level targets for goodput."""

    ttft_s: float = 2.0
    itl_s: float = 0.1


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50/p90/p95/p99 and max of `values` (None entries when empty)."""
    if not values:
        return {"count": 0, "mean": None, "max": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    stats: dict[str, float | int | None] = {"count": len(values), "mean": float(array.mean())}
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(array, p))
    stats["max"] = float(array.max())
    return stats


def tpot_s(result: RequestResult) -> float | None:
    """Mean time per output token after the first (None for fewer than two chunks)."""
    if result.ttft_s is None or result.e2e_s is None or len(result.itl_s) < 1:
        return None
    return (result.e2e_s - result.ttft_s) / len(result.itl_s)


def response_hit_rate(requests: Sequence[RequestResult]) -> dict[str, Any] | None:
    """Cached / prompt tokens summed over the requests that reported both."""
    rows = [
        r for r in requests if r.num_prompt_tokens is not None and r.num_cached_tokens is not None
    ]
    if not rows:
        return None
    prompt = sum(r.num_prompt_tokens or 0 for r in rows)
    cached = sum(r.num_cached_tokens or 0 for r in rows)
    return {
        "num_requests": len(rows),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
    }


def aggregate(run: RunResult, slo: Slo | None = None) -> dict[str, Any]:
    """The run's aggregate numbers (stored under `aggregate` in results.json)."""
    slo = slo or Slo()
    ok = [r for r in run.requests if r.ok]
    failed = [r for r in run.requests if not r.ok]
    duration = max(run.duration_s, 1e-9)
    tpots = [t for t in map(tpot_s, ok) if t is not None]
    good = [r for r in ok if _meets(r, slo)]
    output_tokens = sum(r.num_output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.num_prompt_tokens or 0 for r in ok)
    lateness = [r.start_s - r.scheduled_s for r in run.requests if r.scheduled_s is not None]
    return {
        "num_requests": len(run.requests),
        "num_ok": len(ok),
        "num_errors": len(failed),
        "errors": sorted({(r.error or "no response")[:200] for r in failed})[:5],
        "duration_s": run.duration_s,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
        "tpot_s": distribution(tpots),
        "e2e_s": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        "send_lateness_s": distribution(lateness),
        "throughput": {
            "requests_per_s": len(ok) / duration,
            "output_tokens_per_s": output_tokens / duration,
            "prompt_tokens_per_s": prompt_tokens / duration,
        },
        "goodput": {
            "slo": asdict(slo),
            "num_good": len(good),
            "good_fraction": len(good) / len(run.requests) if run.requests else 0.0,
            "requests_per_s": len(good) / duration,
        },
        "hit_rate": {
            "responses": response_hit_rate(ok),
            "metrics": metrics_hit_rate(run.metrics_before, run.metrics_after),
        },
        "requests_per_worker": requests_per_worker(ok),
    }


def requests_per_worker(requests: Sequence[RequestResult]) -> dict[str, int]:
    """How many requests each worker served, from the kvrelay extension object (empty for
    servers without it): how a router spread the load."""
    counts: Counter[str] = Counter()
    for r in requests:
        for worker in (r.kvrelay or {}).get("workers") or ():
            counts[str(worker)] += 1
    return dict(sorted(counts.items()))


def _meets(result: RequestResult, slo: Slo) -> bool:
    if result.ttft_s is None or result.ttft_s > slo.ttft_s:
        return False
    tpot = tpot_s(result)
    return tpot is None or tpot <= slo.itl_s


def write_report(
    run: RunResult, out_dir: Path, slo: Slo | None = None, plots: bool = True
) -> list[Path]:
    """Write results.json (with the aggregate), summary.md and the plots; return the paths."""
    run.aggregate = aggregate(run, slo)
    paths = [run.save(out_dir)]
    plot_paths = plot_run(run, out_dir) if plots else []
    summary = out_dir / SUMMARY_FILE
    summary.write_text(format_summary(run, [p.name for p in plot_paths]))
    logger.info("wrote %s", ", ".join(str(p) for p in [*paths, summary, *plot_paths]))
    return [*paths, summary, *plot_paths]


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_summary(run: RunResult, plot_names: Sequence[str] = ()) -> str:
    """A Markdown page for one run."""
    agg = run.aggregate or aggregate(run)
    cfg = run.config
    lines = [
        f"# Benchmark: {run.workload.get('name', '?')} on {run.model}",
        "",
        f"- server: {cfg.get('url')}, started {run.started_at}, load: {_load_text(cfg)}",
        f"- requests: {agg['num_ok']} ok, {agg['num_errors']} failed, in {agg['duration_s']:.1f} s",
        "",
        *_latency_table(agg),
        "",
        *_rates(agg),
    ]
    if agg["errors"]:
        lines += ["", "Errors (first distinct messages):", *[f"- `{e}`" for e in agg["errors"]]]
    if plot_names:
        lines += ["", *[f"![{Path(n).stem}]({n})" for n in plot_names]]
    return "\n".join(lines) + "\n"


def _load_text(cfg: dict[str, Any]) -> str:
    if cfg.get("arrival") == "poisson":
        return f"Poisson {cfg.get('rate')} sessions/s"
    if cfg.get("arrival") == "closed":
        return f"closed loop, {cfg.get('concurrency')} users"
    return "trace timestamps"


def _latency_table(agg: dict[str, Any]) -> list[str]:
    lines = ["| latency (ms) | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|"]
    names = (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end"))
    for key, label in names:
        d = agg[key]
        lines.append(
            f"| {label} | {_ms(d['mean'])} | {_ms(d['p50'])} | {_ms(d['p90'])} "
            f"| {_ms(d['p99'])} | {_ms(d['max'])} |"
        )
    return lines


def _rates(agg: dict[str, Any]) -> list[str]:
    tput, good, hit = agg["throughput"], agg["goodput"], agg["hit_rate"]
    slo = good["slo"]
    return [
        f"- throughput: {tput['requests_per_s']:.2f} req/s, "
        f"{tput['output_tokens_per_s']:.1f} output tok/s, "
        f"{tput['prompt_tokens_per_s']:.1f} prompt tok/s",
        f"- goodput (TTFT <= {slo['ttft_s'] * 1000:.0f} ms, TPOT <= {slo['itl_s'] * 1000:.0f} ms): "
        f"{good['requests_per_s']:.2f} req/s ({_pct(good['good_fraction'])} of requests)",
        "- KV cache hit rate from responses (cached_tokens): "
        f"{_pct((hit['responses'] or {}).get('hit_rate'))}",
        f"- KV cache hit rate from /metrics: {_metrics_line(hit['metrics'])}",
    ]


def _metrics_line(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return "(no recognised counters)"
    return (
        f"{_pct(metrics['hit_rate'])} ({metrics['hits']:.0f} / {metrics['queries']:.0f} tokens, "
        f"`{metrics['hits_metric']}`)"
    )


def compare_runs(dirs: Sequence[Path]) -> tuple[list[str], list[RunResult]]:
    """(labels, runs) for the given run directories; aggregates recomputed when missing."""
    runs = [load_run(d) for d in dirs]
    for run in runs:
        if not run.aggregate:
            run.aggregate = aggregate(run)
    return [Path(d).name or str(d) for d in dirs], runs


def format_comparison(labels: Sequence[str], runs: Sequence[RunResult]) -> str:
    """A Markdown table with one row per run."""
    lines = [
        "| run | workload | ok/failed | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 "
        "| out tok/s | goodput req/s | hit rate (responses) | hit rate (/metrics) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in zip(labels, runs, strict=True):
        agg = run.aggregate
        ttft, itl, e2e = agg["ttft_s"], agg["itl_s"], agg["e2e_s"]
        hit = agg["hit_rate"]
        lines.append(
            f"| {label} | {run.workload.get('name', '?')} | {agg['num_ok']}/{agg['num_errors']} "
            f"| {_ms(ttft['p50'])} | {_ms(ttft['p99'])} | {_ms(itl['p50'])} | {_ms(itl['p99'])} "
            f"| {_ms(e2e['p50'])} | {agg['throughput']['output_tokens_per_s']:.1f} "
            f"| {agg['goodput']['requests_per_s']:.2f} "
            f"| {_pct((hit['responses'] or {}).get('hit_rate'))} "
            f"| {_pct((hit['metrics'] or {}).get('hit_rate'))} |"
        )
    return "(latencies in ms)\n\n" + "\n".join(lines) + "\n"


def write_comparison(dirs: Sequence[Path], out_dir: Path | None = None) -> str:
    """The comparison table; with `out_dir`, also compare.md and compare.png there."""
    labels, runs = compare_runs(dirs)
    table = format_comparison(labels, runs)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.md").write_text(
            "# Benchmark comparison\n\n" + table + "\n![compare](compare.png)\n"
        )
        plot_comparison(labels, runs, out_dir / "compare.png")
    return table
