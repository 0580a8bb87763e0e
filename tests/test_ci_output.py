"""What `verify` gives a CI system (harness/verify/ci_output.py): JUnit XML (--junit) valid against the JUnit schema
(tests/junit.xsd) with a failing case naming its stage; with $GITHUB_STEP_SUMMARY set, a markdown table appended to
that file; with $GITHUB_ACTIONS set, a `::error` line per failing verdict, escaped as GitHub requires. One run, in
this process, of a correct layer and one that forgot the scale serves the first three."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import one_line_error, run

from harness.verify import ci_output
from harness.verify.compare import Comparison
from harness.verify.records import Row, Verdict

BROKEN = "docs/examples/layer.py:no_scale"
SCHEMA = Path(__file__).with_name("junit.xsd")


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """verify --junit --json of naive and no_scale on SmolLM2, as a GitHub Actions step would run it."""
    d = tmp_path_factory.mktemp("ci")
    summary = d / "summary.md"
    summary.write_text("earlier step's summary\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GITHUB_STEP_SUMMARY", str(summary))
        mp.setenv("GITHUB_ACTIONS", "true")
        p = run(["-m", "harness", "verify", "--fixture", "smollm2-135m", "--impl", "naive", BROKEN, "--quick",
                 "--dtype", "float32", "--junit", str(d / "verify.xml"), "--json", str(d / "verify.json")])  # fmt: skip
    assert p.returncode == 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p, d


def test_junit_is_valid_and_a_failing_case_names_its_stage(ci_run):
    import junitparser  # a dependency of the package (pyproject.toml)
    import xmlschema  # a test dependency (the dev extra)

    _, d = ci_run
    xmlschema.XMLSchema(SCHEMA).validate(d / "verify.xml")  # raises on anything the schema refuses
    doc = json.loads((d / "verify.json").read_text())
    xml = junitparser.JUnitXml.fromfile(str(d / "verify.xml"))
    suites = {s.name: list(s) for s in xml}
    assert set(suites) == {"reference", "smollm2-135m/naive", f"smollm2-135m/{BROKEN}"}
    cases = [c for s in suites.values() for c in s]
    assert len(cases) == len(doc["results"])  # one testcase per row
    assert {c.classname for c in suites["reference"]} == {"smollm2-135m/hf-sdpa", "smollm2-135m/golden"}
    assert all(c.is_passed for c in suites["smollm2-135m/naive"])
    failing = [c for c in suites[f"smollm2-135m/{BROKEN}"] if c.is_failure]
    failed_rows = [r for r in doc["results"] if r["impl"] == BROKEN and not r["passed"]]
    assert len(failing) == len(failed_rows) == xml.failures > 0
    case = next(c for c in failing if c.name == "prompt:forward")
    assert case.classname == f"smollm2-135m/{BROKEN}"
    failure = case.result[0]
    assert failure.type == "scale" and failure.message.startswith("stage scale: ")
    row = next(r for r in failed_rows if r["scenario"] == "prompt")
    assert "stage: scale" in failure.text and f"max abs err: {row['max_abs_err']:.3e}" in failure.text
    assert f"tolerance: {row['tolerance']:.3e}" in failure.text


def test_the_step_summary_is_appended(ci_run):
    _, d = ci_run
    text = (d / "summary.md").read_text()
    assert text.startswith("earlier step's summary\n")  # what earlier steps wrote is kept
    assert "| fixture | implementation | verdict | stage | hint |" in text
    assert "| smollm2-135m | `naive` | **PASS** |" in text
    broken = next(ln for ln in text.splitlines() if f"`{BROKEN}`" in ln)
    assert "**FAIL** | scale | scores look scaled by 8.0x" in broken and "(failing: " in broken


def test_each_failing_verdict_is_an_error_annotation(ci_run):
    p, _ = ci_run
    errors = [ln for ln in p.stdout.splitlines() if ln.startswith("::error")]
    assert len(errors) == 1, errors  # naive passed; no_scale failed
    title, message = errors[0].removeprefix("::error title=").split("::", 1)
    assert title == "attention-verify%3A smollm2-135m / docs/examples/layer.py%3Ano_scale fails at stage scale"
    assert message.startswith("stage scale: scores look scaled by 8.0x")


def test_workflow_commands_escape_newlines_and_percent():
    hint = "raised ValueError: 100% wrong, twice\r\nsee below"
    trace = "Traceback (most recent call last):\n  File x\nValueError: 100%"
    v = Verdict("fx", "my.py:attn", "layer", False, "crash", hint, failing=["short", "prompt"], error=trace)
    (line,) = ci_output.annotations([], [v])
    assert "\n" not in line and "\r" not in line
    title, message = line.removeprefix("::error title=").split("::", 1)
    assert title == "attention-verify%3A fx / my.py%3Aattn fails at stage crash"
    assert message.startswith("stage crash: raised ValueError: 100%25 wrong, twice%0D%0Asee below")
    assert message.endswith("%0ATraceback (most recent call last):%0A  File x%0AValueError: 100%25")
    assert ci_output.escape_property("a, b: 5%") == "a%2C b%3A 5%25"


def cmp(err: float, passed: bool, imprecise: bool = False) -> Comparison:
    ratio = 50.0 if imprecise else 1.0
    return Comparison(passed, err, [0, 0, 0], err, err, 1e-3, "|impl-HF|<=0.001", err, 1e-7, 0, ratio, imprecise)


def test_junit_covers_faults_imprecision_drift_and_the_reference():
    """Without a run: a crash (its traceback in the failure), an imprecise pass (a failure only under --strict), a
    drifted golden (a passing case that says so) and transformers' sdpa path disagreeing (a failure of `reference`)."""
    import junitparser
    import xmlschema

    rows = [Row("fx", "hf-sdpa", "short", "float32", 0.1, cmp(2e-3, False)),
            Row("fx", "golden", "prompt", "float32", 0.0, cmp(3e-3, False)),
            Row("fx", "bad.py:attn", "short", "float32", 0.2, cmp(float("inf"), False), error="raised ValueError: x"),
            Row("fx", "lax", "short", "float32", 0.00001, cmp(1e-4, True, imprecise=True))]  # fmt: skip
    verdicts = [Verdict("fx", "bad.py:attn", "layer", False, "crash", "raised ValueError: x", failing=["short"],
                        error="Traceback (most recent call last):\nValueError: x"),
                Verdict("fx", "lax", "layer", True, "softmax_precision", "passes the 1e-3 gate but is 50x less precise",
                        failing=["short"], imprecise=True)]  # fmt: skip
    drift = [{"fixture": "fx", "scenario": "prompt", "made_with": {"transformers": "5.23.0", "torch": "2.13.0"},
              "installed": {"transformers": "5.24.0", "torch": "2.13.0"}, "max_abs_err": 3e-3, "tolerance": 1e-3}]
    schema = xmlschema.XMLSchema(SCHEMA)
    for strict in (False, True):
        xml = ci_output.junit(rows, verdicts, strict=strict, drift=drift)
        schema.validate(xml.decode())
        cases = {c.classname: c for s in junitparser.JUnitXml.fromstring(xml) for c in s}
        assert cases["fx/hf-sdpa"].result[0].type == "reference"
        assert cases["fx/golden"].is_passed and "transformers 5.23.0 -> 5.24.0" in cases["fx/golden"].system_out
        crash = cases["fx/bad.py:attn"].result[0]
        assert crash.type == "crash" and "Traceback (most recent call last):" in crash.text
        assert cases["fx/lax"].is_failure is strict
        if strict:
            assert cases["fx/lax"].result[0].type == "softmax_precision"


