"""`pip install` of this project: the wheel and the sdist carry the code, the committed fixture and every fixture
config; installed into a fresh environment, the console script works in an empty directory, offline, without the
checkout; synthetic fixtures are made on first use into $ATTN_FIXTURES (or the user cache), and `fixtures` lists
each fixture and where it is. The fast tests check where names resolve (harness/checkpoints/store.py) on a made-up
installed layout, in this process; the slow ones build the wheel and run it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, one_line_error, run

from harness import common
from harness.checkpoints import store
from harness.common import UserError

PACKAGED = "attention_verify_fixtures"  # the wheel's name for fixtures/ (pyproject.toml)


# ---- where names resolve, on an installed layout made up in tmp_path ----


@pytest.fixture
def installed_layout(tmp_path, monkeypatch):
    """Package data as a wheel installs it (the committed fixture and a config) and an empty cache, outside any
    checkout."""
    shipped = tmp_path / "site-packages" / PACKAGED
    shutil.copytree(FIXTURES / "smollm2-135m", shipped / "smollm2-135m")
    (shipped / "rope-yarn").mkdir()
    shutil.copy(FIXTURES / "rope-yarn" / "config.json", shipped / "rope-yarn" / "config.json")
    cache = tmp_path / "cache"
    monkeypatch.setattr(common, "CHECKOUT", False)
    monkeypatch.setattr(common, "PACKAGED_FIXTURES", shipped)
    monkeypatch.setattr(common, "FIXTURES_DIR", cache)
    return shipped, cache


def test_installed_names_resolve_to_package_data_and_cache(installed_layout, capsys):
    shipped, cache = installed_layout
    states = {e.name: (e.state, e.path) for e in store.catalog()}
    assert states == {"smollm2-135m": (store.COMMITTED, shipped / "smollm2-135m"),
                      "rope-yarn-synthetic": (store.PENDING, cache / "rope-yarn-synthetic")}
    assert store.list_fixtures() == [cache / "rope-yarn-synthetic", shipped / "smollm2-135m"]  # a run uses both
    assert store.resolve("smollm2-135m") == shipped / "smollm2-135m"
    assert store.config_of("rope-yarn") == shipped / "rope-yarn" / "config.json"

    made = store.resolve("rope-yarn-synthetic")  # first use: made into the cache, one line on stderr
    assert made == cache / "rope-yarn-synthetic" and (made / "manifest.json").is_file()
    err = capsys.readouterr().err
    assert err.startswith(f"making fixture rope-yarn-synthetic in {cache} ... done in ") and err.endswith(" s\n")
    assert {e.name: e.state for e in store.catalog()}["rope-yarn-synthetic"] == store.CACHED
    assert store.resolve(cache / "rope-yarn-synthetic") == made  # by its path too; made once
    assert capsys.readouterr().err == ""

    with pytest.raises(UserError, match="no fixture 'nope'.*available: rope-yarn-synthetic, smollm2-135m"):
        store.resolve("nope")
    with pytest.raises(UserError, match="no extracted layer.*attention-verify extract.*rope-yarn-synthetic"):
        store.resolve("rope-yarn")


def _rows(listing: str) -> dict[str, tuple[str, str]]:
    """`attention-verify fixtures`' table: name -> (state, path)."""
    rows = (re.split(r"\s{2,}", line, maxsplit=2) for line in listing.splitlines())
    return {name: (state, path) for name, state, path in rows}


def test_fixtures_command_lists_and_makes(installed_layout):
    shipped, cache = installed_layout
    p = run(["-m", "harness", "fixtures"])
    assert p.returncode == 0, p.stderr
    assert _rows(p.stdout) == {"rope-yarn-synthetic": ("not yet made", str(cache / "rope-yarn-synthetic")),
                               "smollm2-135m": ("committed", str(shipped / "smollm2-135m"))}
    p = run(["-m", "harness", "list", "--json"])  # `list` names it without making it
    assert p.returncode == 0 and not (cache / "rope-yarn-synthetic").exists(), p.stderr
    p = run(["-m", "harness", "fixtures", "make"])
    assert p.returncode == 0 and "making fixture rope-yarn-synthetic" in p.stderr, p.stderr
    assert (cache / "rope-yarn-synthetic" / "manifest.json").is_file()
    assert _rows(p.stdout)["rope-yarn-synthetic"] == ("cached", str(cache / "rope-yarn-synthetic"))
    p = run(["-m", "harness", "fixtures", "--force"])
    assert p.returncode == 2 and "fixtures make --force" in one_line_error(p)


