"""`kvrelay ...` subcommands: parse arguments, build configs, call into the package. No logic.

Top layer (L5): may import anything in kvrelay.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kvrelay.config import DEFAULT_MODEL, default_openmp_waits
from kvrelay.errors import KvRelayError


def _generate(args: argparse.Namespace) -> int:
    from kvrelay.engine.llm import LLM
    from kvrelay.protocol import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, num_threads=args.threads)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    printed = 0
    last = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.text[printed:])
        sys.stdout.flush()
        printed = len(out.text)
        last = out
    sys.stdout.write("\n")
    if last is not None and last.metrics is not None and args.verbose:
        m = last.metrics
        print(
            f"[{last.num_prompt_tokens} prompt tokens, {last.num_cached_tokens} cached, "
            f"{len(last.output_token_ids)} output; queue {m.queue_s:.3f}s prefill "
            f"{m.prefill_s:.3f}s decode {m.decode_s:.3f}s; finish: {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.bench_kind == "engine":
        from kvrelay.bench.engine import main as engine_main

        return engine_main(rest)
    from kvrelay.bench import cli as bench_cli

    entry = {
        "run": bench_cli.run_main,
        "analyze": bench_cli.analyze_main,
        "compare": bench_cli.compare_main,
    }[args.bench_kind]
    return entry(rest)


SERVICES = {
    "serve": ("kvrelay.launch", "serve_main"),
    "frontend": ("kvrelay.frontend.main", "frontend_main"),
    "worker": ("kvrelay.worker.main", "worker_main"),
    "doctor": ("kvrelay.observe.doctor", "doctor_main"),
}


def _service(command: str, rest: list[str]) -> int:
    import importlib

    module, func = SERVICES[command]
    entry = getattr(importlib.import_module(module), func)
    return int(entry(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="print a completion of PROMPT with the native engine")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="model name, .gguf file or HF dir")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("-v", "--verbose", action="store_true", help="print token counts, timings")

    for name, help_text in (
        ("serve", "serve a model: frontend + N supervised workers (`kvrelay serve --help`)"),
        ("frontend", "run the OpenAI-compatible frontend alone (`kvrelay frontend --help`)"),
        ("worker", "run one engine worker process (`kvrelay worker --help`)"),
        ("doctor", "check KV routing and the hit-rate ledger of a server (`--url URL`)"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: `kvrelay bench {run,analyze,compare,engine} --help`",
        add_help=False,
    )
    bench.add_argument("bench_kind", choices=["run", "analyze", "compare", "engine"])
    return parser


def main(argv: list[str] | None = None) -> int:
    default_openmp_waits()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "bench":
            return _bench(args, rest)
        if args.command in SERVICES:
            return _service(args.command, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _generate(args)
    except KvRelayError as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
