"""The pytest plugin (harness/pytest_plugin.py) on the sample user repository (docs/examples/user-repo): pytest in a
subprocess, in a copy of that repository, as its user runs it (the plugin named with -p, so the entry point need not
be installed here; autoload off, so an installed one is not loaded twice). Its items, node ids, -k and node-id
selection, the failing verdict in the message and in the JUnit XML (read with xml.etree), a correct implementation
passing; the item's outcome from its row (a missing row fails) without a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import ROOT

from harness import pytest_plugin as plugin
from harness.verify import contracts
from harness.verify.compare import compare, not_run, skipped
from harness.verify.records import Row, Verdict
from harness.verify.run import resolve_fixtures
from harness.verify.scenarios import select

USER_REPO = ROOT / "docs" / "examples" / "user-repo"
FAST = ["--attention-fixture", "smollm2-135m", "--attention-dtype", "float32"]  # quick: the sample's ini says so
ITEM = "attention-verify::smollm2-135m::attn.py:attention::{}::forward"


def pytest_in(repo, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
                           *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture
def repo(tmp_path):
    return shutil.copytree(USER_REPO, tmp_path / "repo")


def quick_scenarios() -> list[str]:
    (f,) = resolve_fixtures(["smollm2-135m"])
    return [s.name for s in select(f, {torch.float32}, quick=True)]


@pytest.mark.slow  # a pytest run in a subprocess with a worker: the slow tier (make test-fast budget)
def test_sample_repo_fails_at_stage_scale(repo):
    """The sample's layer (no 1/sqrt(head_dim)): an item per quick scenario, each failing one names stage scale
    and its error, as does its JUnit testcase (with the properties); the single token passes (a scale changes
    nothing there)."""
    p = pytest_in(repo, *FAST, "--junitxml", "out.xml", "-rA")
    out = p.stdout
    assert p.returncode == 1, out[-3000:] + p.stderr[-2000:]
    scen = quick_scenarios()
    failing = [s for s in scen if s != "one_token"]
    assert f"{len(failing)} failed, 1 passed" in out, out[-2000:]
    assert f"PASSED {ITEM.format('one_token')}" in out
    for s in failing:
        assert f"FAILED {ITEM.format(s)} - Failed: stage scale: scores look scaled by 8.0x" in out, s
    assert "is the 1/sqrt(head_dim) scale missing? (max abs err" in out
    assert "failing rows:" in out and "FAIL smollm2-135m / attn.py:attention: stage scale" in out

    cases = {(c.get("classname"), c.get("name")): c for c in ET.parse(repo / "out.xml").iter("testcase")}
    assert set(cases) == {(f"attention-verify.smollm2-135m.attn.py:attention.{s}", "forward") for s in scen}
    for (cls, _), case in cases.items():
        props = {e.get("name"): e.get("value") for e in case.iter("property")}
        assert {"max_abs_err", "tolerance", "precision_ratio", "stage"} <= set(props), cls
        assert props["stage"] == "scale"  # the verdict's, on the passing item too
        fail = case.find("failure")
        if cls.endswith(".one_token"):
            assert fail is None and float(props["max_abs_err"]) <= float(props["tolerance"])
            continue
        assert fail is not None and "stage scale" in fail.get("message"), cls
        assert float(props["max_abs_err"]) > float(props["tolerance"]) == 1e-3


def test_k_selects_items(repo):
    """-k short keeps the short item (--collect-only: nothing runs)."""
    p = pytest_in(repo, *FAST, "--collect-only", "-q", "-k", "short")
    listed = [line for line in p.stdout.splitlines() if line.startswith("attention-verify::")]
    assert p.returncode == 0 and listed == [ITEM.format("short")], p.stdout + p.stderr
    assert f"1/{len(quick_scenarios())} tests collected" in p.stdout


@pytest.mark.slow
def test_node_ids_as_arguments_select_items(repo):
    """A node id (or a prefix of one) given as an argument collects just those; one that names nothing is bad
    input."""
    picked = [ITEM.format("left_padding"), "attention-verify::smollm2-135m::attn.py:attention::prompt"]
    p = pytest_in(repo, *FAST, "--collect-only", "-q", *picked)
    listed = [line for line in p.stdout.splitlines() if line.startswith("attention-verify::")]
    assert p.returncode == 0 and listed == [ITEM.format("left_padding"), ITEM.format("prompt")], p.stdout + p.stderr
    p = pytest_in(repo, *FAST, "--collect-only", "-q", *picked, "attention-verify::nope")
    assert p.returncode == 4 and "ERROR: attention-verify::nope: no such item" in p.stderr, p.stdout + p.stderr


@pytest.mark.slow
def test_a_correct_implementation_passes(repo):
    """docs/examples/layer.py:attention named on the command line (it replaces the ini's entry): every item passes."""
    spec = f"{ROOT}/docs/examples/layer.py:attention"
    p = pytest_in(repo, *FAST, "--attention-impl", spec, "-q")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert f"{len(quick_scenarios())} passed" in p.stdout and f"PASS smollm2-135m / {spec}" in p.stdout


@pytest.mark.slow
def test_kernels_on_their_matrix(repo):
    """The kernel contract: items on the kernel matrix (no fixture loaded); a kernel that returns out alone has its
    lse items skipped, one that returns (out, lse) has them checked."""
    p = pytest_in(repo, "--attention-core", "sdpa", "--attention-core", f"{ROOT}/docs/examples/kernel.py:attn",
                  "--attention-dtype", "float32", "-rs", "-v")  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "attention-verify::kernels::sdpa::one_token::lse SKIPPED" in p.stdout
    assert f"attention-verify::kernels::{ROOT}/docs/examples/kernel.py:attn::one_token::lse PASSED" in p.stdout
    assert "lse: not returned (optional under the core contract)" in p.stdout


@pytest.mark.gate
def test_ring_kernels_on_their_ranks(repo):
    """The ring contract: items per world (ring-w2, ring-w4), in the layouts the kernel declares; a kernel that merges
    wrong fails its items with the stage."""
    ref = f"{ROOT}/tests/plugins/ring_ref.py"
    p = pytest_in(repo, "--attention-ring", f"{ref}:gather_attn", "--attention-ring", f"{ref}:halves_summed",
                  "--attention-dtype", "float32", "--attention-quick", "-v")  # fmt: skip
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert f"attention-verify::ring-w4::{ref}:gather_attn::causal_64/zigzag::forward PASSED" in p.stdout
    assert f"attention-verify::ring-w2::{ref}:halves_summed::causal_64/contiguous::forward FAILED" in p.stdout
    assert "stage ring_merge" in p.stdout


def test_items_of_the_root_are_left_out_of_a_run_over_a_subfolder(repo):
    """`pytest tests` runs the repository's tests alone: ini entries belong to the root folder (nothing imported)."""
    (repo / "tests").mkdir()
    (repo / "tests" / "test_x.py").write_text("def test_ok():\n    pass\n")
    p = pytest_in(repo, "tests", "--collect-only", "-q")
    assert p.returncode == 0 and "tests/test_x.py::test_ok" in p.stdout and "attention-verify" not in p.stdout
    assert plugin.covers([], repo, repo) and plugin.covers(["."], repo, repo) and plugin.covers([".."], repo, repo)
    assert not plugin.covers(["tests", "tests/test_x.py::test_ok"], repo, repo)
    assert not plugin.covers([str(repo / "tests")], repo / "tests", repo)  # pytest started in a subfolder


def test_bad_configuration_is_one_line(repo):
    p = pytest_in(repo, "-o", "attention_verify=attn.py:attention", "-q")  # no impl=
    assert p.returncode == 4 and "ERROR: attention_verify: 'attn.py:attention': give impl=SPEC" in p.stderr, p.stderr
    p = pytest_in(repo, "--attention-dtype", "float64", "-q")
    assert p.returncode == 4 and "--attention-dtype: unknown dtype 'float64'" in p.stderr, p.stderr


def test_entries_and_the_contracts_agree():
    assert plugin.parse_entry(" core = pkg.mod:attn ") == ("core", "pkg.mod:attn")
    for bad in ("attn.py:attention", "layer=attn.py:attention", "impl="):
        with pytest.raises(ValueError, match="give impl=SPEC, module=SPEC, core=SPEC"):
            plugin.parse_entry(bad)
    assert plugin.KINDS == {c.OPTION.removeprefix("--"): c.NAME for c in contracts.with_options()}
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"attention_verify": "harness.pytest_plugin"}


