"""What a verify run gives a CI system: JUnit XML (--junit), a GitHub step summary and GitHub annotations.

    junit(...)          one testcase per row: classname `fixture/impl`, name `scenario:check`, one testsuite per
                        (fixture, implementation); the reference's own rows (hf-sdpa, golden) in a testsuite of
                        their own, `reference`. A failing row's <failure> carries its verdict: type = the stage,
                        message = stage and hint, text = max abs error, tolerance, the failing scenarios, the
                        fault's traceback. A drifted golden is a passing testcase whose <system-out> says it moved
                        (a drift never fails a run). A skipped scenario is <skipped message=why/>; under --strict
                        a <failure> of type `skipped` (the run fails: a CI system must see which case did it)
    step_summary(...)   markdown for $GITHUB_STEP_SUMMARY: a verdict per implementation and fixture, the stage and
                        hint of each failure, the reference's drift and failures
    annotations(...)    `::error title=...::message` per failing verdict (and failing reference row),
                        `::warning` per drift and per verdict with skipped scenarios (an error under --strict),
                        escaped as GitHub's workflow commands require
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.common import UserError, one_line, write_atomic
from harness.verify.report import REFERENCE_CHECKS, drift_line, is_drift, skipped_text, summary_line

__all__ = ["annotations", "append_summary", "github_actions", "junit", "require_junitparser", "step_summary"]

REFERENCE_SUITE = "reference"


# ---------------------------------------------------------------------------------------------------------
# what failed, and why: shared by the three outputs


def failed_verdicts(verdicts, strict: bool) -> list:
    return [v for v in verdicts if not v.passed or (strict and (v.imprecise or v.skipped))]


def row_fails(r, strict: bool) -> bool:
    if r.skipped is not None:
        return strict
    return (not r.passed and not is_drift(r)) or (strict and r.c.imprecise)


def hint_text(v, strict: bool) -> str:
    """`hint (failing: a, b)`, and the skipped scenarios."""
    where = ", ".join(v.failing)
    kind = "failing" if not v.passed else "imprecise, failing under --strict" if strict else "imprecise"
    text = f"{v.hint}" + (f" ({kind}: {where})" if where else "") if v.hint or where else ""
    if v.skipped:
        text += ("; " if text else "") + skipped_text(v.skipped) + (" (failures under --strict)" if strict else "")
    return text


def verdict_text(v, strict: bool) -> str:
    """`stage S: hint (failing: a, b)`: what the verdict line of the table says, without its prefix."""
    return f"stage {v.stage or 'skipped'}: {hint_text(v, strict)}"


def reference_text(r) -> str:
    return (f"transformers' sdpa path disagrees with its eager path on {r.scenario} (max abs {r.c.max_abs_err:.2e}, "
            f"tolerance {r.c.tolerance:.2e}); check the transformers version against the fixture's manifest")


# ---------------------------------------------------------------------------------------------------------
# JUnit XML


def require_junitparser():
    """junitparser (a dependency of the package): missing, --junit is refused before the run, in one line."""
    try:
        import junitparser  # lazy: only --junit needs it; missing, it is one error line before any work
    except ImportError:
        raise UserError("--junit needs the package junitparser, which is not installed; `pip install junitparser` "
                        "(or `make setup`, which installs the project's dependencies)") from None  # fmt: skip
    return junitparser


def junit(rows, verdicts, strict: bool = False, drift: list[dict] | None = None) -> bytes:
    """The run as JUnit XML (Ant's layout, which junitparser reads and writes; GitHub, GitLab and Jenkins read it)."""
    jp = require_junitparser()
    by_key = {(v.fixture, v.impl): v for v in verdicts}
    moved = {(d["fixture"], d["scenario"]): d for d in drift or []}
    suites: dict[str, object] = {}
    for r in rows:
        reference = r.impl in REFERENCE_CHECKS
        suite_name = REFERENCE_SUITE if reference else f"{r.fixture}/{r.impl}"
        if suite_name not in suites:
            suites[suite_name] = jp.TestSuite(suite_name)
        case = jp.TestCase(f"{r.scenario}:{r.check}", f"{r.fixture}/{r.impl}", round(r.seconds, 3))  # no 1e-05
        if is_drift(r):
            d = moved.get((r.fixture, r.scenario))
            case.system_out = drift_line([d]) if d else "the reference moved (the golden disagrees)"
        elif r.skipped is not None:
            why = f"skipped: {r.skipped}"
            if strict:
                failure = jp.Failure(one_line(f"{why} (a skip fails under --strict)", 1000), "skipped")
                failure.text = f"stage: skipped\nwhy: {r.skipped}\ndtype: {r.dtype}"
                case.result = [failure]
            else:
                case.result = [jp.Skipped(one_line(why, 1000))]
        elif row_fails(r, strict):
            v = by_key.get((r.fixture, r.impl))
            if reference or v is None:
                stage, hint, message = "reference", reference_text(r), reference_text(r)
            else:
                stage, hint, message = v.stage or "unknown", hint_text(v, strict), verdict_text(v, strict)
            failure = jp.Failure(one_line(message, 1000), stage)
            failure.text = failure_text(r, v if not reference else None, stage, hint)
            case.result = [failure]
        elif r.c.imprecise:
            case.system_out = f"PASS*: {r.c.precision_ratio:.0f}x less precise than transformers (fails under --strict)"
        suites[suite_name].add_testcase(case)
    xml = jp.JUnitXml("attention-verify")
    for s in suites.values():
        s.update_statistics()
        xml.add_testsuite(s)
    xml.update_statistics()
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + xml.tostring() + b"\n"


def failure_text(r, v, stage: str, hint: str) -> str:
    c = r.c
    lines = [f"stage: {stage}", f"hint: {hint}",
             f"max abs err: {c.max_abs_err:.3e}", f"tolerance: {c.tolerance:.3e}",
             f"error vs float64: {c.err_vs_ref64:.3e}", f"dtype: {r.dtype}", f"device: {r.device}"]  # fmt: skip
    if c.imprecise:
        lines.append(f"precision ratio: {c.precision_ratio:.1f}x transformers' error against float64")
    if r.error:
        lines.append(f"this check: {r.error}")
    if v is not None and v.error:
        lines.append(f"fault:\n{v.error}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# GitHub: the step summary and annotations


def cell(text) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return one_line(str(text), 600).replace("|", "\\|")


def step_summary(rows, verdicts, seconds: float, n_fixtures: int, n_impls: int, strict: bool = False,
                 drift: list[dict] | None = None) -> str:  # fmt: skip
    lines = ["## attention-verify", "", summary_line(rows, seconds, n_fixtures, n_impls, strict), ""]
    line = drift_line(drift or [])
    if line:
        lines += [f"> [!WARNING]\n> {cell(line)}", ""]
    lines += ["| fixture | implementation | verdict | stage | hint |", "|---|---|---|---|---|"]
    for v in verdicts:
        failed = not v.passed or (strict and (v.imprecise or v.skipped))
        verdict = "FAIL" if failed else "PASS*" if v.imprecise else "PASS (skips)" if v.skipped else "PASS"
        noted = failed or v.imprecise or v.skipped
        stage, hint = (v.stage or ("skipped" if v.skipped else ""), hint_text(v, strict)) if noted else ("", "")
        lines.append(f"| {cell(v.fixture)} | `{cell(v.impl)}` | **{verdict}** | {cell(stage or '')} | {cell(hint)} |")
    for r in rows:
        if r.impl in REFERENCE_CHECKS and not r.passed:
            verdict, hint = ("DRIFT", "the reference moved (above); not a failure") if is_drift(r) else (
                "FAIL", reference_text(r))  # fmt: skip
            who = f"`{r.impl}` (the reference)"
            lines.append(f"| {cell(r.fixture)} | {who} | **{verdict}** | reference | {cell(hint)} |")
    return "\n".join(lines) + "\n"


def append_summary(path, text: str) -> None:
    """Append to $GITHUB_STEP_SUMMARY (what earlier steps wrote kept), atomically."""
    p = Path(path)
    try:
        before = p.read_bytes() if p.is_file() else b""
    except OSError as e:
        raise UserError(f"GITHUB_STEP_SUMMARY {p}: cannot read it ({e.strerror}); unset it or fix the path") from None
    write_atomic(p, before + (b"\n" if before and not before.endswith(b"\n") else b"") + text.encode())


def github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS", "").strip().lower() not in ("", "false", "0")


def escape_data(s: str) -> str:
    """A workflow command's message: %, CR and LF escaped (GitHub's rules)."""
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(s: str) -> str:
    """A workflow command's property (title=...): also : and , escaped."""
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def command(kind: str, title: str, message: str) -> str:
    return f"::{kind} title={escape_property(title)}::{escape_data(message)}"


def annotations(rows, verdicts, strict: bool = False, drift: list[dict] | None = None) -> list[str]:
    failing = failed_verdicts(verdicts, strict)
    out = [command("error", f"attention-verify: {v.fixture} / {v.impl} fails at stage {v.stage or 'skipped'}",
                   verdict_text(v, strict) + (f"\n{v.error}" if v.error and v.error != v.hint else ""))
           for v in failing]  # fmt: skip
    out += [command("warning", f"attention-verify: {v.fixture} / {v.impl} skipped scenarios",
                    skipped_text(v.skipped) + "; a skip is not a pass (--strict fails it)")
            for v in verdicts if v.skipped and v not in failing]  # fmt: skip
    out += [command("error", f"attention-verify: {r.fixture} / {r.impl}: the reference disagrees", reference_text(r))
            for r in rows if r.impl in REFERENCE_CHECKS and not r.passed and not is_drift(r)]  # fmt: skip
    line = drift_line(drift or [])
    if line:
        out.append(command("warning", "attention-verify: the reference moved", line))
    return out
