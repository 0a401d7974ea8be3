"""Block hashing speed: time to hash a 32k-token prompt into 16-token chained blocks.

Run: .venv/bin/python benchmarks/block_hash.py  -> benchmarks/results/block_hash.json
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

from kvrelay.kv.hashing import hash_blocks


def main() -> int:
    rng = random.Random(0)
    results = {}
    for num_tokens in (1024, 8192, 32768):
        tokens = [rng.randrange(150_000) for _ in range(num_tokens)]
        times = []
        for _ in range(50):
            start = time.perf_counter()
            hash_blocks(tokens, 16)
            times.append(time.perf_counter() - start)
        results[str(num_tokens)] = {
            "p50_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
        }
        print(f"{num_tokens:>6} tokens: p50 {results[str(num_tokens)]['p50_ms']:.2f} ms")
    out = Path(__file__).parent / "results" / "block_hash.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