def test_the_plugin_imports_nothing_heavy():
    """Every pytest of an environment with the package loads it: no torch until an implementation is named."""
    code = "import sys, harness.pytest_plugin; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.stdout.strip() == "[]", p.stdout + p.stderr


# ---- an item's outcome from its run's rows, without a run ----


def row(scenario, err, check="forward", error=None):
    ref = torch.zeros(1, 2, 4)
    if error is not None:
        return Row("fx", "my:attn", scenario, "float32", 0.0, not_run(ref, torch.float32), check=check, error=error)
    out = ref + err
    return Row("fx", "my:attn", scenario, "float32", 0.0, compare(out, ref, ref.double(), torch.ones(1, 2, dtype=bool),
                                                                  torch.float32), check=check)  # fmt: skip


def test_outcome_from_rows():
    bad = Verdict("fx", "my:attn", "layer", False, "scale", "is the scale missing?", failing=["short"])
    result = plugin.Result([row("one_token", 0.0), row("short", 0.5)], [bad])
    status, msg, props = plugin.outcome(result, "fx", "my:attn", "one_token", "forward", "layer")
    assert status == "passed" and props["stage"] == "scale" and props["max_abs_err"] == 0.0
    status, msg, props = plugin.outcome(result, "fx", "my:attn", "short", "forward", "layer")
    assert status == "failed" and msg.startswith("stage scale: is the scale missing? (max abs err 5.00e-01, "
                                                 "tolerance 1.00e-03)")  # fmt: skip
    assert "failing rows:\n  short " in msg and props["tolerance"] == 1e-3 and props["precision_ratio"] > 1
    # a row the run never produced fails, and says so
    status, msg, _ = plugin.outcome(result, "fx", "my:attn", "prompt", "forward", "layer")
    assert status == "failed" and "no row for fx / my:attn / prompt / forward" in msg
    status, msg, _ = plugin.outcome(plugin.Result([], [], "bad input: x"), "fx", "my:attn", "short", "forward", "layer")
    assert status == "failed" and "bad input: x" in msg


