"""Router policies on a multi-session code workload: the realized prefix-cache hit rate
against the infinite-cache ideal, and time to first token, per policy, in one run.

The workload is `code-sessions` (kvrelay/bench/workloads): many coding sessions, each a long
repository context shared by every session on that repository, then turns whose history
grows. It is driven by the HTTP load client (kvrelay/bench/client.py, closed loop, no think
time) against `kvrelay serve` with 4 workers running a tiny random Llama (2 layers, hidden
64, written to a temp dir) and a KV cache per worker that holds a few repositories but not
all of them. Every policy (`kv`, `round_robin`, `random`, `least_loaded`) gets a fresh
server (cold caches) and the same sessions. Per policy it reports, from each response's
hit-rate ledger row (the `kvrelay` extension; docs/ledger.md):

- realized hit rate: Σ F4 realized / Σ F0 prompt tokens;
- F1 ideal: Σ F1 seen / Σ F0 — what an infinite cache shared by all workers could hit;
- ratio: realized / ideal (target for kv: >= 0.90, and clearly above round_robin);
- the loss causes (cold, capacity, routing, stale index) as shares of prompt tokens;
- mean and p99 TTFT (client-measured), requests/s.

    .venv/bin/python benchmarks/router_policies.py
    .venv/bin/python benchmarks/router_policies.py --requests 400 --concurrency 16

Writes benchmarks/results/router_policies.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.tiny_models / tiny_tokenizer

from kvrelay.bench.client import LoadConfig, run_load_sync  # noqa: E402
from kvrelay.bench.results import RequestResult  # noqa: E402
from kvrelay.bench.serve_proc import running_serve  # noqa: E402
from kvrelay.bench.workloads.code_sessions import (  # noqa: E402
    CodeSessionsOptions,
    CodeSessionsWorkload,
)
from kvrelay.bench.workloads.corpus import CodeCorpus  # noqa: E402

POLICIES = ("kv", "round_robin", "random", "least_loaded")
LOSSES = ("cold", "capacity", "routing", "stale_index")


def make_model(tmp: Path) -> Path:
    from tests.tiny_models import make_tiny_model_dir
    from tests.tiny_tokenizer import add_tiny_tokenizer

    path = tmp / "tiny-llama"
    make_tiny_model_dir(path)
    add_tiny_tokenizer(path)
    return path


def workload(args: argparse.Namespace) -> CodeSessionsWorkload:
    """Small stdlib files as repository context: the tiny tokenizer spends about one token
    per character and the tiny model's context is 4096 tokens."""
    corpus = CodeCorpus(Path(sysconfig.get_paths()["stdlib"]), min_bytes=300, max_bytes=1400)
    options = CodeSessionsOptions(
        num_repos=args.repos,
        context_tokens=args.context_tokens,
        turns_min=2,
        turns_max=5,
        reply_tokens=30,
        max_tokens=args.max_tokens,
    )
    return CodeSessionsWorkload(options, seed=args.seed, corpus=corpus)