def test_checkout_layout_is_unchanged(tmp_path, monkeypatch):
    """In a checkout fixtures/ is the one folder; a run with no --fixture uses the fixtures made there."""
    folder = tmp_path / "fixtures"
    shutil.copytree(FIXTURES / "smollm2-135m", folder / "smollm2-135m")
    (folder / "rope-yarn").mkdir()
    shutil.copy(FIXTURES / "rope-yarn" / "config.json", folder / "rope-yarn" / "config.json")
    monkeypatch.setattr(common, "CHECKOUT", True)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "FIXTURES_DIR", folder)
    assert store.folders() == [folder]
    assert store.list_fixtures() == [folder / "smollm2-135m"]
    assert {e.name: e.state for e in store.catalog()} == {"rope-yarn-synthetic": store.PENDING,
                                                           "smollm2-135m": store.COMMITTED}
    with pytest.raises(UserError, match="make extract"):
        store.resolve("rope-yarn")


def test_pyproject_names_every_package():
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("harness", "impl")
            for p in (ROOT / pkg).rglob("__init__.py")}  # fmt: skip
    assert set(conf["packages"]) == tree | {PACKAGED}, "pyproject.toml [tool.setuptools] packages"
    assert conf["package-dir"] == {PACKAGED: "fixtures"}


# ---- the wheel, built and installed ----


def _git_files() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the tree to package is what git tracks")
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tree as a clean clone has it (tracked files and new ones git does not ignore): no build/ left over, no
    synthetic fixture."""
    src = tmp_path_factory.mktemp("src")
    for f in _git_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    return src


def _pip(*args, timeout=900):
    p = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out))
    (whl,) = out.glob("attention_verify-*.whl")
    return whl


@pytest.fixture(scope="module")
def env_bin(wheel, tmp_path_factory):
    """A fresh environment with the wheel installed (--no-deps); the test environment's packages (torch,
    transformers, ...) reused through a .pth file rather than installed again."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    sites = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(purelib) / "test-environment.pth").write_text("".join(f"{p}\n" for p in sites))
    _pip("--python", str(py), "install", "--no-deps", "--no-index", str(wheel))
    return env / "bin"


