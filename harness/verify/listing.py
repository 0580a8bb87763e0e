"""`attention-verify list`: what a run can use: fixtures, implementations (layer and core built-ins), scenarios."""

from __future__ import annotations

import json

from harness.checkpoints import store
from harness.checkpoints.format import load_fixture
from harness.common import Parser, UserError, one_line
from harness.verify.scenarios import SCENARIOS


def main(argv=None) -> int:
    from impl import IMPLEMENTATIONS  # lazy: impl imports triton, slow; `list --json` need not pay for it

    p = Parser(prog="attention-verify list", description="Fixtures, implementations and scenarios.")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    fixtures = []
    for entry in filter(store.by_default, store.catalog()):
        path = entry.path
        if entry.state == store.PENDING:  # listed, not made here (its first use or `fixtures make` makes it)
            fixtures.append({"name": entry.name, "synthetic": True, "layer": None, "model": None, "made": False})
            continue
        try:
            f = load_fixture(path, verify=False)
        except UserError as e:  # one broken fixture is reported in the listing; the others are still listed
            fixtures.append({"name": path.name, "broken": one_line(str(e))})
            continue
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
        if "broken" in f:
            print(f"  {f['name']:26s} BROKEN: {f['broken']}")
            continue
        if f.get("made") is False:
            print(f"  {f['name']:26s} synthetic weights, not yet made (made on first use)")
            continue
        print(
            f"  {f['name']:26s} {'synthetic' if f['synthetic'] else 'real'} weights, layer {f['layer']}, {f['model']}"
        )
    print("implementations:\n  " + ", ".join(IMPLEMENTATIONS))
    print("scenarios:")
    for s in scen:
        print(f"  {s['name']:17s} {s['dtype']:8s} {'quick' if s['quick'] else 'full '}  {s['isolates']}")
    return 0
