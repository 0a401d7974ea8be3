"""Benchmarks: the engine benchmark and the HTTP workload benchmark (workloads, load client,
offline analysis, reports). Top layer (L5): may import anything in kvrelay; only
`kvrelay.cli` imports it.
"""
