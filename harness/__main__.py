"""python -m harness COMMAND: fixture (inspect and verify a fixture); more commands come with the harness."""

from __future__ import annotations

import sys

from harness.errors import Parser, run_cli


def cmd_fixture(argv) -> int:
    from harness.fixture import load_fixture

    p = Parser(prog="python -m harness fixture", description="Load and verify a fixture; print its summary.")
    p.add_argument("fixture", help="a name under fixtures/ or a directory")
    a = p.parse_args(argv)
    f = load_fixture(a.fixture)
    kind = "synthetic" if f.synthetic else "real"
    src = f.manifest.get("source", {})
    print(f"{f.path}: OK ({kind} weights, {src.get('kind')} source, layer {f.layer})")
    for n, w in f.weights.items():
        print(f"  {n:8s} {list(w.shape)} {str(w.dtype).removeprefix('torch.')}")
    if f.inputs is not None:
        print(f"  inputs   {f.inputs['token_ids'].shape[1]} tokens, golden {list(f.inputs['golden'].shape)}")
    return 0


COMMANDS = {"fixture": cmd_fixture}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        p = Parser(prog="python -m harness")
        p.add_argument("command", choices=sorted(COMMANDS))
        p.parse_args(argv[:1])
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(run_cli(main))
