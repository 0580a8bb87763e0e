"""`attention-verify list`: what a run can use: fixtures (each with its path, model_type and layer_type),
implementations (layer and core built-ins), scenarios."""

from __future__ import annotations

import json
from pathlib import Path

from harness.checkpoints import store
from harness.checkpoints.format import load_fixture
from harness.common import Parser, UserError, one_line
from harness.reference.family import layer_type
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
            fixtures.append({"name": entry.name, "path": str(path), "synthetic": True, "layer": None, "model": None,
                             "made": False, **_family_of(entry.config)})  # fmt: skip
            continue
        try:
            f = load_fixture(path, verify=False)
        except UserError as e:  # one broken fixture is reported in the listing; the others are still listed
            fixtures.append({"name": path.name, "path": str(path), "broken": one_line(str(e))})
            continue
        fixtures.append({"name": f.name, "path": str(f.path), "synthetic": f.synthetic, "layer": f.layer,
                         "model": f.manifest.get("model"), "model_type": f.config.get("model_type", "llama"),
                         "layer_type": f.layer_type})  # fmt: skip
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
        print(f"  {f['name']:26s} {'synthetic' if f['synthetic'] else 'real'} weights, {f['model_type']} layer "
              f"{f['layer']} ({f['layer_type']}), {f['model']}")  # fmt: skip
    print("implementations:\n  " + ", ".join(IMPLEMENTATIONS))
    print("scenarios:")
    for s in scen:
        print(f"  {s['name']:17s} {s['dtype']:8s} {'quick' if s['quick'] else 'full '}  {s['isolates']}")
    return 0


def _family_of(config_path) -> dict:
    """model_type and layer_type of a synthetic fixture not yet made (layer 0 of its config), read off the config."""
    try:
        config = json.loads(Path(config_path).read_text())
        return {"model_type": config.get("model_type", "llama"), "layer_type": layer_type(config, 0)}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {"model_type": None, "layer_type": None}  # a broken config: its first use says what is wrong
