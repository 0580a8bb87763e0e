#!/usr/bin/env python3
"""Extract one attention layer of a Llama-family checkpoint into fixtures/<name>/ (`make extract`).

    python scripts/extract.py --source SRC [--layer N] [--out DIR] [--prompt TEXT] [--force]

The same program as `attention-verify extract` (harness/checkpoints/extract.py); `make setup` installs the package.
"""

import sys

from harness.checkpoints.extract import cli

if __name__ == "__main__":
    sys.exit(cli())
