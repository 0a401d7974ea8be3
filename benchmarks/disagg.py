"""Aggregated vs disaggregated serving on a prefill-heavy code workload: TTFT, inter-token
latency and throughput side by side, plus the KV transfer path's bandwidth against a raw
loopback socket copy of the same bytes.

Workload: random-token prompts (no prefix sharing: the Azure trace has none to copy) whose
lengths follow a log-normal fitted to the Azure LLM inference 2023 *code* trace's quantiles
(context p50 1469, p90 5194; generated p50 13, p90 55 — /work/shared/traces/README.md),
clipped to the tiny model's 4096-token context. Nothing from the trace is copied; only four
quantiles shape the generator. Each configuration gets a fresh `kvrelay serve` (tiny random
Llama, 1 torch thread per worker) and the same requests, driven closed-loop at a fixed
concurrency over streaming HTTP:

- `aggregated`: `--workers 2`
- `disagg-always`: `--prefill-workers 1 --decode-workers 1 --remote-prefill always`
- `disagg-auto`: the same workers, the placement rule deciding

Then `kvrelay.bench.kv_transfer.run_transfer_benchmark` moves SmolLM2-layout KV through
`TcpTransport` and a raw loopback copy.

    .venv/bin/python benchmarks/disagg.py
    .venv/bin/python benchmarks/disagg.py --requests 60 --concurrency 6

Writes benchmarks/results/disagg.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.tiny_models / tiny_tokenizer

from kvrelay.bench.kv_transfer import TransferBenchConfig, run_transfer_benchmark  # noqa: E402
from kvrelay.bench.serve_proc import running_serve  # noqa: E402

MODEL = "tiny-llama"
# Azure 2023 code trace quantiles (README of /work/shared/traces): (p50, p90)
CONTEXT_P50, CONTEXT_P90 = 1469, 5194
OUTPUT_P50, OUTPUT_P90 = 13, 55
Z90 = 1.2816
CONFIGS: dict[str, list[str]] = {
    "aggregated": ["--workers", "2"],
    "disagg-always": [
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--remote-prefill",
        "always",
    ],
    "disagg-auto": ["--prefill-workers", "1", "--decode-workers", "1"],
}


def lognormal(rng: random.Random, p50: float, p90: float, lo: int, hi: int) -> int:
    sigma = (math.log(p90) - math.log(p50)) / Z90
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(p50), sigma)))))


def make_requests(n: int, seed: int, max_prompt: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        num_prompt = lognormal(rng, CONTEXT_P50, CONTEXT_P90, 64, max_prompt)
        num_output = lognormal(rng, OUTPUT_P50, OUTPUT_P90, 2, 64)
        out.append(([rng.randrange(5, 250) for _ in range(num_prompt)], num_output))
    return out


def make_model(tmp: Path) -> Path:
    from tests.tiny_models import make_tiny_model_dir
    from tests.tiny_tokenizer import add_tiny_tokenizer

    path = tmp / MODEL
    make_tiny_model_dir(path)
    add_tiny_tokenizer(path)
    return path


@contextlib.contextmanager
def serve(model: Path, extra: list[str], num_kv_blocks: int) -> Iterator[str]:
    cmd = [
        "--model",
        str(model),
        "--served-model-name",
        MODEL,
        "--port",
        "0",
        "--threads",
        "1",
        "--num-kv-blocks",
        str(num_kv_blocks),
        "--log-level",
        "WARNING",
        *extra,
    ]
    with running_serve(cmd, cwd=ROOT) as url:
        yield url


async def one_request(
    client: httpx.AsyncClient, base: str, prompt: list[int], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    first = last = None
    num_output = 0
    disagg = None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.monotonic() - start
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = now if first is None else first
                last = now
            if chunk.get("usage"):
                num_output = chunk["usage"]["completion_tokens"]
            ext = chunk.get("kvrelay")
            if ext is not None and ext.get("disagg") is not None:
                disagg = ext["disagg"]
    end = time.monotonic() - start
    first = end if first is None else first
    last = end if last is None else last
    itl = (last - first) / (num_output - 1) if num_output > 1 else None
    return {
        "num_prompt": len(prompt),
        "num_output": num_output,
        "ttft_s": first,
        "itl_s": itl,
        "latency_s": end,
        "disagg": disagg,
    }


async def drive(base: str, requests: list[tuple[list[int], int]], concurrency: int) -> Any:
    queue = list(enumerate(requests))
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker() -> None:
            while queue:
                _, (prompt, max_tokens) = queue.pop(0)
                results.append(await one_request(client, base, prompt, max_tokens))

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - start
        metrics = (await client.get(f"{base}/metrics")).text
    return results, wall, metrics


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def summarize(results: list[dict[str, Any]], wall: float, metrics: str) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in results]
    itl = [r["itl_s"] for r in results if r["itl_s"] is not None]
    remote = [r["disagg"] for r in results if r["disagg"] is not None]
    out_tokens = sum(r["num_output"] for r in results)
    prompt_tokens = sum(r["num_prompt"] for r in results)
    moved = metric_sum(metrics, "kvrelay_disagg_transfer_bytes_total")
    moved_s = metric_sum(metrics, "kvrelay_disagg_transfer_seconds_total")
    return {
        "num_requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "prompt_tokens_per_s": prompt_tokens / wall,
        "output_tokens_per_s": out_tokens / wall,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_mean_s": statistics.mean(itl) if itl else None,
        "itl_p99_s": pct(itl, 0.99) if itl else None,
        "num_remote_prefills": len(remote),
        "num_fallbacks": sum(1 for d in remote if d["fallback"]),
        "transfer_bytes": moved,
        "transfer_seconds": moved_s,
        "transfer_effective_gb_s": moved / moved_s / 1e9 if moved_s else None,
        "placement_decisions": {
            line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("kvrelay_disagg_placement_decisions_total{")
        },
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    cols = [
        ("req/s", "requests_per_s", 1),
        ("out tok/s", "output_tokens_per_s", 1),
        ("TTFT mean ms", "ttft_mean_s", 1000),
        ("TTFT p99 ms", "ttft_p99_s", 1000),
        ("ITL mean ms", "itl_mean_s", 1000),
        ("ITL p99 ms", "itl_p99_s", 1000),
        ("remote", "num_remote_prefills", 1),
    ]
    print(f"{'config':<16}" + "".join(f"{c[0]:>14}" for c in cols))
    for name, r in results.items():
        cells = "".join(
            f"{(r[key] or 0) * scale:>14.1f}" if r[key] is not None else f"{'-':>14}"
            for _, key, scale in cols
        )
        print(f"{name:<16}{cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-prompt", type=int, default=3500)
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transfer-mb", type=int, default=64)
    p.add_argument("--transfer-repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/disagg.json"))
    args = p.parse_args(argv)
    requests = make_requests(args.requests, args.seed, args.max_prompt)
    serving: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kvrelay-disagg-") as tmp:
        model = make_model(Path(tmp))
        for name, extra in CONFIGS.items():
            with serve(model, extra, args.num_kv_blocks) as base:
                results, wall, metrics = asyncio.run(drive(base, requests, args.concurrency))
            serving[name] = summarize(results, wall, metrics)
            print(f"{name}: done in {wall:.1f}s", flush=True)
    print_table(serving)
    transfer = run_transfer_benchmark(
        TransferBenchConfig(total_mb=args.transfer_mb, repeats=args.transfer_repeats)
    )
    raw, tcp = transfer["raw_loopback"], transfer["tcp_transfer"]
    print(
        f"KV transfer {args.transfer_mb} MiB: raw loopback {raw['median_gb_s']:.2f} GB/s, "
        f"TcpTransport {tcp['median_gb_s']:.2f} GB/s ({transfer['ratio_median']:.0%} of raw)"
    )
    report = {
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": vars(args),
        "workload": {
            "prompt_tokens": [len(r[0]) for r in requests],
            "output_tokens": [r[1] for r in requests],
            "shape": "log-normal fitted to the Azure 2023 code trace's p50/p90",
        },
        "serving": serving,
        "transfer": {k: v for k, v in transfer.items() if k != "config"},
        "transfer_config": transfer["config"],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
