"""What a verify run prints and writes: the table (one row per check), a line per verdict, the JSON document."""

from __future__ import annotations

REFERENCE_CHECKS = ("hf-sdpa", "golden")


def table(rows) -> str:
    wf = max([7] + [len(r.fixture) for r in rows])
    wi = max([4] + [len(r.impl) for r in rows])
    head = (
        f"{'fixture':{wf}s} {'impl':{wi}s} {'scenario':17s} {'dtype':8s} {'max abs err':>11s} {'vs fp64':>9s} "
        f"{'tolerance':>9s}  result"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.c
        res = "PASS" if c.passed else (f"FAIL ({r.error})" if r.error else "FAIL (NaN/Inf)" if c.nonfinite else "FAIL")
        name = r.scenario if r.check == "forward" else f"{r.scenario}:{r.check}"
        lines.append(
            f"{r.fixture:{wf}s} {r.impl:{wi}s} {name:17s} {r.dtype:8s} {c.max_abs_err:11.2e} "
            f"{c.err_vs_ref64:9.2e} {c.tolerance:9.2e}  {res[:160]}"
        )
    return "\n".join(lines)


def verdict_lines(verdicts) -> list[str]:
    return [
        f"FAIL {v.fixture} / {v.impl}: stage {v.stage}: {v.hint} (failing: {', '.join(v.failing)})"
        for v in verdicts
        if not v.passed
    ]


def reference_lines(rows) -> list[str]:
    return [
        f"REFERENCE {r.fixture} / {r.impl} / {r.scenario}: the reference itself disagrees "
        f"(max abs {r.c.max_abs_err:.2e}); check the transformers version against the fixture's manifest"
        for r in rows
        if r.impl in REFERENCE_CHECKS and not r.passed
    ]


def print_report(rows, verdicts, seconds: float, n_fixtures: int, n_impls: int, out=print) -> None:
    out(table(rows))
    for line in verdict_lines(verdicts) + reference_lines(rows):
        out(line)
    n_pass = sum(r.passed for r in rows)
    out(f"{n_pass} passed, {len(rows) - n_pass} failed in {seconds:.1f} s "
        f"({n_fixtures} fixtures x {n_impls} implementations)")  # fmt: skip


def document(rows, verdicts, seconds: float) -> dict:
    n_pass = sum(r.passed for r in rows)
    return {
        "summary": {"passed": n_pass, "failed": len(rows) - n_pass, "seconds": round(seconds, 3)},
        "results": [r.json() for r in rows],
        "verdicts": [v.json() for v in verdicts],
    }
