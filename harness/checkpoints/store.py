"""Where fixtures live: the folders a name is looked up in, and the synthetic fixtures made on first use.

The folders (harness/common.py decides them): FIXTURES_DIR first (a checkout's fixtures/, $ATTN_FIXTURES, or an
installed copy's user cache directory), then an installed copy's package data (PACKAGED_FIXTURES: the committed
fixtures and the configs, read-only). A folder that holds only a config.json (fixtures/rope-yarn/) stands for the
synthetic fixture `<folder>-synthetic`: made from that config the first time it is asked for, into FIXTURES_DIR,
as `make synthetic` makes it (scripts/extract.py --synthetic --config ...), atomically and one writer at a time.

    attention-verify fixtures          each fixture: its name, committed / cached / not yet made, and where
    attention-verify fixtures make     make every synthetic fixture now (e.g. for a CI cache)

In a checkout nothing changes from what `make` does: fixtures/ is the one folder, a run with no --fixture uses the
fixtures made there, and a missing synthetic one is made there when it is named.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import common
from harness.common import Parser, UserError

SYNTHETIC = "-synthetic"  # a synthetic fixture's name: its config folder's name and this
COMMITTED, CACHED, PENDING = "committed", "cached", "not yet made"


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path  # where it is, or (not yet made) where it will be made
    state: str  # COMMITTED (ships with the code), CACHED (made or extracted here), PENDING (not yet made)
    config: Path | None = None  # the config a synthetic fixture is made from


def is_fixture(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def folders() -> list[Path]:
    """Where fixture names are looked up, first match wins."""
    out = [Path(common.FIXTURES_DIR)]
    if not common.CHECKOUT and common.PACKAGED_FIXTURES.is_dir() and common.PACKAGED_FIXTURES not in out:
        out.append(common.PACKAGED_FIXTURES)
    return out


def config_of(name: str) -> Path:
    """The config.json of folder `name` (e.g. llama-3.2-1b) in the first folder that has one."""
    paths = [root / name / "config.json" for root in folders()]
    return next((p for p in paths if p.is_file()), paths[-1])


def fixtures_in(root: Path) -> list[Path]:
    """Fixture directories in one folder (those with a manifest), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_fixture(p))


def _configs_in(root: Path) -> list[Path]:
    """The config.json of each folder that holds nothing else: a config awaiting its synthetic fixture."""
    if not root.is_dir():
        return []
    return sorted(p / "config.json" for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and [c.name for c in p.iterdir() if not c.name.startswith(".")] == ["config.json"])  # fmt: skip


def _state(path: Path) -> str:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        made_here = bool(manifest.get("synthetic")) or manifest.get("redistributable") is False  # Gemma: never shipped
    except (OSError, ValueError, AttributeError):
        made_here = False  # a broken manifest: `load_fixture` says what is wrong with it
    shipped = common.PACKAGED_FIXTURES if not common.CHECKOUT else common.ROOT / "fixtures"
    return COMMITTED if path.parent == shipped and not made_here else CACHED


def catalog() -> list[Entry]:
    """Every fixture there is or can be made, sorted by name."""
    found: dict[str, Entry] = {}
    for root in folders():
        for path in fixtures_in(root):
            found.setdefault(path.name, Entry(path.name, path, _state(path)))
    for root in folders():
        for cfg in _configs_in(root):
            name = cfg.parent.name + SYNTHETIC
            found.setdefault(name, Entry(name, Path(common.FIXTURES_DIR) / name, PENDING, cfg))
    return sorted(found.values(), key=lambda e: e.name)


def by_default(entry: Entry) -> bool:
    """Whether a run with no --fixture uses it. Installed: every fixture, a synthetic one made on its first load;
    in a checkout: those made (`make synthetic` makes the rest)."""
    return entry.state != PENDING or not common.CHECKOUT


def list_fixtures() -> list[Path]:
    """The fixtures a run with no --fixture uses (one not yet made: the path it will be made at)."""
    return [e.path for e in catalog() if by_default(e)]


