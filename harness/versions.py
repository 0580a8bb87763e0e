"""Which versions the judge runs on, and which the project's verdicts were made with.

The reference is transformers (and the torch under it): a verdict is reproducible only with the versions named.
`harness/constraints.txt` pins what the project was tested with (`make setup` installs exactly those); a user may
install others, and then `verify` says so in one line (a note, never a failure by itself).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import InvalidVersion, Version

CONSTRAINTS = Path(__file__).with_name("constraints.txt")
RECORDED = ("transformers", "torch", "safetensors", "huggingface_hub", "gguf")  # what a fixture's manifest records
NOTED = ("transformers", "torch")  # the reference itself: a difference here is worth a line


def installed(packages=RECORDED) -> dict[str, str | None]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def tested(path: Path | None = None) -> dict[str, str]:
    """name -> version from a pip constraints file (`name==version` lines); names normalised as pip does."""
    out = {}
    path = path or CONSTRAINTS
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, v = (s.strip() for s in line.split("==", 1))
            out[_norm(name)] = v
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _public(v: str | None) -> str | None:
    """2.13.0+cpu and 2.13.0+cu128 are the same torch release: compare without the local build tag."""
    try:
        return None if v is None else Version(v).public
    except InvalidVersion:
        return v


def differences(packages=NOTED) -> list[tuple[str, str, str | None]]:
    """(package, tested, installed) for each reference package whose installed release is not the tested one."""
    want, have = tested(), installed(packages)
    return [(p, want[_norm(p)], have[p]) for p in packages
            if _norm(p) in want and _public(have[p]) != _public(want[_norm(p)])]  # fmt: skip


def both(packages=RECORDED) -> dict[str, dict[str, str | None]]:
    """{"installed": {...}, "tested": {...}} for the JSON of a run."""
    want = tested()
    return {"installed": installed(packages), "tested": {p: want.get(_norm(p)) for p in packages}}


def note() -> str | None:
    """One line when transformers or torch differ from the tested versions, else None."""
    diff = differences()
    if not diff:
        return None
    tested_s = ", ".join(f"{p} {t}" for p, t, _ in diff)
    have_s = ", ".join(f"{p} {h or 'absent'}" for p, _, h in diff)
    return (f"note: this project's verdicts were made with {tested_s} ({CONSTRAINTS.name}); installed: {have_s}. "
            "Implementations are judged against the installed transformers; `make setup` installs the tested ones")
