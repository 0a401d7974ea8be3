"""Reading a server's Prometheus `/metrics` text: samples, counter deltas, the cache hit rate.

Owns: `parse_prometheus` (text exposition format -> {sample with labels: value}), `metric_sum`,
and `metrics_hit_rate`, which takes the token-weighted prefix-cache hit rate over a run from
the counters of whichever server it recognises (kvrelay, vLLM, SGLang) or from a counter pair
the user names. Ratios are always taken over counter deltas, never read from ratio gauges.
Imports only `kvrelay.observe.names` (kvrelay's metric names live there and nowhere else).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvrelay.observe import names

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?\s*$")


@dataclass(frozen=True)
class HitCounterPair:
    """Two token counters whose deltas give a hit rate: cached prompt tokens / prompt tokens."""

    server: str
    hits: str
    queries: str


# First match wins. kvrelay: the frontend's per-request token counters (ledger F4 / F0), then
# the workers' own prefix-cache lookups (for a kvrelay worker behind another frontend).
KNOWN_HIT_COUNTERS: tuple[HitCounterPair, ...] = (
    HitCounterPair("kvrelay", names.CACHED_PROMPT_TOKENS_TOTAL, names.PROMPT_TOKENS_TOTAL),
    HitCounterPair(
        "kvrelay-worker",
        names.WORKER_PREFIX_HIT_TOKENS_TOTAL,
        names.WORKER_PREFIX_QUERY_TOKENS_TOTAL,
    ),
    HitCounterPair("vllm", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    HitCounterPair("sglang", "sglang:cached_tokens_total", "sglang:prompt_tokens_total"),
)


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a text exposition: `name{labels}` (as written) -> value. Comments, malformed
    lines and non-finite values are skipped."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            continue
        name, labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isfinite(value):
            samples[name + (labels or "")] = value
    return samples


def sample_name(sample: str) -> str:
    """The metric name of a sample key (labels removed)."""
    brace = sample.find("{")
    return sample if brace < 0 else sample[:brace]


def metric_sum(samples: Mapping[str, float], name: str) -> float | None:
    """The sum of `name` over all its label sets; None when the metric is absent."""
    values = [v for k, v in samples.items() if sample_name(k) == name]
    return sum(values) if values else None


def counter_delta(
    before: Mapping[str, float] | None, after: Mapping[str, float], name: str
) -> float | None:
    """How much counter `name` grew over a run (summed over labels); a missing `before`
    scrape counts as zero (a server started with the run)."""
    end = metric_sum(after, name)
    if end is None:
        return None
    start = metric_sum(before, name) if before is not None else None
    return end - (start or 0.0)


def metrics_hit_rate(
    before: Mapping[str, float] | None,
    after: Mapping[str, float] | None,
    pairs: Sequence[HitCounterPair] = KNOWN_HIT_COUNTERS,
) -> dict[str, float | str] | None:
    """{server, hits, queries, hit_rate} over the run from the first counter pair present;
    None without an `after` scrape or a known pair."""
    if after is None:
        return None
    for pair in pairs:
        hits = counter_delta(before, after, pair.hits)
        queries = counter_delta(before, after, pair.queries)
        if hits is None or queries is None:
            continue
        return {
            "server": pair.server,
            "hits_metric": pair.hits,
            "queries_metric": pair.queries,
            "hits": hits,
            "queries": queries,
            "hit_rate": hits / queries if queries > 0 else 0.0,
        }
    return None
