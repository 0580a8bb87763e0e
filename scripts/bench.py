#!/usr/bin/env python3
"""Benchmarks: time, peak memory and memory traffic of attention on Llama-3.2-1B's shapes (`make bench`).

    python scripts/bench.py [--quick] [--seq 1024 4096] [--impl tiled sdpa] [--runs 5] [--json PATH] [--plot PATH]

The same program as `attention-verify bench` (harness/bench/report.py); `make setup` installs the package.
"""

import sys

from harness.bench.report import cli

if __name__ == "__main__":
    sys.exit(cli())
