"""The one command line: `attention-verify COMMAND ...` or `python -m harness COMMAND`.

    verify    implementations vs each family's transformers attention on every fixture (the main job)
    list      fixtures, implementations, scenarios
    fixtures  each fixture and where it is (committed, cached, not yet made); `fixtures make` makes the synthetic ones
    fixture   load and check one fixture, print its summary
    extract   one layer of a Llama-family checkpoint -> fixtures/<name>/
    e2e       a whole real model with the implementation in every layer, against transformers
    plot      one layer's attention probabilities for a real prompt, ours beside transformers'
    mutants   the mutation suite: the harness scored on the catalog of attention bugs
    bench     time, peak memory and memory traffic on Llama-3.2-1B's shapes

Exit codes everywhere: 0 pass, 1 a failing verdict, 2 bad input (one line on stderr, no traceback).
`make setup` or `pip install` (a path, a git URL, a wheel) installs the script.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from harness.common import Parser, run_cli

# command -> (module, its main); imported only when used, so `list` does not pay for matplotlib or transformers
COMMANDS = {
    "verify": "harness.verify.run",
    "list": "harness.verify.listing",
    "fixtures": "harness.checkpoints.store",
    "fixture": "harness.checkpoints.format",
    "extract": "harness.checkpoints.extract",
    "e2e": "harness.e2e.run",
    "plot": "harness.e2e.plot",
    "mutants": "harness.mutants",
    "bench": "harness.bench.report",
}
ALIASES = {"plot-attention": "plot"}

# Known notices of the dependencies that would print before the table and are none of the user's business: they name
# the harness's own calls into transformers, whose results are checked anyway. Filtered at the entry, never on import
# (a library import leaves the caller's warnings alone), and only when no -W / PYTHONWARNINGS option asks otherwise.
KNOWN_WARNINGS = (
    # transformers' renamed keywords, e.g. 5.24: "`past_key_values` is deprecated and will be removed in version
    # 5.40.0 for `LlamaAttention.forward`. Use `cache` instead." (the reference passes the name the tested one takes)
    (FutureWarning, r"`\w+` is deprecated (and will be removed in|and removed starting from) version"),
)


def quiet_dependency_warnings() -> None:
    """Ignore KNOWN_WARNINGS in this process, unless the interpreter was given warning options."""
    if sys.warnoptions:
        return
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = ALIASES.get(argv[0], argv[0]) if argv else None
    if name not in COMMANDS:
        p = Parser(prog="attention-verify", description=__doc__.split("\n")[0])
        p.add_argument("command", choices=list(COMMANDS))
        p.parse_args(argv[:1])
    return importlib.import_module(COMMANDS[name]).main(argv[1:])


def entry() -> None:
    """The console script (and `python -m harness`)."""
    quiet_dependency_warnings()
    sys.exit(run_cli(main))