def resolve(name_or_path: str | Path) -> Path:
    """A fixture's directory from a name (in folders(), first match wins) or a directory; a synthetic fixture not
    yet made is made now. Anything else is a UserError naming what is available."""
    p = Path(name_or_path)
    for cand in (p, *(root / str(name_or_path) for root in folders())):
        if cand.is_dir() and is_fixture(cand):
            return cand
    entries = catalog()
    pending = next((e for e in entries if e.state == PENDING and (e.name == str(name_or_path) or e.path == p)), None)
    if pending is not None:
        return make(pending)
    for cand in (p, *(root / str(name_or_path) for root in folders())):
        if cand.is_dir() and (cand / "config.json").is_file():
            how = (f"`make extract` (or scripts/extract.py --synthetic --config {cand / 'config.json'})"
                   if common.CHECKOUT else f"`attention-verify extract --source SRC`, or use {cand.name}{SYNTHETIC}")
            raise UserError(f"{cand}: holds a config but no extracted layer (no manifest.json); run {how}")
    known = ", ".join(e.name for e in entries) or "none"
    raise UserError(f"no fixture '{name_or_path}' (a name `attention-verify fixtures` lists, or a directory); "
                    f"available: {known}")


def make(entry: Entry, *, force: bool = False) -> Path:
    """Make a synthetic fixture from its config, as `make synthetic` does; one line on stderr says so. Another process
    making the same one is waited for, and its fixture used."""
    from harness.checkpoints.extract import extract  # lazy: imports transformers (slow) and this module (a cycle)
    from harness.checkpoints.format import fixture_lock  # lazy: format resolves names with this module (a cycle)

    out = entry.path
    try:
        with fixture_lock(out, wait=True):
            if is_fixture(out) and not force:
                return out  # made by another process while this one waited
            print(f"making fixture {entry.name} in {out.parent} ...", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                path = extract(config_path=entry.config, synthetic=True, out=out, force=True, log=lambda *a, **k: None)
            except BaseException:
                print(" failed", file=sys.stderr, flush=True)
                raise
            print(f" done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    except OSError as e:  # a folder that cannot be written, a full disk
        raise UserError(f"{out}: cannot make fixture {entry.name} there ({e.strerror or e}); set ATTN_FIXTURES to a "
                        "folder you can write") from None  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------------------
# `attention-verify fixtures [make]`


def main(argv=None) -> int:
    p = Parser(prog="attention-verify fixtures",
               description="Each fixture: its name, whether it is committed (ships with the code), cached (made "
               "here) or not yet made (a synthetic one, made on first use), and where it is.")  # fmt: skip
    p.add_argument("action", nargs="?", choices=["make"],
                   help="make: make every synthetic fixture not yet made (ahead of time, e.g. for a CI cache)")
    p.add_argument("--force", action="store_true", help="with make: make every synthetic one again")
    p.add_argument("--json", action="store_true", help="the listing as JSON")
    a = p.parse_args(argv)
    if a.force and a.action != "make":
        raise UserError("--force goes with `fixtures make`; to remake every synthetic fixture run "
                        "`attention-verify fixtures make --force`")  # fmt: skip
    if a.action == "make":
        configs = {e.name: e.config for e in catalog() if e.state == PENDING}
        if a.force:  # every synthetic fixture whose config is shipped, made or not
            configs = {cfg.parent.name + SYNTHETIC: cfg for root in folders() for cfg in _configs_in(root)} | configs
        for name, cfg in sorted(configs.items()):
            make(Entry(name, Path(common.FIXTURES_DIR) / name, PENDING, cfg), force=a.force)
    entries = catalog()
    if a.json:
        rows = [{"name": e.name, "state": e.state, "path": str(e.path),
                 "config": None if e.config is None else str(e.config)} for e in entries]  # fmt: skip
        print(json.dumps(rows, indent=1))
        return 0
    if not entries:
        print(f"no fixtures in {', '.join(map(str, folders()))}")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:{width}s}  {e.state:12s}  {e.path}")
    return 0
