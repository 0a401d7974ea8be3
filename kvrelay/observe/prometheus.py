"""Prometheus export for the frontend: request counters, token counters, latency histograms,
the hit-rate ledger's counters and per-request histograms, the router's event counters, and
worker gauges / counters read from the latest load reports at scrape time.

Owns: `ServingMetrics` (a private CollectorRegistry per instance — no global registry),
`render()` of the text exposition format, and `CATALOG`, the type and labels of every
exported name (docs/metrics.md is generated from it and `names.py`). The only module
importing prometheus_client. Imports L0 (protocol) and observe (names, ledger).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvrelay.observe import names as n
from kvrelay.observe.ledger import HIT_RATIO_BUCKETS, LedgerRow, MetricSample
from kvrelay.protocol import LoadReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
SAVED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

WorkerLoad = tuple[str, LoadReport]  # (model, latest report)
LoadSource = Callable[[], Iterable[WorkerLoad]]
LedgerSource = Callable[[], Iterable[MetricSample]]


class RouterWorkerSample(NamedTuple):
    """What the router heard from one worker (cumulative since the worker joined)."""

    model: str
    worker: str
    num_event_batches: int
    num_dumps: int
    num_indexed_blocks: int


RouterSource = Callable[[], Iterable[RouterWorkerSample]]
PlacementSource = Callable[[], Iterable[tuple[str, str, int]]]  # (model, reason, count)
BANDWIDTH_BUCKETS = tuple(float(x) for x in (1e7, 3e7, 1e8, 3e8, 1e9, 2e9, 4e9, 8e9, 16e9))


class MetricSpec(NamedTuple):
    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]


_M = (n.LABEL_MODEL,)
_MW = (n.LABEL_MODEL, n.LABEL_WORKER)
_MWL = (n.LABEL_MODEL, n.LABEL_WORKLOAD)
_MWW = (n.LABEL_MODEL, n.LABEL_WORKER, n.LABEL_WORKLOAD)
_MR = (n.LABEL_MODEL, n.LABEL_REASON)
_LEDGER_COUNTERS = (
    n.LEDGER_REQUESTS_TOTAL,
    n.LEDGER_PROMPT_TOKENS_TOTAL,
    n.LEDGER_SEEN_TOKENS_TOTAL,
    n.LEDGER_REACHABLE_TOKENS_TOTAL,
    n.LEDGER_PREDICTED_TOKENS_TOTAL,
    n.LEDGER_REALIZED_TOKENS_TOTAL,
    n.LEDGER_UNPREDICTED_HIT_TOKENS_TOTAL,
    n.LEDGER_PREFILL_SECONDS_SAVED_TOTAL,
    n.LEDGER_LOST_COLD_TOKENS_TOTAL,
    n.LEDGER_LOST_CAPACITY_TOKENS_TOTAL,
    n.LEDGER_LOST_ROUTING_TOKENS_TOTAL,
    n.LEDGER_LOST_STALE_INDEX_TOKENS_TOTAL,
)
_WORKER_GAUGES = (  # (name, help, LoadReport attribute)
    (n.WORKER_RUNNING_REQUESTS, "Requests in the running batch.", "num_running"),
    (n.WORKER_WAITING_REQUESTS, "Requests waiting in the queue.", "num_waiting"),
    (n.WORKER_KV_BLOCKS, "KV blocks in the cache.", "num_kv_blocks"),
    (n.WORKER_KV_FREE_BLOCKS, "KV blocks free.", "num_free_blocks"),
    (n.WORKER_KV_USAGE, "Fraction of KV blocks in use.", "kv_usage"),
    (
        n.WORKER_QUEUED_PREFILL_TOKENS,
        "Prompt tokens of remote prefills running.",
        "num_queued_prefill_tokens",
    ),
)
_WORKER_COUNTERS = (
    (
        n.WORKER_PREFIX_QUERY_TOKENS_TOTAL,
        "Prompt tokens looked up in the prefix cache.",
        "num_prefix_query_tokens",
    ),
    (
        n.WORKER_PREFIX_HIT_TOKENS_TOTAL,
        "Prompt tokens found in the prefix cache.",
        "num_prefix_hit_tokens",
    ),
    (n.WORKER_PREEMPTIONS_TOTAL, "Requests preempted.", "num_preempted"),
)

CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec(n.REQUESTS_TOTAL, "counter", _M),
    MetricSpec(n.REQUESTS_FAILED_TOTAL, "counter", _M),
    MetricSpec(n.REQUESTS_REJECTED_TOTAL, "counter", _M),
    MetricSpec(n.REQUESTS_CANCELLED_TOTAL, "counter", _M),
    MetricSpec(n.REQUESTS_INFLIGHT, "gauge", _M),
    MetricSpec(n.PROMPT_TOKENS_TOTAL, "counter", _MW),
    MetricSpec(n.CACHED_PROMPT_TOKENS_TOTAL, "counter", _MW),
    MetricSpec(n.GENERATION_TOKENS_TOTAL, "counter", _MW),
    MetricSpec(n.TIME_TO_FIRST_TOKEN_SECONDS, "histogram", _MWL),
    MetricSpec(n.INTER_TOKEN_LATENCY_SECONDS, "histogram", _MWL),
    MetricSpec(n.REQUEST_LATENCY_SECONDS, "histogram", _M),
    MetricSpec(n.QUEUE_TIME_SECONDS, "histogram", _M),
    MetricSpec(n.PREFILL_TIME_SECONDS, "histogram", _M),
    MetricSpec(n.DECODE_TIME_SECONDS, "histogram", _M),
    MetricSpec(n.WORKERS, "gauge", _M),
    *(MetricSpec(name, "gauge", _MW) for name, _, _ in _WORKER_GAUGES),
    *(MetricSpec(name, "counter", _MW) for name, _, _ in _WORKER_COUNTERS),
    *(MetricSpec(name, "counter", _MWW) for name in _LEDGER_COUNTERS),
    MetricSpec(n.REQUEST_HIT_RATIO, "histogram", _MWW),
    MetricSpec(n.REQUEST_PREFILL_SECONDS_SAVED, "histogram", _MWL),
    MetricSpec(n.ROUTER_KV_EVENT_BATCHES_TOTAL, "counter", _MW),
    MetricSpec(n.ROUTER_KV_DUMPS_TOTAL, "counter", _MW),
    MetricSpec(n.ROUTER_INDEXED_BLOCKS, "gauge", _MW),
    MetricSpec(n.DISAGG_PLACEMENT_DECISIONS_TOTAL, "counter", _MR),
    MetricSpec(n.DISAGG_TRANSFERS_TOTAL, "counter", _MW),
    MetricSpec(n.DISAGG_TRANSFER_BYTES_TOTAL, "counter", _MW),
    MetricSpec(n.DISAGG_TRANSFER_SECONDS_TOTAL, "counter", _MW),
    MetricSpec(n.DISAGG_TRANSFER_BANDWIDTH_BYTES_PER_SECOND, "histogram", _M),
    MetricSpec(n.DISAGG_FALLBACKS_TOTAL, "counter", _MW),
)


class _WorkerCollector(Collector):
    """Worker metrics straight from their latest load reports (counters are cumulative on
    the worker, so they are exported as-is; a restarted worker starts again from zero)."""

    def __init__(self, source: LoadSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = list(_MW)
        loads = list(self._source())
        workers = GaugeMetricFamily(n.WORKERS, "Workers live in discovery.", labels=list(_M))
        per_model: dict[str, int] = {}
        for model, _ in loads:
            per_model[model] = per_model.get(model, 0) + 1
        for model, count in per_model.items():
            workers.add_metric([model], count)
        yield workers
        for name, doc, attr in _WORKER_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for model, report in loads:
                gauge.add_metric([model, report.worker_id], float(getattr(report, attr)))
            yield gauge
        for name, doc, attr in _WORKER_COUNTERS:
            counter = CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
            for model, report in loads:
                counter.add_metric([model, report.worker_id], float(getattr(report, attr)))
            yield counter


class _LedgerCollector(Collector):
    """The ledger's token counters, read at scrape time (`HitLedger.metric_samples`)."""

    def __init__(self, source: LedgerSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(
                name.removesuffix("_total"), "Hit-rate ledger counter.", labels=list(_MWW)
            )
            for name in _LEDGER_COUNTERS
        }
        for sample in self._source():
            family = families.get(f"kvrelay_{sample.name}")
            assert family is not None, f"ledger sample {sample.name} has no name in names.py"
            labels = sample.labels
            family.add_metric(
                [labels[n.LABEL_MODEL], labels[n.LABEL_WORKER], labels[n.LABEL_WORKLOAD]],
                sample.value,
            )
        yield from families.values()


