"""Command-line options of every CLI: list options that replace their default, numbers that are finite and in range,
devices that exist, output paths checked before any work (lengths, kernel file systems, writability, a full disk),
input files that cannot be read, and `bench --replot` rows that are not numbers. Each bad value is one line, exit 2.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, one_line_error, run

from harness import common
from harness.checkpoints import validate
from harness.checkpoints.extract import extract
from harness.common import WEEK_S, Parser, UserError, resolve_device, write_atomic

SMALL_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "num_hidden_layers": 1, "vocab_size": 300, "intermediate_size": 32,
                "max_position_embeddings": 4096, "rope_theta": 10000.0}  # fmt: skip
NAME_MAX = os.pathconf("/tmp", "PC_NAME_MAX")
PATH_MAX = os.pathconf("/tmp", "PC_PATH_MAX")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A small synthetic fixture: verify runs on it in a second or two."""
    d = tmp_path_factory.mktemp("small")
    cfg = d / "config.json"
    cfg.write_text(json.dumps(SMALL_CONFIG))
    return extract(layer=0, out=d / "fx", config_path=cfg, synthetic=True, log=lambda *_: None)


def exit_2(args: list[str]) -> subprocess.CompletedProcess:
    p = run(args)
    assert p.returncode == 2, (args, p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    one_line_error(p)
    return p


# ---------------------------------------------------------------------------------------------------------
# list options: the first use replaces the default, repeats add


def _dtype_parser() -> Parser:
    p = Parser(prog="t")
    p.many("--dtype", split=True, default=["float32", "bfloat16", "float16"])
    p.many("--impl")
    return p


@pytest.mark.parametrize("argv, want", [
    ([], ["float32", "bfloat16", "float16"]),
    (["--dtype", "float16"], ["float16"]),
    (["--dtype", "float16", "--dtype", "bfloat16"], ["float16", "bfloat16"]),
    (["--dtype", "float16,bfloat16"], ["float16", "bfloat16"]),
    (["--dtype", "float16", "bfloat16", "--dtype", "float32"], ["float16", "bfloat16", "float32"]),
])  # fmt: skip
def test_a_list_option_replaces_its_default(argv, want):
    p = _dtype_parser()
    assert p.parse_args(argv).dtype == want
    assert p.parse_args([]).dtype == ["float32", "bfloat16", "float16"]  # the default object itself never grows
    assert p.parse_args(["--impl", "a", "--impl", "b,c"]).impl == ["a", "b,c"]  # no default: accumulates, no split
    assert p.parse_args([]).impl is None


def test_verify_dtype_float16_runs_float16_only(small, tmp_path):
    out = tmp_path / "r.json"
    p = run(["-m", "harness", "verify", "--dtype", "float16", "--impl", "naive", "--fixture", str(small),
             "--json", str(out)])  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    rows = [r for r in json.loads(out.read_text())["results"] if r["impl"] == "naive"]
    assert rows and {r["dtype"] for r in rows} == {"float16"}


# ---------------------------------------------------------------------------------------------------------
# numbers: finite and in range


def test_number_parses_within_its_range_and_refuses_the_rest():
    seconds = common.number("--timeout", 0, WEEK_S, unit="seconds", above=True)
    assert seconds("5") == 5.0 and seconds("1e3") == 1000.0 and seconds(str(WEEK_S)) == WEEK_S
    for bad in ("inf", "-inf", "nan", "1e10", "-1", "0", "604800.5", "x", "", "1e400"):
        with pytest.raises(UserError) as e:
            seconds(bad)
        assert str(e.value) == f"--timeout {bad}: give a finite number of seconds above 0 and at most 604800"
    runs = common.number("--runs", 1, 10, kind=int)
    assert runs("1") == 1 and runs("10") == 10
    for bad in ("0", "11", "1.5", "1e1", "nan", "x"):
        with pytest.raises(UserError, match=r"^--runs .*: give a whole number between 1 and 10$"):
            runs(bad)


TIMEOUT = "give a finite number of seconds above 0 and at most 604800"
VERIFY_TIMEOUTS = [(["-m", "harness", "verify", "--quick", "--timeout", v], f"--timeout {v}: {TIMEOUT}")
                   for v in ("inf", "1e10", "nan", "-1", "0")]  # fmt: skip
NUMBERS = [
    *VERIFY_TIMEOUTS,
    (["-m", "harness", "bench", "--quick", "--max-config-s", "-5"], f"--max-config-s -5: {TIMEOUT}"),
    (["-m", "harness", "bench", "--quick", "--max-config-s", "nan"], f"--max-config-s nan: {TIMEOUT}"),
    (["-m", "harness", "bench", "--quick", "--max-interpreted-s", "inf"], f"--max-interpreted-s inf: {TIMEOUT}"),
    (["-m", "harness", "bench", "--quick", "--runs", "1.5"], "--runs 1.5: give a whole number between 1 and 10000"),
    (["-m", "harness", "bench", "--seq", "99999999"], "--seq '99999999': give sequence lengths between 1 and"),
    (["-m", "harness", "e2e", "--timeout", "inf"], f"--timeout inf: {TIMEOUT}"),
    (["-m", "harness", "e2e", "--tokens", "1e9"], "--tokens 1e9: give a whole number between 1 and 65536"),
    (["-m", "harness", "e2e", "--steps", "-1"], "--steps -1: give a whole number between 0 and 100000"),
    (["-m", "harness", "extract", "--layer", "-1"], "--layer -1: give a whole number between 0 and 65535"),
    (["-m", "harness", "extract", "--seed", "-1"], "--seed -1: give a whole number between 0 and 9223372036854775807"),
    (["-m", "harness", "plot", "--layer", "1e3"], "--layer 1e3: give a whole number between 0 and 65535"),
    (["-m", "harness", "plot", "--heads", "0,x"], "--heads 0,x: give comma-separated head indices"),
]


@pytest.mark.parametrize("args, says", NUMBERS, ids=[" ".join(a[2:]) for a, _ in NUMBERS])
def test_numeric_options_are_finite_and_in_range(args, says):
    p = exit_2(args)
    assert says in one_line_error(p)
    assert p.stdout == ""  # refused before any work


def test_pytest_plugin_timeout_is_finite_and_in_range(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    (tmp_path / "test_x.py").write_text("def test_ok():\n    pass\n")
    for v in ("inf", "nan", "1e10"):
        p = subprocess.run([sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
                            "-q", "--attention-timeout", v], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert p.returncode == 4 and f"--attention-timeout {float(v):g}: {TIMEOUT}" in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------------------
# devices that exist


DEVICES = [("cpu:1", "one cpu device"), ("mps", "only cpu and cuda"), ("meta", "only cpu and cuda"),
           ("cuda:99", "cuda:99"), ("cpu:x", "not a")]  # fmt: skip


@pytest.mark.parametrize("text, says", DEVICES)
def test_only_devices_that_exist(text, says):
    with pytest.raises(UserError, match=says):
        resolve_device(text)


def test_cpu_and_cpu_0_are_the_cpu():
    assert resolve_device("cpu").type == "cpu" and resolve_device("cpu:0").type == "cpu"


@pytest.mark.parametrize("cmd", [["-m", "harness", "verify", "--quick", "--impl", "naive"],
                                 ["-m", "harness", "bench", "--quick"], ["-m", "harness", "e2e"]])  # fmt: skip
def test_every_cli_refuses_cpu_1(cmd):
    assert "--device cpu:1" in one_line_error(exit_2([*cmd, "--device", "cpu:1"]))


# ---------------------------------------------------------------------------------------------------------
# output paths: checked before any work

OUTPUTS = {
    "verify --json": ["-m", "harness", "verify", "--quick", "--impl", "naive", "--json"],
    "verify --junit": ["-m", "harness", "verify", "--quick", "--impl", "naive", "--junit"],
    "verify --doc": ["-m", "harness", "verify", "--quick", "--impl", "naive", "--doc"],
    "verify --plot": ["-m", "harness", "verify", "--quick", "--impl", "naive", "--plot"],
    "mutants --json": ["-m", "harness", "mutants", "--json"],
    "bench --json": ["-m", "harness", "bench", "--quick", "--json"],
    "bench --plot": ["-m", "harness", "bench", "--quick", "--plot"],
    "e2e --json": ["-m", "harness", "e2e", "--json"],
    "plot --out": ["-m", "harness", "plot", "--out"],
    "extract --out": ["-m", "harness", "extract", "--synthetic", "--config",
                      str(ROOT / "fixtures" / "rope-yarn" / "config.json"), "--out"],
}  # fmt: skip


def _bad_place(tmp_path: Path, where: str) -> Path:
    long_name = "n" * (NAME_MAX + 1)
    deep = Path(tmp_path, *["d" * 200] * (PATH_MAX // 200 + 1))  # each name fits, the whole path does not
    return {"name_max": tmp_path / (long_name + ".png"), "path_max": deep / "out.png", "proc": Path("/proc/out.png"),
            "sys": Path("/sys/out.png")}[where]  # fmt: skip


PLACES = [("name_max", "a name of"), ("path_max", "a path of"), ("proc", "kernel's own file system"),
          ("sys", "kernel's own file system")]  # fmt: skip


@pytest.mark.parametrize("where, says", PLACES)
@pytest.mark.parametrize("cli", list(OUTPUTS))
def test_output_paths_that_cannot_be_written(tmp_path, cli, where, says):
    path = _bad_place(tmp_path, where)
    p = exit_2([*OUTPUTS[cli], str(path)])
    line = one_line_error(p)
    assert cli.split()[1] in line and says in line and len(line) < 400
    assert "passed" not in p.stdout and "wrote" not in p.stdout


def test_a_name_that_leaves_no_room_for_the_temporary_file(tmp_path):
    """A name within NAME_MAX but not with the '.NAME.tmp-XXXXXXXX' written beside it: refused now, not at the end."""
    with pytest.raises(UserError, match="16 kept for a temporary name"):
        validate.output_path(tmp_path / ("n" * (NAME_MAX - 5)), "--json")
    assert validate.output_path(tmp_path / ("n" * (NAME_MAX - 16)), "--json")  # room left: fine


def test_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    """os.access says no (a read-only mount, a folder of another user's): refused before the run."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path else real(p, mode, **k))
    for cli in ("verify --json", "bench --json", "mutants --json", "e2e --json", "extract --out"):
        p = exit_2([*OUTPUTS[cli], str(tmp_path / "sub" / "r.json")])
        assert f"cannot write in {tmp_path}" in one_line_error(p)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_found_before_the_run(tmp_path, monkeypatch):
    """The probe file's write fails with ENOSPC (what a full disk says; root, whom permissions do not stop, too)."""
    real = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    for cli in ("verify --json", "verify --plot", "bench --json", "mutants --json", "e2e --json", "extract --out"):
        p = exit_2([*OUTPUTS[cli], str(tmp_path / "r.json")])
        assert "No space left on device" in one_line_error(p) and "passed" not in p.stdout
    assert list(tmp_path.iterdir()) == []  # the probe removed


def test_a_write_refused_at_the_end_is_one_line(small, tmp_path, monkeypatch):
    """The disk fills during the run: the JSON's write fails with ENOSPC at the end: one line, exit 2, nothing left."""
    out, real = tmp_path / "r.json", os.replace

    def refuse(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refuse)
    p = exit_2(["-m", "harness", "verify", "--quick", "--dtype", "float32", "--impl", "naive", "--fixture", str(small),
                "--json", str(out)])  # fmt: skip
    assert "passed" in p.stdout  # the run ran; its write failed
    assert f"{out}: cannot write it (No space left on device)" in one_line_error(p)
    assert list(tmp_path.iterdir()) == []  # no .r.json.tmp-* left


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG])
def test_write_atomic_turns_a_refused_write_into_one_line(tmp_path, monkeypatch, code):
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(UserError) as e:
        write_atomic(tmp_path / "x.json", b"{}")
    assert str(e.value).startswith(f"{tmp_path / 'x.json'}: cannot write it ({os.strerror(code)})")
    assert list(tmp_path.iterdir()) == []  # the temporary file removed


def test_write_atomic_into_a_read_only_place(tmp_path):
    with pytest.raises(UserError, match="cannot write it"):
        write_atomic(Path("/proc/x.json"), b"{}")


@pytest.mark.parametrize("cmd", [["-m", "harness", "verify", "--quick", "--impl", "naive"],
                                 ["-m", "harness", "mutants"], ["-m", "harness", "bench", "--quick"]])  # fmt: skip
def test_doc_without_a_generated_block_is_refused_before_the_run(tmp_path, cmd):
    page = tmp_path / "page.md"
    page.write_text("# a page\n\nno generated block here\n")
    p = exit_2([*cmd, "--doc", str(page)])
    assert f"--doc {page}: no '<!-- generated by: ... -->'" in one_line_error(p)
    assert p.stdout == "" and page.read_text() == "# a page\n\nno generated block here\n"


# ---------------------------------------------------------------------------------------------------------
# input files that cannot be read


@pytest.fixture
def unreadable(monkeypatch):
    """open() of the files put in this set fails as for a file without read permission (root reads anything)."""
    paths: set[Path] = set()
    real = builtins.open

    def guarded(file, *a, **k):
        if isinstance(file, (str, Path)) and Path(file).absolute() in paths:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    return paths


def test_unreadable_input_files(tmp_path, unreadable):
    prompts, config, rows = tmp_path / "p.txt", tmp_path / "config.json", tmp_path / "rows.json"
    prompts.write_text("hello\n")
    shutil.copy(ROOT / "fixtures" / "rope-yarn" / "config.json", config)
    rows.write_text("[]")
    unreadable.update({prompts, config, rows})
    for args, option in ((["-m", "harness", "e2e", "--prompts", str(prompts)], "--prompts"),
                         (["-m", "harness", "extract", "--synthetic", "--config", str(config), "--out",
                           str(tmp_path / "fx")], "--config"),
                         (["-m", "harness", "bench", "--replot", str(rows), "--plot", str(tmp_path / "p.png")],
                          "--replot")):  # fmt: skip
        line = one_line_error(exit_2(args))
        assert f"{option} {tmp_path}" in line and "Permission denied" in line
    assert not (tmp_path / "fx").exists()


def test_input_files_that_are_folders_or_missing(tmp_path):
    for args, says in ((["-m", "harness", "e2e", "--prompts", str(tmp_path)], "is a directory"),
                       (["-m", "harness", "e2e", "--prompts", str(tmp_path / "none.txt")], "no such file"),
                       (["-m", "harness", "extract", "--synthetic", "--config", str(tmp_path)], "is a directory"),
                       (["-m", "harness", "bench", "--replot", str(tmp_path)], "is a directory")):  # fmt: skip
        assert says in one_line_error(exit_2(args))


def test_a_fixture_path_that_is_a_file(tmp_path):
    f = tmp_path / "fixture.txt"
    f.write_text("not a fixture")
    for cmd in (["-m", "harness", "verify", "--quick", "--impl", "naive", "--fixture", str(f)],
                ["-m", "harness", "fixture", str(f)]):  # fmt: skip
        assert str(f) in one_line_error(exit_2(cmd))


# ---------------------------------------------------------------------------------------------------------
# bench --replot: rows that are not numbers

MACHINE = {"cpu": "x", "threads": 2, "torch": "2", "matmul_gflops": 100.0}
GOOD = {"impl": "tiled", "seq": 1024, "ran": True, "median_s": 0.1, "peak_bytes": 3e7, "traffic_bytes": 9e8}


@pytest.mark.parametrize("rows, says", [
    ([GOOD | MACHINE, GOOD | {"median_s": "fast"}], "row 1: median_s is 'fast', not a finite number"),
    ([GOOD | MACHINE, GOOD | {"peak_bytes": float("nan")}], "row 1: peak_bytes is nan"),
    ([GOOD | MACHINE | {"traffic_bytes": -1}], "row 0: traffic_bytes is -1"),
    ([GOOD | MACHINE | {"seq": "1024"}], "row 0: seq is '1024', not a sequence length"),
    ([GOOD | MACHINE | {"seq": True}], "row 0: seq is True"),
    ([GOOD | MACHINE | {"ran": "yes"}], "row 0: ran is 'yes'"),
    ([GOOD | MACHINE | {"median_s": None}], "row 0: median_s is None, not a time (the row ran)"),
    ([GOOD | MACHINE | {"direction": "sideways"}], "row 0: direction is 'sideways'"),
    ([GOOD | MACHINE | {"matmul_gflops": float("inf")}], "row 0: matmul_gflops is inf"),
    ([GOOD | MACHINE | {"threads": "two"}], "row 0: threads is 'two'"),
    ([GOOD], "row 0: cpu is None"),
    ([GOOD | MACHINE, "a string"], "row 1: a str, not an object"),
    ([], "expected a non-empty list"),
    ([GOOD | MACHINE | {"impl": "layer_hf"}], "nothing the figure draws"),
])  # fmt: skip
def test_replot_rows_that_are_not_numbers(tmp_path, rows, says):
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(rows))  # NaN and Infinity written as JSON's extension, as json.loads reads them
    p = exit_2(["-m", "harness", "bench", "--replot", str(src), "--plot", str(tmp_path / "p.png")])
    line = one_line_error(p)
    assert f"--replot {src}" in line and says in line, line
    assert not (tmp_path / "p.png").exists()