def _user(bin_dir: Path, cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    """A command as a user runs it: in cwd, no PYTHONPATH, offline, the user cache in a temporary folder."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATTN_FIXTURES", "PYTHONHOME")}
    clean |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XDG_CACHE_HOME": str(cwd.parent / "xdg-cache")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=clean | env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


@pytest.mark.gate  # builds and installs the wheel: the CI gate (make test-gate)
def test_wheel_carries_code_committed_fixtures_and_configs(wheel, source):
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = _git_files()
    code = {f for f in tracked if f.split("/")[0] in ("harness", "impl") and f.endswith(".py")}
    assert code <= names, f"missing from the wheel: {sorted(code - names)}"
    shipped = {PACKAGED + f.removeprefix("fixtures") for f in tracked if f.startswith("fixtures/")}
    assert {n for n in names if n.startswith(PACKAGED + "/")} == shipped  # committed: all of it, nothing else
    assert f"{PACKAGED}/smollm2-135m/attn_layer_0.safetensors" in shipped
    configs = ("llama-3.2-1b", "rope-linear", "rope-dynamic", "rope-yarn")
    assert {f"{PACKAGED}/{c}/config.json" for c in configs} <= names
    assert "harness/constraints.txt" in names
    assert not any("-synthetic" in n or "/tests/" in n or n.startswith("tests/") for n in names)


@pytest.mark.gate  # builds and installs the wheel: the CI gate (make test-gate)
def test_sdist_builds_the_same_wheel(wheel, source, tmp_path):
    """The sdist carries what the wheel needs: a wheel built from it has the same files."""
    build = [sys.executable, "-c", "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])",
             str(tmp_path / "sdist")]  # fmt: skip
    p = subprocess.run(build, cwd=source, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    (sdist,) = (tmp_path / "sdist").glob("attention_verify-*.tar.gz")
    _pip("wheel", str(sdist), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "w"))
    (again,) = (tmp_path / "w").glob("*.whl")
    assert set(zipfile.ZipFile(again).namelist()) == set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.gate  # builds and installs the wheel: the CI gate (make test-gate)
def test_installed_script_verifies_a_layer_in_an_empty_directory(env_bin, tmp_path):
    pytest.importorskip("platformdirs", reason="a dependency (pyproject.toml) the installed copy takes from this "
                        "environment: `make setup` installs it")  # fmt: skip
    cwd = tmp_path / "work"
    cwd.mkdir()
    shutil.copy(ROOT / "docs" / "examples" / "layer.py", cwd / "my_layer.py")
    where = _user(env_bin, cwd, env_bin / "python", "-c",
                  "import harness, harness.common as c; print(harness.__file__, c.CHECKOUT, c.FIXTURES_DIR)")
    module, checkout, fixtures_dir = where.stdout.split()
    assert Path(module).is_relative_to(env_bin.parent) and checkout == "False", where.stdout + where.stderr
    assert Path(fixtures_dir).is_relative_to(tmp_path / "xdg-cache")  # the user cache directory

    ok = _user(env_bin, cwd, env_bin / "attention-verify", "verify", "--impl", "my_layer.py:attention",
               "--fixture", "smollm2-135m", "--quick")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "0 failed" in ok.stdout and str(ROOT) not in ok.stdout + ok.stderr

    bad = _user(env_bin, cwd, env_bin / "attention-verify", "verify", "--impl", "my_layer.py:no_scale",
                "--fixture", "smollm2-135m", "--quick")
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "FAIL smollm2-135m / my_layer.py:no_scale: stage scale" in bad.stdout
    assert not (tmp_path / "xdg-cache").exists()  # a committed fixture: nothing made, nothing cached
    assert not (cwd / "fixtures").exists()


@pytest.mark.gate  # builds and installs the wheel: the CI gate (make test-gate)
def test_installed_script_makes_a_synthetic_fixture_on_first_use(env_bin, tmp_path):
    cwd, cache = tmp_path / "work", tmp_path / "fixture-cache"
    cwd.mkdir()
    listed = _user(env_bin, cwd, env_bin / "attention-verify", "fixtures", ATTN_FIXTURES=str(cache))
    assert listed.returncode == 0, listed.stderr
    rows = _rows(listed.stdout)
    assert rows["rope-yarn-synthetic"] == ("not yet made", str(cache / "rope-yarn-synthetic"))
    state, where = rows["smollm2-135m"]
    assert state == "committed" and where.endswith(f"{PACKAGED}/smollm2-135m") and str(ROOT) not in where

    first = _user(env_bin, cwd, env_bin / "attention-verify", "fixture", "rope-yarn-synthetic",
                  ATTN_FIXTURES=str(cache))
    assert first.returncode == 0, first.stderr
    assert f"making fixture rope-yarn-synthetic in {cache} ... done in " in first.stderr
    assert (cache / "rope-yarn-synthetic" / "manifest.json").is_file()
    assert not list(cache.glob(".rope-yarn-synthetic.tmp-*"))  # written atomically, nothing left over

    listed = _user(env_bin, cwd, env_bin / "attention-verify", "fixtures", ATTN_FIXTURES=str(cache))
    assert _rows(listed.stdout)["rope-yarn-synthetic"] == ("cached", str(cache / "rope-yarn-synthetic"))
    again = _user(env_bin, cwd, env_bin / "attention-verify", "fixture", "rope-yarn-synthetic",
                  ATTN_FIXTURES=str(cache))
    assert again.returncode == 0 and "making" not in again.stderr, again.stderr
    assert list(cwd.iterdir()) == []  # nothing written where it ran
