"""Serving overhead: what the frontend + request plane add per request, and requests/s.

Starts `kvrelay serve` (embedded runtime, or `--nats` with a local nats-server) with a tiny
model and sends 1-token completions over HTTP:

- latency, sequential: client-measured end-to-end per request, and the *added* latency =
  end-to-end minus the engine's own queue + prefill + decode (from the `kvrelay` extension
  object), i.e. HTTP + tokenization + routing + request plane + detokenization;
- the same request run directly on an in-process EngineCore, as the floor;
- throughput: requests/s with `--concurrency` clients.

    .venv/bin/python benchmarks/serve_overhead.py                  # tiny random model
    .venv/bin/python benchmarks/serve_overhead.py --runtime nats --requests 300

Writes benchmarks/results/serve_overhead[_nats].json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.tiny_models / tiny_tokenizer / nats_server
from kvrelay.bench.serve_proc import running_serve  # noqa: E402

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values) * 1e3, 3),
        "p50": round(percentile(values, 0.5) * 1e3, 3),
        "p90": round(percentile(values, 0.9) * 1e3, 3),
        "p99": round(percentile(values, 0.99) * 1e3, 3),
    }


def make_model(tmp: Path) -> Path:
    from tests.tiny_models import make_tiny_model_dir
    from tests.tiny_tokenizer import add_tiny_tokenizer

    path = tmp / "tiny-llama"
    make_tiny_model_dir(path)
    add_tiny_tokenizer(path)
    return path


def engine_floor(model: Path, num_requests: int) -> list[float]:
    """1-token requests straight on an in-process engine (no HTTP, no runtime)."""
    from kvrelay.config import CacheConfig, EngineConfig
    from kvrelay.engine.core import EngineCore
    from kvrelay.protocol import SamplingParams

    engine = EngineCore(
        EngineConfig(model=str(model), num_threads=1, cache=CacheConfig(num_blocks=256))
    )
    assert engine.model.tokenizer is not None
    ids = engine.model.tokenizer.encode(PROMPT)
    sampling = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    out = []
    for i in range(num_requests + 5):
        start = time.perf_counter()
        engine.add_request(f"r{i}", ids, sampling)
        while engine.has_unfinished():
            engine.step()
        if i >= 5:  # warm-up
            out.append(time.perf_counter() - start)
    return out


@contextlib.contextmanager
def serve(model: Path, runtime: str, workers: int) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        args = [
            "--model",
            str(model),
            "--port",
            "0",
            "--workers",
            str(workers),
            "--threads",
            "1",
            "--num-kv-blocks",
            "256",
            "--log-level",
            "WARNING",
            "--max-inflight-per-worker",
            "1024",
        ]
        if runtime == "nats":
            from tests.nats_server import running_nats_server

            args += ["--nats", stack.enter_context(running_nats_server())]
        yield stack.enter_context(running_serve(args, cwd=ROOT))


async def sequential(url: str, num_requests: int) -> tuple[list[float], list[float]]:
    body = {
        "model": "tiny-llama",
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "ignore_eos": True,
    }
    e2e, added = [], []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i in range(num_requests + 10):
            start = time.perf_counter()
            resp = await client.post("/v1/completions", json=body)
            elapsed = time.perf_counter() - start
            resp.raise_for_status()
            ext = resp.json()["kvrelay"]
            engine_s = (ext["queue_ms"] + ext["prefill_ms"] + ext["decode_ms"]) / 1e3
            if i >= 10:
                e2e.append(elapsed)
                added.append(elapsed - engine_s)
    return e2e, added


async def throughput(url: str, num_requests: int, concurrency: int) -> dict[str, Any]:
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1, "ignore_eos": True}
    latencies: list[float] = []
    remaining = [num_requests]
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def loop() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                start = time.perf_counter()
                (await client.post("/v1/completions", json=body)).raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "requests": num_requests,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(num_requests / wall, 1),
        "latency_ms": summary_ms(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: a tiny random Llama")
    p.add_argument("--runtime", choices=("embedded", "nats"), default="embedded")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp))
        floor = engine_floor(model, args.requests)
        with serve(model, args.runtime, args.workers) as url:
            e2e, added = asyncio.run(sequential(url, args.requests))
            tput = asyncio.run(throughput(url, args.requests * 2, args.concurrency))
    result = {
        "benchmark": "serve_overhead",
        "runtime": args.runtime,
        "workers": args.workers,
        "model": str(args.model or "tiny random llama (2 layers, hidden 64)"),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or "cpu"},
        "engine_direct_ms": summary_ms(floor),
        "served_e2e_ms": summary_ms(e2e),
        "added_by_frontend_and_request_plane_ms": summary_ms(added),
        "throughput": tput,
    }
    suffix = "" if args.runtime == "embedded" else f"_{args.runtime}"
    out = args.json or ROOT / "benchmarks" / "results" / f"serve_overhead{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"engine direct, 1 token  p50 {result['engine_direct_ms']['p50']:8.2f} ms")
    print(f"served end to end       p50 {result['served_e2e_ms']['p50']:8.2f} ms")
    added_ms = result["added_by_frontend_and_request_plane_ms"]
    print(f"added (frontend+plane)  p50 {added_ms['p50']:8.2f} ms  p90 {added_ms['p90']:.2f} ms")
    print(f"throughput ({args.concurrency} clients)  {tput['requests_per_s']:8.1f} req/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
