"""Observability: metric names (`names.py`, documented in docs/metrics.md by
`metrics_doc.py`), the Prometheus export (`prometheus.py`), the hit-rate ledger (`ledger.py`,
`ledger_inputs.py`), the JSONL request log (`request_log.py`) and `kvrelay doctor`
(`doctor.py`, an HTTP-only self-check of a running server).

Layer L1: imports only L0 and kv. prometheus_client is imported only inside this package.
"""
