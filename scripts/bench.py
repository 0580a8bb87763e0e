#!/usr/bin/env python3
"""Benchmarks: time, peak memory and memory traffic of naive vs loop vs tiled vs SDPA (and transformers' attention
functions) on Llama-3.2-1B's attention shapes (`make bench`; `make bench-quick` for a short run).

    python scripts/bench.py [--quick] [--seq 1024,4096] [--impl tiled,sdpa] [--runs 5] [--json PATH] [--plot PATH]

A full run (no --quick/--seq/--impl) writes docs/bench.json and docs/bench.png. See harness/bench.py and the README.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