def test_outcome_of_a_fault_and_of_an_optional_check():
    crash = Verdict("fx", "my:attn", "core", False, "crash", "raised RuntimeError: boom", failing=["a"],
                    error="Traceback ...\nRuntimeError: boom")  # fmt: skip
    result = plugin.Result([row("a", 0, error="raised RuntimeError: boom"), row("b", 0.0)], [crash])
    status, msg, _ = plugin.outcome(result, "fx", "my:attn", "a", "forward", "core")
    assert status == "failed" and msg.startswith("stage crash: raised RuntimeError: boom\n")
    assert "error: raised RuntimeError: boom" in msg and msg.endswith("fault:\nTraceback ...\nRuntimeError: boom")
    # lse is optional for a kernel: skipped when its forward ran without it, failed when the forward faulted
    assert plugin.outcome(result, "fx", "my:attn", "b", "lse", "core")[0] == "skipped"
    assert plugin.outcome(result, "fx", "my:attn", "a", "lse", "core")[0] == "failed"
    assert plugin.outcome(result, "fx", "my:attn", "b", "lse", "layer")[0] == "failed"  # no optional check there


def test_outcome_of_a_skipped_scenario():
    """A kernel scenario the kernel's signature cannot take: its items are skipped with the reason, never passed."""
    why = "no `window` keyword in its signature"
    skip = Row("fx", "my:attn", "w", "float32", 0.0, skipped(why), skipped=why)
    result = plugin.Result([row("b", 0.0), skip], [Verdict("fx", "my:attn", "core", True,
                                                           skipped=[{"scenario": "w", "why": why}])])  # fmt: skip
    for check in ("forward", "lse"):
        status, msg, _ = plugin.outcome(result, "fx", "my:attn", "w", check, "core")
        assert status == "skipped" and why in msg
    assert plugin.outcome(result, "fx", "my:attn", "b", "forward", "core")[0] == "passed"
