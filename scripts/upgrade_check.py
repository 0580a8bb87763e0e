"""What moving to the newest allowed versions changes (`make upgrade-check`), and `make lock`.

    upgrade_check.py --tested-python A --newest-python B tested.json newest.json
        packages whose version differs between the two environments, then every verdict, stage and reference row
        (hf-sdpa, golden) of `verify --json` that differs; exit 1 when a verdict changed or a run is missing
    upgrade_check.py --lock PYTHON
        rewrite harness/constraints.txt from that environment's installed versions (atomically)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.common import update_generated, write_atomic  # noqa: E402
from harness.versions import CONSTRAINTS  # noqa: E402

HEADER = """\
# The versions the verdicts were made with: `make setup` installs exactly these (pip -c), so that a fresh clone
# reproduces them. `verify` prints a one-line note when the installed transformers or torch differ from these.
# To move them: `make upgrade-check` (the newest allowed versions in .venv-upgrade: make verify and make test
# there, and what changed), then `make lock VENV=.venv-upgrade` writes this file anew.
"""
README_NAMES = ("transformers", "torch", "huggingface_hub", "safetensors", "triton", "gguf")  # the README's line


def freeze(python: str) -> dict[str, str]:
    """name -> version installed in that environment, local build tags dropped (torch 2.13.0+cpu -> 2.13.0)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    pins = {}
    for line in out.splitlines():
        if "==" in line and not line.startswith("#"):
            name, v = line.split("==", 1)
            pins[name] = v.split("+", 1)[0]
    return pins


def lock(python: str) -> None:
    pins = freeze(python)
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items(), key=lambda kv: kv[0].lower()))
    write_atomic(CONSTRAINTS, (HEADER + body).encode())
    named = ", ".join(f"{n} {pins.get(n)}" for n in README_NAMES)
    update_generated(ROOT / "README.md", f"Tested with: {named}.")
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)}: {len(pins)} pins (transformers {pins.get('transformers')}, "
          f"torch {pins.get('torch')})")


def package_changes(a: dict, b: dict) -> list[str]:
    names = sorted(set(a) | set(b), key=str.lower)
    return [f"  {n}: {a.get(n, '-')} -> {b.get(n, '-')}" for n in names if a.get(n) != b.get(n)]


def verdict_changes(a: dict, b: dict) -> list[str]:
    def key(v):
        return v["fixture"], v["impl"]

    va, vb = {key(v): v for v in a["verdicts"]}, {key(v): v for v in b["verdicts"]}
    out = []
    for k in sorted(set(va) | set(vb)):
        x, y = va.get(k), vb.get(k)
        said = [(v["passed"], v["stage"]) if v else None for v in (x, y)]
        if said[0] != said[1]:
            out.append(f"  {k[0]} / {k[1]}: {_verdict(x)} -> {_verdict(y)}")
    return out


def _verdict(v) -> str:
    if v is None:
        return "not run"
    return "PASS" if v["passed"] else f"FAIL ({v['stage']})"


def reference_changes(a: dict, b: dict) -> list[str]:
    """The reference's own rows: transformers' sdpa against its eager path, its eager output against the golden."""

    def rows(doc):
        ref = ("hf-sdpa", "golden")
        return {(r["fixture"], r["impl"], r["scenario"]): r for r in doc["results"] if r["impl"] in ref}

    ra, rb = rows(a), rows(b)
    out = []
    for k in sorted(set(ra) | set(rb)):
        x, y = ra.get(k), rb.get(k)
        if x is None or y is None or x["passed"] != y["passed"] or x["max_abs_err"] != y["max_abs_err"]:
            fmt = lambda r: "-" if r is None else f"{r['max_abs_err']:.2e} {'PASS' if r['passed'] else 'FAIL'}"
            out.append(f"  {'/'.join(k)}: {fmt(x)} -> {fmt(y)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lock", metavar="PYTHON", help="rewrite harness/constraints.txt from this environment")
    p.add_argument("--tested-python")
    p.add_argument("--newest-python")
    p.add_argument("runs", nargs="*", type=Path, help="verify --json of the tested and of the newest environment")
    a = p.parse_args(argv)
    if a.lock:
        lock(a.lock)
        return 0
    if len(a.runs) != 2 or not (a.tested_python and a.newest_python):
        p.error("give --tested-python, --newest-python and two verify --json files")
    print("upgrade-check: packages that differ (tested -> newest allowed):")
    print("\n".join(package_changes(freeze(a.tested_python), freeze(a.newest_python))) or "  none")
    missing = [str(r) for r in a.runs if not r.is_file()]
    if missing:
        print(f"upgrade-check: no verify results in {', '.join(missing)}: that run did not finish (see its log)")
        return 1
    docs = [json.loads(r.read_text()) for r in a.runs]
    changed = verdict_changes(*docs)
    print("upgrade-check: verdicts that changed:")
    print("\n".join(changed) or "  none")
    print("upgrade-check: the reference's own rows (hf-sdpa, golden) that changed:")
    print("\n".join(reference_changes(*docs)) or "  none")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
