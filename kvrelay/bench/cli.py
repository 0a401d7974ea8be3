"""`kvrelay bench run|analyze|compare`: argument parsing for the HTTP workload benchmark.

Owns: `run_main(argv)`, `analyze_main(argv)`, `compare_main(argv)` (each parses its own
arguments and returns an exit code; errors a user can cause raise `KvRelayError`), and `main`
for `python -m kvrelay.bench.cli run|analyze|compare ...`. No benchmark logic lives here.
Top layer (L5): imports bench modules only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kvrelay.bench.workloads.base import Workload, parse_options
from kvrelay.errors import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_ANALYZE_REQUESTS = 1000  # for the endless synthetic workloads
FINITE_WORKLOADS = ("humaneval",)


def _workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="workload (and arrival) seed")
    parser.add_argument(
        "-W",
        "--workload-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload option, e.g. -W context_tokens=2000 -W corpus=~/src/repo; for traces: "
        "time_scale, max_requests, max_input_tokens, vocab_hi, ...",
    )
    parser.add_argument(
        "--trace-format",
        choices=["mooncake", "azure", "qwen-bailian"],
        default=None,
        help="trace format (default: detected)",
    )


def _raw_options(pairs: Sequence[str]) -> dict[str, str]:
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"workload option {pair!r} is not KEY=VALUE")
        raw[key.strip()] = value.strip()
    return raw


def resolve_workload(
    spec: str,
    seed: int,
    pairs: Sequence[str],
    trace_format: str | None = None,
    synthesize: bool = True,
) -> Workload:
    """A workload name (see `kvrelay.bench.workloads`) or the path of a trace file."""
    raw = _raw_options(pairs)
    path = Path(spec).expanduser()
    if path.is_file():
        from kvrelay.bench.traces import TraceReplayOptions, TraceWorkload, load_trace

        trace = load_trace(path, trace_format)  # type: ignore[arg-type]
        options = parse_options(TraceReplayOptions, raw)
        return TraceWorkload(trace, options, seed=seed, synthesize=synthesize)
    from kvrelay.bench.workloads import make_workload

    return make_workload(spec, seed, raw)


def _is_finite(workload: Workload) -> bool:
    return workload.name.startswith("trace:") or workload.name in FINITE_WORKLOADS


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay bench run",
        description="Drive a workload against an OpenAI-compatible server; write results.json, "
        "summary.md and plots to --out.",
    )
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--workload",
        required=True,
        help="code-sessions | fim | agent | humaneval | PATH of a trace file",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: Poisson session starts per second")
    load.add_argument("--concurrency", type=int, help="closed loop: simultaneous users")
    parser.add_argument("--duration", type=float, help="seconds during which requests start")
    parser.add_argument("--num-requests", type=int, help="requests to send")
    parser.add_argument("--out", required=True, type=Path, help="directory for the report")
    parser.add_argument("--model", help="model name to request (default: first of /v1/models)")
    parser.add_argument(
        "--think-scale",
        type=float,
        default=1.0,
        help="multiply pauses between a session's turns (0: none)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (outputs may stop before max_tokens)",
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-itl-ms", type=float, default=100.0)
    parser.add_argument("--metrics-url", help="Prometheus endpoint (default URL/metrics; '' off)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--api-key", help="sent as a Bearer token")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    _workload_args(parser)
    return parser


def run_main(argv: Sequence[str] | None = None) -> int:
    """`kvrelay bench run ...`"""
    args = build_run_parser().parse_args(argv)
    from kvrelay.bench.client import ArrivalMode, LoadConfig, run_load_sync
    from kvrelay.bench.report import Slo, format_summary, write_report

    workload = resolve_workload(args.workload, args.seed, args.workload_arg, args.trace_format)
    if args.num_requests is None and args.duration is None and not _is_finite(workload):
        raise InvalidRequestError(f"{workload.name} never ends: give --num-requests or --duration")
    arrival: ArrivalMode = "closed"
    if args.rate:
        arrival = "poisson"
    elif args.concurrency is None and workload.name.startswith("trace:"):
        arrival = "trace"
    config = LoadConfig(
        url=args.url,
        arrival=arrival,
        rate=args.rate,
        concurrency=args.concurrency or 1,
        num_requests=args.num_requests,
        duration_s=args.duration,
        model=args.model,
        seed=args.seed,
        think_scale=args.think_scale,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
        metrics_url=args.metrics_url,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    run = run_load_sync(workload, config)
    slo = Slo(ttft_s=args.slo_ttft_ms / 1000, itl_s=args.slo_itl_ms / 1000)
    write_report(run, args.out, slo, plots=not args.no_plots)
    sys.stdout.write(format_summary(run))
    sys.stdout.write(f"\nreport written to {args.out}\n")
    return 0 if run.aggregate["num_ok"] > 0 else 1


def build_analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay bench analyze",
        description="Offline prefix-cache hit rates of a workload or trace: ideal (infinite "
        "cache) and under LRU caches of given sizes.",
    )
    parser.add_argument("workload", metavar="WORKLOAD_OR_TRACE")
    parser.add_argument(
        "--block-size", type=int, help="tokens per block (default: the trace's own, else 16)"
    )
    parser.add_argument(
        "--cache-blocks",
        type=int,
        action="append",
        default=[],
        help="LRU cache size in blocks (repeat for several)",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        help=f"requests to analyse (default: all; {DEFAULT_ANALYZE_REQUESTS} "
        "for endless synthetic workloads)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="synthetic workloads: sessions interleaved turn by turn",
    )
    parser.add_argument(
        "--tokenizer",
        default="default",
        help="model whose tokenizer counts text prompts ('approx': none needed)",
    )
    parser.add_argument(
        "--synthesize",
        action="store_true",
        help="traces: hash synthesized token ids with the engine's block hash "
        "instead of using the trace's block ids",
    )
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    _workload_args(parser)
    return parser


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """`kvrelay bench analyze ...`"""
    args = build_analyze_parser().parse_args(argv)
    from kvrelay.bench.analyze import analyze, format_analysis, ordered_requests
    from kvrelay.bench.tokens import TextTokenizer, load_tokenizer

    workload = resolve_workload(
        args.workload, args.seed, args.workload_arg, args.trace_format, synthesize=args.synthesize
    )
    is_trace = workload.name.startswith("trace:")
    block_size = args.block_size or (workload.describe().get("block_size") if is_trace else None)
    block_size = block_size or 16
    num = args.num_requests
    if num is None and not _is_finite(workload):
        num = DEFAULT_ANALYZE_REQUESTS
    tokenizer: TextTokenizer | None = None if is_trace else load_tokenizer(args.tokenizer)
    info = {**workload.describe(), "tokenizer": None if is_trace else args.tokenizer}
    result = analyze(
        ordered_requests(workload, num, args.concurrency),
        block_size,
        args.cache_blocks,
        tokenizer,
        info,
    )
    sys.stdout.write(format_analysis(result))
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    return 0


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay bench compare", description="Put several benchmark runs side by side."
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="run directories (each with results.json)"
    )
    parser.add_argument("--out", type=Path, help="also write compare.md and compare.png here")
    return parser


def compare_main(argv: Sequence[str] | None = None) -> int:
    """`kvrelay bench compare DIR...`"""
    args = build_compare_parser().parse_args(argv)
    from kvrelay.bench.report import write_comparison

    sys.stdout.write(write_comparison(args.dirs, args.out))
    return 0


COMMANDS = {"run": run_main, "analyze": analyze_main, "compare": compare_main}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvrelay.bench.cli {run,analyze,compare} ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(f"usage: python -m kvrelay.bench.cli {{{','.join(COMMANDS)}}} ...\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
