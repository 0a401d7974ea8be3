"""Engine benchmark: kvrelay vs transformers and vLLM (CPU) on one seeded workload.

A thin wrapper around `kvrelay.bench.engine.main` (also `kvrelay bench engine`). Example:

    .venv/bin/python benchmarks/engine_vs_peers.py                 # full run, all peers
    .venv/bin/python benchmarks/engine_vs_peers.py --quick --peers transformers
    .venv/bin/python benchmarks/engine_vs_peers.py --vllm-python /path/to/vllm-venv/bin/python

Writes benchmarks/results/engine_vs_peers.json (see --json) and prints a table.
"""

from __future__ import annotations

import sys

from kvrelay.bench.engine import main

if __name__ == "__main__":
    sys.exit(main())