def test_no_annotations_outside_github_actions(monkeypatch):
    for value, on in ((None, False), ("", False), ("false", False), ("true", True)):
        if value is None:
            monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
        else:
            monkeypatch.setenv("GITHUB_ACTIONS", value)
        assert ci_output.github_actions() is on


@pytest.mark.parametrize("where", ["junit", "summary"])
def test_unwritable_ci_outputs_are_refused_before_the_run(tmp_path, monkeypatch, where):
    args = ["-m", "harness", "verify", "--fixture", "smollm2-135m", "--impl", "naive", "--quick"]
    if where == "junit":
        p = run([*args, "--junit", str(tmp_path)])  # a directory
    else:
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))
        p = run(args)
    assert p.returncode == 2 and ("--junit" if where == "junit" else "GITHUB_STEP_SUMMARY") in one_line_error(p)
    assert "passed" not in p.stdout


def test_the_action_passes_every_contract_option():
    """action.yml takes an input per contract option of `verify` and hands each SPEC on as that option."""
    text = (Path(__file__).parents[1] / "action.yml").read_text()
    for opt in ("impl", "module", "core", "paged", "varlen"):
        assert re.search(rf"^  {opt}:\n    description:", text, re.M), opt
        assert f'opts+=(--{opt} "$s")' in text, opt
