#!/usr/bin/env python3
"""Extract one attention layer of a Llama-family checkpoint into fixtures/<name>/ (`make extract`).

    python scripts/extract.py --source SRC [--layer N] [--out DIR] [--prompt TEXT] [--force]

See `--help` and the README for the sources and the fixture format.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.extract import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
