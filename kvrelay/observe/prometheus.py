"""Prometheus export for the frontend: request counters, token counters, latency histograms,
and worker gauges / counters read from the latest load reports at scrape time.

Owns: `ServingMetrics` (a private CollectorRegistry per instance — no global registry) and
`render()` of the text exposition format. The only module importing prometheus_client.
Imports L0 (protocol) and `observe.names`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvrelay.observe import names as n
from kvrelay.protocol import LoadReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

WorkerLoad = tuple[str, LoadReport]  # (model, latest report)
LoadSource = Callable[[], Iterable[WorkerLoad]]


class _WorkerCollector(Collector):
    """Worker metrics straight from their latest load reports (counters are cumulative on
    the worker, so they are exported as-is; a restarted worker starts again from zero)."""

    def __init__(self, source: LoadSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = [n.LABEL_MODEL, n.LABEL_WORKER]
        gauges = {
            n.WORKER_RUNNING_REQUESTS: ("Requests in the running batch.", "num_running"),
            n.WORKER_WAITING_REQUESTS: ("Requests waiting in the queue.", "num_waiting"),
            n.WORKER_KV_BLOCKS: ("KV blocks in the cache.", "num_kv_blocks"),
            n.WORKER_KV_FREE_BLOCKS: ("KV blocks free.", "num_free_blocks"),
            n.WORKER_KV_USAGE: ("Fraction of KV blocks in use.", "kv_usage"),
        }
        counters = {
            n.WORKER_PREFIX_QUERY_TOKENS_TOTAL: (
                "Prompt tokens looked up in the prefix cache.",
                "num_prefix_query_tokens",
            ),
            n.WORKER_PREFIX_HIT_TOKENS_TOTAL: (
                "Prompt tokens found in the prefix cache.",
                "num_prefix_hit_tokens",
            ),
            n.WORKER_PREEMPTIONS_TOTAL: ("Requests preempted.", "num_preempted"),
        }
        loads = list(self._source())
        workers = GaugeMetricFamily(n.WORKERS, "Workers live in discovery.", labels=[n.LABEL_MODEL])
        per_model: dict[str, int] = {}
        for model, _ in loads:
            per_model[model] = per_model.get(model, 0) + 1
        for model, count in per_model.items():
            workers.add_metric([model], count)
        yield workers
        for name, (doc, attr) in gauges.items():
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for model, report in loads:
                gauge.add_metric([model, report.worker_id], float(getattr(report, attr)))
            yield gauge
        for name, (doc, attr) in counters.items():
            counter = CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
            for model, report in loads:
                counter.add_metric([model, report.worker_id], float(getattr(report, attr)))
            yield counter


class ServingMetrics:
    """The frontend's metrics. Call the `on_*` methods; serve `render()` at /metrics."""

    def __init__(self, load_source: LoadSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        model = [n.LABEL_MODEL]
        model_worker = [n.LABEL_MODEL, n.LABEL_WORKER]
        self.requests = Counter(n.REQUESTS_TOTAL, "Generation requests.", model, registry=r)
        self.failed = Counter(n.REQUESTS_FAILED_TOTAL, "Failed requests.", model, registry=r)
        self.rejected = Counter(
            n.REQUESTS_REJECTED_TOTAL, "Requests answered 503.", model, registry=r
        )
        self.cancelled = Counter(
            n.REQUESTS_CANCELLED_TOTAL, "Requests whose client left.", model, registry=r
        )
        self.inflight = Gauge(n.REQUESTS_INFLIGHT, "Requests in flight.", model, registry=r)
        self.prompt_tokens = Counter(
            n.PROMPT_TOKENS_TOTAL, "Prompt tokens.", model_worker, registry=r
        )
        self.cached_tokens = Counter(
            n.CACHED_PROMPT_TOKENS_TOTAL, "Prompt tokens from cache.", model_worker, registry=r
        )
        self.generation_tokens = Counter(
            n.GENERATION_TOKENS_TOTAL, "Output tokens.", model_worker, registry=r
        )
        self.histograms = {
            name: Histogram(name, doc, model, buckets=LATENCY_BUCKETS, registry=r)
            for name, doc in (
                (n.TIME_TO_FIRST_TOKEN_SECONDS, "Time to first token at the frontend."),
                (n.REQUEST_LATENCY_SECONDS, "Request latency at the frontend."),
                (n.QUEUE_TIME_SECONDS, "Engine queue time."),
                (n.PREFILL_TIME_SECONDS, "Engine prefill time."),
                (n.DECODE_TIME_SECONDS, "Engine decode time."),
            )
        }
        if load_source is not None:
            r.register(_WorkerCollector(load_source))

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

    def on_first_token(self, model: str, ttft_s: float) -> None:
        self.histograms[n.TIME_TO_FIRST_TOKEN_SECONDS].labels(model).observe(ttft_s)

    def on_engine_times(
        self, model: str, queue_s: float, prefill_s: float, decode_s: float
    ) -> None:
        self.histograms[n.QUEUE_TIME_SECONDS].labels(model).observe(queue_s)
        self.histograms[n.PREFILL_TIME_SECONDS].labels(model).observe(prefill_s)
        self.histograms[n.DECODE_TIME_SECONDS].labels(model).observe(decode_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
