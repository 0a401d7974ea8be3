"""docs/metrics.md, observe/names.py, the exporter's catalog and what /metrics really renders
agree: every name has one comment, a type and labels from the fixed set, and the page's
generated tables are up to date."""

from __future__ import annotations

import random
import re
from pathlib import Path

from kvrelay.observe import names
from kvrelay.observe.ledger import HitLedger
from kvrelay.observe.metrics_doc import main, metric_docs
from kvrelay.observe.prometheus import CATALOG, RouterWorkerSample, ServingMetrics
from kvrelay.protocol import LoadReport
from kvrelay.router.policy import PolicyConfig
from kvrelay.router.state import RouterState

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ALLOWED_LABELS = {
    names.LABEL_MODEL,
    names.LABEL_WORKER,
    names.LABEL_ROLE,
    names.LABEL_WORKLOAD,
    names.LABEL_REASON,
}


def test_the_page_is_generated_from_names_py() -> None:
    assert main(["--check", str(DOC)]) == 0, "run: python -m kvrelay.observe.metrics_doc"


def test_every_name_has_a_comment_a_type_and_fixed_labels() -> None:
    documented = {d.name for d in metric_docs()}
    constants = {v for k, v in vars(names).items() if k.isupper() and v.startswith("kvrelay_")}
    assert documented == constants
    assert {spec.name for spec in CATALOG} == documented
    assert len(CATALOG) == len(documented)
    for spec in CATALOG:
        assert set(spec.labels) <= ALLOWED_LABELS, spec
        assert spec.kind in ("counter", "gauge", "histogram")
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec


def populated_metrics() -> ServingMetrics:
    ledger = HitLedger(4)
    router = RouterState(4, PolicyConfig(), rng=random.Random(0), clock=lambda: 0.0)
    router.add_worker("w0")
    decision = router.route("r", [1, 2], 9)
    row = ledger.record(ledger.predict("r", [1, 2], 9, decision, model="m"), {"device": 4})
    report = LoadReport(
        worker_id="w0",
        instance_id="i",
        ts=0.0,
        num_running=0,
        num_waiting=0,
        num_kv_blocks=8,
        num_free_blocks=8,
        kv_usage=0.0,
    )
    metrics = ServingMetrics(
        lambda: [("m", report)],
        ledger.metric_samples,
        lambda: [RouterWorkerSample("m", "w0", 3, 1, 2)],
        lambda: [("m", "forced", 1)],
    )
    metrics.on_request("m")
    metrics.on_done("m", "failed", 0.5)
    metrics.on_done("m", "rejected")
    metrics.on_done("m", "cancelled")
    metrics.on_tokens("m", "w0", 9, 4, 2)
    metrics.on_first_token("m", "default", 0.1)
    metrics.on_inter_token("m", "default", [0.01, 0.02])
    metrics.on_engine_times("m", 0.0, 0.1, 0.2)
    metrics.on_ledger_row(row)
    metrics.on_transfer("m", "w0", 1 << 20, 0.01, True)
    return metrics


def test_metrics_renders_exactly_the_catalog() -> None:
    text = populated_metrics().render().decode()
    rendered = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    catalog = {spec.name: spec.kind for spec in CATALOG}
    for name in [n for n in rendered if n.endswith("_created")]:  # prometheus_client's own
        base = name.removesuffix("_created")
        assert base in catalog or f"{base}_total" in catalog, name
        del rendered[name]
    assert rendered == catalog
    for spec in CATALOG:  # the label names on the samples are the declared ones
        match = re.search(rf"^{spec.name}(?:_bucket|_count)?\{{([^}}]*)\}}", text, re.MULTILINE)
        assert match is not None, spec.name
        labels = {pair.split("=")[0] for pair in match.group(1).split(",")} - {"le"}
        assert labels == set(spec.labels), spec.name
