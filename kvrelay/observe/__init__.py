"""Observability: metric names (`names.py`), the Prometheus export (`prometheus.py`).

Layer L1: imports only L0. prometheus_client is imported only inside this package.
"""