class _RouterCollector(Collector):
    def __init__(self, source: RouterSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = list(_MW)
        batches = CounterMetricFamily(
            n.ROUTER_KV_EVENT_BATCHES_TOTAL.removesuffix("_total"),
            "KV event batches applied.",
            labels=labels,
        )
        dumps = CounterMetricFamily(
            n.ROUTER_KV_DUMPS_TOTAL.removesuffix("_total"), "KV dumps asked for.", labels=labels
        )
        indexed = GaugeMetricFamily(n.ROUTER_INDEXED_BLOCKS, "Blocks indexed.", labels=labels)
        for s in self._source():
            batches.add_metric([s.model, s.worker], s.num_event_batches)
            dumps.add_metric([s.model, s.worker], s.num_dumps)
            indexed.add_metric([s.model, s.worker], s.num_indexed_blocks)
        yield from (batches, dumps, indexed)


class _PlacementCollector(Collector):
    def __init__(self, source: PlacementSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            n.DISAGG_PLACEMENT_DECISIONS_TOTAL.removesuffix("_total"),
            "Placement decisions by reason.",
            labels=list(_MR),
        )
        for model, reason, count in self._source():
            family.add_metric([model, reason], count)
        yield family


class ServingMetrics:
    """The frontend's metrics. Call the `on_*` methods; serve `render()` at /metrics."""

    def __init__(
        self,
        load_source: LoadSource | None = None,
        ledger_source: LedgerSource | None = None,
        router_source: RouterSource | None = None,
        placement_source: PlacementSource | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        m, mw = list(_M), list(_MW)
        self.requests = Counter(n.REQUESTS_TOTAL, "Generation requests.", m, registry=r)
        self.failed = Counter(n.REQUESTS_FAILED_TOTAL, "Failed requests.", m, registry=r)
        self.rejected = Counter(n.REQUESTS_REJECTED_TOTAL, "Requests answered 503.", m, registry=r)
        self.cancelled = Counter(
            n.REQUESTS_CANCELLED_TOTAL, "Requests whose client left.", m, registry=r
        )
        self.inflight = Gauge(n.REQUESTS_INFLIGHT, "Requests in flight.", m, registry=r)
        self.prompt_tokens = Counter(n.PROMPT_TOKENS_TOTAL, "Prompt tokens.", mw, registry=r)
        self.cached_tokens = Counter(
            n.CACHED_PROMPT_TOKENS_TOTAL, "Prompt tokens from cache.", mw, registry=r
        )
        self.generation_tokens = Counter(
            n.GENERATION_TOKENS_TOTAL, "Output tokens.", mw, registry=r
        )
        self.histograms = {
            name: Histogram(name, doc, m, buckets=LATENCY_BUCKETS, registry=r)
            for name, doc in (
                (n.REQUEST_LATENCY_SECONDS, "Request latency at the frontend."),
                (n.QUEUE_TIME_SECONDS, "Engine queue time."),
                (n.PREFILL_TIME_SECONDS, "Engine prefill time."),
                (n.DECODE_TIME_SECONDS, "Engine decode time."),
            )
        }
        self._add_request_histograms()
        self._add_disagg_metrics()
        for collector in (
            _WorkerCollector(load_source) if load_source is not None else None,
            _LedgerCollector(ledger_source) if ledger_source is not None else None,
            _RouterCollector(router_source) if router_source is not None else None,
            _PlacementCollector(placement_source) if placement_source is not None else None,
        ):
            if collector is not None:
                r.register(collector)

    def _add_disagg_metrics(self) -> None:
        r, mw = self.registry, list(_MW)
        self.transfers = Counter(n.DISAGG_TRANSFERS_TOTAL, "Remote prefills.", mw, registry=r)
        self.transfer_bytes = Counter(
            n.DISAGG_TRANSFER_BYTES_TOTAL, "KV bytes imported.", mw, registry=r
        )
        self.transfer_seconds = Counter(
            n.DISAGG_TRANSFER_SECONDS_TOTAL, "Remote prefill seconds.", mw, registry=r
        )
        self.fallbacks = Counter(
            n.DISAGG_FALLBACKS_TOTAL, "Remote prefills fallen back.", mw, registry=r
        )
        self.bandwidth = Histogram(
            n.DISAGG_TRANSFER_BANDWIDTH_BYTES_PER_SECOND,
            "Per remote prefill: bytes / seconds.",
            list(_M),
            buckets=BANDWIDTH_BUCKETS,
            registry=r,
        )

    def on_transfer(
        self, model: str, prefill_worker: str, num_bytes: int, seconds: float, fallback: bool
    ) -> None:
        """One remote prefill ended (as the decode worker reported it)."""
        self.transfers.labels(model, prefill_worker).inc()
        self.transfer_bytes.labels(model, prefill_worker).inc(num_bytes)
        self.transfer_seconds.labels(model, prefill_worker).inc(seconds)
        if fallback:
            self.fallbacks.labels(model, prefill_worker).inc()
        if seconds > 0 and num_bytes > 0:
            self.bandwidth.labels(model).observe(num_bytes / seconds)

    def _add_request_histograms(self) -> None:
        r, mwl = self.registry, list(_MWL)
        self.ttft = Histogram(
            n.TIME_TO_FIRST_TOKEN_SECONDS,
            "Time to first token at the frontend.",
            mwl,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            n.INTER_TOKEN_LATENCY_SECONDS,
            "Gap between output tokens at the frontend.",
            mwl,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.hit_ratio = Histogram(
            n.REQUEST_HIT_RATIO,
            "Realized hits / prompt tokens per request.",
            list(_MWW),
            buckets=HIT_RATIO_BUCKETS,
            registry=r,
        )
        self.saved = Histogram(
            n.REQUEST_PREFILL_SECONDS_SAVED,
            "Prefill seconds saved per request (estimate).",
            mwl,
            buckets=SAVED_BUCKETS,
            registry=r,
        )

    def on_request(self, model: str) -> None:
        self.requests.labels(model).inc()
        self.inflight.labels(model).inc()

    def on_done(self, model: str, outcome: str, latency_s: float | None = None) -> None:
        """outcome: "ok" | "failed" | "rejected" | "cancelled"."""
        self.inflight.labels(model).dec()
        counter = {"failed": self.failed, "rejected": self.rejected, "cancelled": self.cancelled}
        if outcome in counter:
            counter[outcome].labels(model).inc()
        if latency_s is not None:
            self.histograms[n.REQUEST_LATENCY_SECONDS].labels(model).observe(latency_s)

    def on_tokens(self, model: str, worker: str, prompt: int, cached: int, generated: int) -> None:
        self.prompt_tokens.labels(model, worker).inc(prompt)
        self.cached_tokens.labels(model, worker).inc(cached)
        self.generation_tokens.labels(model, worker).inc(generated)

    def on_first_token(self, model: str, workload: str, ttft_s: float) -> None:
        self.ttft.labels(model, workload).observe(ttft_s)

    def on_inter_token(self, model: str, workload: str, gaps_s: Sequence[float]) -> None:
        if gaps_s:
            child = self.itl.labels(model, workload)
            for gap in gaps_s:
                child.observe(gap)

    def on_ledger_row(self, row: LedgerRow) -> None:
        self.hit_ratio.labels(row.model, row.worker_id, row.workload).observe(row.hit_ratio)
        self.saved.labels(row.model, row.workload).observe(row.prefill_s_saved)

    def on_engine_times(
        self, model: str, queue_s: float, prefill_s: float, decode_s: float
    ) -> None:
        self.histograms[n.QUEUE_TIME_SECONDS].labels(model).observe(queue_s)
        self.histograms[n.PREFILL_TIME_SECONDS].labels(model).observe(prefill_s)
        self.histograms[n.DECODE_TIME_SECONDS].labels(model).observe(decode_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
