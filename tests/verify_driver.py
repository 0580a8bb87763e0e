"""`verify`'s command line in a process of its own, for tests/test_isolation.py: each run's peak memory growth is
printed, so a test can see what a reply cost the judge.

    python tests/verify_driver.py ARGS [--- ARGS ...]    # one run per group of ARGS, in this one process
"""

from __future__ import annotations

import sys

from harness.common import run_cli
from harness.verify.run import main


def peak_kb() -> int:
    """This process's peak resident memory so far (VmHWM), in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


if __name__ == "__main__":
    groups, rc = [[]], 0
    for arg in sys.argv[1:]:
        groups.append([]) if arg == "---" else groups[-1].append(arg)
    for argv in groups:
        before = peak_kb()
        rc = max(rc, run_cli(main, argv))
        print(f"peak growth: {peak_kb() - before} kB", file=sys.stderr)
    sys.exit(rc)
