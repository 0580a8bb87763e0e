"""python -m harness COMMAND: verify (the main job), list, fixture (inspect and verify one fixture),
e2e (a whole real model with our attention in every layer), plot-attention (layer 0's probabilities, ours vs HF)."""

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


def cmd_verify(argv) -> int:
    from harness.verify import main

    return main(argv)


def cmd_e2e(argv) -> int:
    from harness.e2e import main

    return main(argv)


def cmd_plot_attention(argv) -> int:
    from harness.plot import main

    return main(argv)


def cmd_mutants(argv) -> int:
    from harness.mutants import main

    return main(argv)


def cmd_list(argv) -> int:
    import json

    from harness.fixture import list_fixtures, load_fixture
    from harness.scenarios import SCENARIOS
    from impl import IMPLEMENTATIONS

    p = Parser(prog="python -m harness list", description="Fixtures, implementations and scenarios.")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    fixtures = []
    for path in list_fixtures():
        f = load_fixture(path, verify=False)
        fixtures.append({"name": f.name, "synthetic": f.synthetic, "layer": f.layer, "model": f.manifest.get("model")})
    scen = [
        {"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "quick": s.quick, "isolates": s.isolates}
        for s in SCENARIOS
    ]
    if a.json:
        print(json.dumps({"fixtures": fixtures, "implementations": list(IMPLEMENTATIONS), "scenarios": scen}, indent=1))
        return 0
    print("fixtures:")
    for f in fixtures:
        print(
            f"  {f['name']:26s} {'synthetic' if f['synthetic'] else 'real'} weights, layer {f['layer']}, {f['model']}"
        )
    print("implementations:\n  " + ", ".join(IMPLEMENTATIONS))
    print("scenarios:")
    for s in scen:
        print(f"  {s['name']:17s} {s['dtype']:8s} {'quick' if s['quick'] else 'full '}  {s['isolates']}")
    return 0


COMMANDS = {
    "fixture": cmd_fixture,
    "verify": cmd_verify,
    "list": cmd_list,
    "e2e": cmd_e2e,
    "plot-attention": cmd_plot_attention,
    "mutants": cmd_mutants,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        p = Parser(prog="python -m harness")
        p.add_argument("command", choices=sorted(COMMANDS))
        p.parse_args(argv[:1])
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(run_cli(main))