@contextlib.contextmanager
def serve(model: Path, policy: str, args: argparse.Namespace) -> Iterator[str]:
    cmd = [
        "--model",
        str(model),
        "--port",
        "0",
        "--workers",
        str(args.workers),
        "--threads",
        "1",
        "--num-kv-blocks",
        str(args.num_kv_blocks),
        "--router",
        policy,
        "--router-overlap-weight",
        str(args.overlap_weight),
        "--router-seed",
        "0",
        "--log-level",
        "WARNING",
    ]
    with running_serve(cmd, cwd=ROOT) as url:
        yield url


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(requests: list[RequestResult], wall_s: float) -> dict[str, Any]:
    rows = [
        r.kvrelay["ledger"]
        for r in requests
        if r.error is None and r.kvrelay and isinstance(r.kvrelay.get("ledger"), dict)
    ]
    prompt = sum(row["num_prompt_tokens"] for row in rows)
    seen = sum(row["num_seen_tokens"] for row in rows)
    realized = sum(row["num_realized_tokens"] for row in rows)
    predicted = sum(row["num_predicted_tokens"] - row["num_unpredicted_hit_tokens"] for row in rows)
    ttft = [r.ttft_s for r in requests if r.error is None and r.ttft_s is not None]
    return {
        "num_requests": len(requests),
        "num_errors": sum(r.error is not None for r in requests),
        "num_ledger_rows": len(rows),
        "prompt_tokens": prompt,
        "realized_hit_rate": round(realized / prompt, 4) if prompt else 0.0,
        "f1_ideal_hit_rate": round(seen / prompt, 4) if prompt else 0.0,
        "realized_over_ideal": round(realized / seen, 4) if seen else 0.0,
        "predicted_hit_rate": round(predicted / prompt, 4) if prompt else 0.0,
        "losses": {
            c: round(sum(row[f"lost_{c}_tokens"] for row in rows) / prompt, 4) if prompt else 0.0
            for c in LOSSES
        },
        "ttft_mean_ms": round(statistics.fmean(ttft) * 1e3, 2) if ttft else None,
        "ttft_p99_ms": round(percentile(ttft, 0.99) * 1e3, 2) if ttft else None,
        "requests_per_s": round(len(requests) / wall_s, 2) if wall_s else None,
    }


def run_policy(model: Path, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    config = LoadConfig(
        url="",
        arrival="closed",
        concurrency=args.concurrency,
        num_requests=args.requests,
        think_scale=0.0,
        metrics_url="",
        progress=False,
    )
    with serve(model, policy, args) as url:
        start = time.perf_counter()
        result = run_load_sync(workload(args), LoadConfig(**{**vars(config), "url": url}))
        wall_s = time.perf_counter() - start
    return summarize(result.requests, wall_s)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = f"{'policy':<13}{'realized':>9}{'F1 ideal':>9}{'ratio':>7}"
    head += f"{'cold':>7}{'capac.':>7}{'routing':>8}{'stale':>7}{'TTFT mean':>11}{'p99':>9}"
    print(head)
    for policy, r in results.items():
        lost = r["losses"]
        print(
            f"{policy:<13}{r['realized_hit_rate']:>9.1%}{r['f1_ideal_hit_rate']:>9.1%}"
            f"{r['realized_over_ideal']:>7.2f}{lost['cold']:>7.1%}{lost['capacity']:>7.1%}"
            f"{lost['routing']:>8.1%}{lost['stale_index']:>7.1%}"
            f"{r['ttft_mean_ms']:>9.1f}ms{r['ttft_p99_ms']:>7.1f}ms"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.relative_to(ROOT)) if value.is_relative_to(ROOT) else str(value)
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: a tiny random Llama")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--requests", type=int, default=240, help="per policy")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop users")
    p.add_argument("--num-kv-blocks", type=int, default=640, help="per worker (16 tokens)")
    p.add_argument("--repos", type=int, default=8)
    p.add_argument("--context-tokens", type=int, default=400, help="repository context")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--overlap-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/router_policies.json")
    args = p.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kvrelay-router-bench-") as tmp:
        model = args.model or make_model(Path(tmp))
        for policy in args.policies.split(","):
            print(f"running {policy} ...", file=sys.stderr, flush=True)
            results[policy] = run_policy(model, policy, args)
    print_table(results)
    kv, rr = results.get("kv"), results.get("round_robin")
    targets: dict[str, Any] = {}
    if kv is not None:
        targets["kv_realized_over_ideal_ge_0.90"] = kv["realized_over_ideal"] >= 0.90
        if rr is not None:
            gap = kv["realized_hit_rate"] - rr["realized_hit_rate"]
            targets["kv_minus_round_robin_hit_rate"] = round(gap, 4)
        print(f"targets: {targets}")
    report = {
        "benchmark": "router_policies",
        "settings": {k: _plain(v) for k, v in vars(args).items()},
        "model": str(args.model or "tiny random llama (2 layers, hidden 64)"),
        "workload": workload(args).describe(),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "results": results,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
