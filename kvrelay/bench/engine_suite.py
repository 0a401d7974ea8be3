"""Engine benchmark workload and measurement suite, shared by every system under test.

Owns: the fixed, seeded workload (prompts cut from the Python standard library's own sources,
a shared-prefix set for cold vs warm time to first token, one batch-1 decode request) and
`run_suite`, the one measurement procedure run identically on kvrelay and on each peer.
Standard library only: it is imported inside the vLLM virtual environment too, so it must not
import torch, the kvrelay engine or anything else from kvrelay.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})
_MAX_SOURCE_CHARS = 40_000  # read this much of a file: about 10k tokens, enough for any cut


# -- workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """Sizes of the three parts of the workload (token counts)."""

    num_requests: int = 32
    prompt_len: tuple[int, int] = (64, 1024)  # inclusive, uniform
    output_len: tuple[int, int] = (16, 128)  # inclusive, uniform; EOS ignored
    num_prefix_prompts: int = 8
    prefix_prompt_len: int = 2048
    shared_prefix_len: int = 1920  # a multiple of 16 and 32: whole KV blocks in every engine
    batch1_prompt_len: int = 128
    batch1_output_len: int = 128
    warmup_prompt_len: int = 32

    @classmethod
    def quick(cls) -> WorkloadSpec:
        """A smoke-test workload: a few requests, short prompts, a 480-token shared prefix."""
        return cls(
            num_requests=8,
            prompt_len=(32, 256),
            output_len=(8, 32),
            num_prefix_prompts=4,
            prefix_prompt_len=512,
            shared_prefix_len=480,
            batch1_prompt_len=64,
            batch1_output_len=32,
        )


@dataclass
class Workload:
    """Token ids for every request; identical for every system (they all get token ids)."""

    spec: WorkloadSpec
    seed: int
    prompts: list[list[int]]
    max_tokens: list[int]
    prefix_prompts: list[list[int]]
    batch1_prompt: list[int]
    warmup_prompt: list[int]
    source_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        spec = data["spec"]
        spec = WorkloadSpec(
            **{
                **spec,
                "prompt_len": tuple(spec["prompt_len"]),
                "output_len": tuple(spec["output_len"]),
            }
        )
        return cls(**{**data, "spec": spec})

    def describe(self) -> dict[str, Any]:
        s = self.spec
        lens = [len(p) for p in self.prompts]
        return {
            "seed": self.seed,
            "source": "Python standard library .py files (sysconfig stdlib), cut at seeded "
            "offsets after tokenizing with the model's tokenizer",
            "throughput": {
                "num_requests": s.num_requests,
                "prompt_len_range": list(s.prompt_len),
                "output_len_range": list(s.output_len),
                "num_prompt_tokens": sum(lens),
                "num_output_tokens": sum(self.max_tokens),
                "submission": "all at once, greedy, EOS ignored",
            },
            "prefix_ttft": {
                "num_prompts": s.num_prefix_prompts,
                "prompt_len": s.prefix_prompt_len,
                "shared_prefix_len": s.shared_prefix_len,
                "submission": "one after another, max_tokens=1; first cold, rest warm",
            },
            "batch1": {"prompt_len": s.batch1_prompt_len, "output_len": s.batch1_output_len},
            "num_source_files": len(self.source_files),
        }


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if not _SKIP_DIRS.intersection(rel.parts) and path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


class _Cutter:
    """Cuts token windows of a requested length from seeded random source files."""

    def __init__(
        self, encode: Callable[[str], list[int]], files: Sequence[Path], rng: random.Random
    ):
        if not files:
            raise ValueError("no source files to cut prompts from")
        self.encode = encode
        self.files = list(files)
        self.rng = rng
        self.cache: dict[Path, list[int]] = {}
        self.used: list[str] = []

    def _tokens(self, path: Path) -> list[int]:
        if path not in self.cache:
            text = path.read_text(encoding="utf-8", errors="replace")[:_MAX_SOURCE_CHARS]
            self.cache[path] = self.encode(text)
        return self.cache[path]

    def cut(self, length: int) -> list[int]:
        for _ in range(10_000):
            path = self.rng.choice(self.files)
            tokens = self._tokens(path)
            if len(tokens) >= length:
                start = self.rng.randrange(len(tokens) - length + 1)
                self.used.append(path.name)
                return tokens[start : start + length]
        raise ValueError(f"no source file has {length} tokens")


def build_workload(
    encode: Callable[[str], list[int]],
    spec: WorkloadSpec,
    seed: int,
    files: Sequence[Path] | None = None,
) -> Workload:
    """The workload for `seed`: same encoder and files give the same token ids."""
    rng = random.Random(seed)
    cutter = _Cutter(encode, stdlib_sources() if files is None else files, rng)
    prompts, max_tokens = [], []
    for _ in range(spec.num_requests):
        prompts.append(cutter.cut(rng.randint(*spec.prompt_len)))
        max_tokens.append(rng.randint(*spec.output_len))
    return Workload(
        spec=spec,
        seed=seed,
        prompts=prompts,
        max_tokens=max_tokens,
        prefix_prompts=_prefix_prompts(cutter, spec),
        batch1_prompt=cutter.cut(spec.batch1_prompt_len),
        warmup_prompt=cutter.cut(spec.warmup_prompt_len),
        source_files=sorted(set(cutter.used)),
    )


def _prefix_prompts(cutter: _Cutter, spec: WorkloadSpec) -> list[list[int]]:
    """One shared prefix plus suffixes whose first tokens all differ, so that any two prompts
    share exactly `shared_prefix_len` tokens."""
    prefix = cutter.cut(spec.shared_prefix_len)
    suffix_len = spec.prefix_prompt_len - spec.shared_prefix_len
    suffixes: list[list[int]] = []
    for _ in range(100 * spec.num_prefix_prompts):
        if len(suffixes) == spec.num_prefix_prompts:
            break
        suffix = cutter.cut(suffix_len)
        if all(suffix[0] != other[0] for other in suffixes):
            suffixes.append(suffix)
    if len(suffixes) < spec.num_prefix_prompts:
        raise ValueError("cannot find suffixes with distinct first tokens")
    return [prefix + suffix for suffix in suffixes]


# -- the suite every system runs -----------------------------------------------------------


@dataclass(frozen=True)
class Gen:
    """What a system reports about one finished request."""

    num_output_tokens: int
    num_cached_tokens: int | None = None  # None: the system does not say
    decode_s: float | None = None  # engine-measured, when the system reports it
    token_ids: tuple[int, ...] = ()


class Target(Protocol):
    """A system under test: run these prompts (all submitted at once) to completion."""

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> list[Gen]: ...


def _timed(
    target: Target, prompts: Sequence[list[int]], max_tokens: Sequence[int]
) -> tuple[float, list[Gen]]:
    start = time.perf_counter()
    gens = target.generate(prompts, max_tokens)
    return time.perf_counter() - start, gens


def run_suite(target: Target, wl: Workload) -> dict[str, Any]:
    """Throughput, cold/warm TTFT and batch-1 decode, measured the same way for every system."""
    load_before = os.getloadavg()[0]  # the machine is shared: record how busy it was
    _timed(target, [wl.warmup_prompt], [4])  # first-call costs (allocation, thread pools)
    result = {**_throughput(target, wl), **_prefix_ttft(target, wl), **_batch1(target, wl)}
    result["load_avg_1m"] = [load_before, os.getloadavg()[0]]
    return result


def _throughput(target: Target, wl: Workload) -> dict[str, Any]:
    """All requests at once; output tokens counted as requested (each is checked)."""
    logger.info("throughput: %d requests", len(wl.prompts))
    total_s, gens = _timed(target, wl.prompts, wl.max_tokens)
    wrong = sum(1 for g, m in zip(gens, wl.max_tokens, strict=True) if g.num_output_tokens != m)
    return {
        "output_tok_per_s": sum(wl.max_tokens) / total_s,
        "total_s": total_s,
        "num_output_tokens": sum(wl.max_tokens),
        "num_requests_wrong_length": wrong,
    }


def _prefix_ttft(target: Target, wl: Workload) -> dict[str, Any]:
    """Shared-prefix prompts one after another with max_tokens=1: the first is cold, the rest
    can reuse its prefix."""
    logger.info("prefix TTFT: %d prompts", len(wl.prefix_prompts))
    ttfts: list[float] = []
    cached: list[int | None] = []
    for prompt in wl.prefix_prompts:
        seconds, (gen,) = _timed(target, [prompt], [1])
        ttfts.append(seconds)
        cached.append(gen.num_cached_tokens)
    warm = statistics.fmean(ttfts[1:]) if len(ttfts) > 1 else float("nan")
    return {
        "ttft_cold_s": ttfts[0],
        "ttft_warm_s": warm,
        "warm_cold_ratio": warm / ttfts[0],
        "ttft_all_s": ttfts,
        "prefix_cached_tokens": cached,
    }


def _batch1(target: Target, wl: Workload, repeats: int = 2) -> dict[str, Any]:
    """Decode tok/s of one request, prefill excluded: (n - 1) / (t(n tokens) - t(1 token)),
    both on the same warm prompt, best of `repeats`."""
    logger.info("batch-1 decode")
    n, prompt = wl.spec.batch1_output_len, wl.batch1_prompt
    _timed(target, [prompt], [1])  # make the prompt's prefix-cache state the same in both
    t1 = min(_timed(target, [prompt], [1])[0] for _ in range(repeats))
    runs = [_timed(target, [prompt], [n]) for _ in range(repeats)]
    tn, (gen,) = min(runs, key=lambda r: r[0])
    out: dict[str, Any] = {
        "batch1_decode_tok_per_s": (n - 1) / max(tn - t1, 1e-9),
        "batch1_prefill_s": t1,
        "batch1_total_s": tn,
        "batch1_first_tokens": list(gen.token_ids[:16]),
    }
    if gen.decode_s:
        out["batch1_engine_decode_tok_per_s"] = (gen.num_output_tokens - 1) / gen.decode_s
    return out
