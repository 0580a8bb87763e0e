"""What a verify run prints and writes: the table (one row per check), a line per verdict, the JSON document.

The reference's own rows: `hf-sdpa` (transformers' sdpa path against its eager path) fails a run like any check;
`golden` (transformers' output against the one stored at extraction, under another transformers: drift.py) is
reported as drift, one line above the table, and never makes a run pass or fail.

An implementation whose float32 output equals transformers' eager output bit for bit on every row gets a note
below the table ("bit_exact" in its verdict), never a failure: code that computes the reference itself or reads
the fixture's golden output looks exactly like that, and the harness cannot tell it from an exact port.

A skipped scenario (the implementation's signature lacks a keyword it uses) is a row `SKIP (why)`, counted apart
(neither passed nor failed), listed in its verdict (`skipped`, and in the verdict line); never a pass: --strict
fails an implementation that skipped any.
"""

from __future__ import annotations

from harness import versions
from harness.verify import isolation
from harness.verify.compare import PRECISION_LIMIT

REFERENCE_CHECKS = ("hf-sdpa", "golden")
GOLDEN = "golden"


def is_drift(row) -> bool:
    """The golden row disagreeing: transformers moved since the fixture was made (the same transformers disagreeing
    is a fixture problem, refused before any row: contracts/layer.py reference_rows)."""
    return row.impl == GOLDEN and not row.passed


def counts(rows) -> tuple[int, int, int, int]:
    """(passed, failed, drift, skipped): a drift and a skip are neither passed nor failed."""
    drift = sum(is_drift(r) for r in rows)
    n_skip = sum(r.skipped is not None for r in rows)
    n_pass = sum(r.passed for r in rows)
    return n_pass, len(rows) - n_pass - drift - n_skip, drift, n_skip


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
        if c.imprecise:
            res = f"PASS* ({c.precision_ratio:.0f}x less precise than HF)"
        if is_drift(r):
            res = "DRIFT (the reference moved: see above; not a failure)"
        if r.skipped is not None:
            res = f"SKIP ({r.skipped})"
        name = r.scenario if r.check == "forward" else f"{r.scenario}:{r.check}"
        nums = (f"{c.max_abs_err:11.2e} {c.err_vs_ref64:9.2e} {c.tolerance:9.2e}" if r.skipped is None
                else f"{'-':>11s} {'-':>9s} {'-':>9s}")  # fmt: skip
        lines.append(f"{r.fixture:{wf}s} {r.impl:{wi}s} {name:17s} {r.dtype:8s} {nums}  {res[:160]}")
    return "\n".join(lines)


def verdict_lines(verdicts, strict: bool = False) -> list[str]:
    lines = []
    for v in verdicts:
        if v.comm:
            lines.append(comm_line(v))
        if not v.passed:
            lines.append(f"FAIL {v.fixture} / {v.impl}: stage {v.stage}: {v.hint} (failing: {', '.join(v.failing)})"
                         + (f"; {skipped_text(v.skipped)}" if v.skipped else ""))  # fmt: skip
            continue
        if v.imprecise:
            mark = "FAIL (--strict)" if strict else "PASS*"
            where = ", ".join(v.failing)
            lines.append(f"{mark} {v.fixture} / {v.impl}: stage {v.stage}: {v.hint} (imprecise: {where})")
        if v.skipped:
            mark = "FAIL (--strict)" if strict else "PASS (with skips)"
            lines.append(f"{mark} {v.fixture} / {v.impl}: {skipped_text(v.skipped)}; a skip is not a pass"
                         + ("" if strict else " (--strict fails it)"))  # fmt: skip
    return lines


def comm_line(v) -> str:
    """`COMM ring-w4 / allgather: comm_ratio 1.00 (bytes sent / the ring's ideal, forward; ranks 1.00 1.00 ...)`."""
    per = " ".join(f"{r['comm_ratio']:.2f}" for r in v.comm["ranks"])
    sent = sum(r["bytes_sent"] for r in v.comm["ranks"])
    return (f"COMM {v.fixture} / {v.impl}: comm_ratio {v.comm['comm_ratio']:.2f} (bytes sent / the ring's forward "
            f"ideal, (W - 1) x K and V shard bytes; per rank {per}; {sent} bytes in all)")


def skipped_text(skipped: list[dict], shown: int = 6) -> str:
    """`3 scenarios skipped: no `window` keyword in its signature (window_1, window_17, ...)`, grouped by reason."""
    by_why: dict[str, list[str]] = {}
    for s in skipped:
        by_why.setdefault(s["why"], []).append(s["scenario"])
    parts = [f"{why} ({', '.join(names[:shown])}{f', and {len(names) - shown} more' if len(names) > shown else ''})"
             for why, names in by_why.items()]  # fmt: skip
    n = len(skipped)
    return f"{n} scenario{'s' if n != 1 else ''} skipped: " + "; ".join(parts)


def reference_lines(rows) -> list[str]:
    """transformers' sdpa path disagreeing with its eager path (a failure; the golden's drift has its own line)."""
    return [
        f"REFERENCE {r.fixture} / {r.impl} / {r.scenario}: the reference itself disagrees "
        f"(max abs {r.c.max_abs_err:.2e}); check the transformers version against the fixture's manifest"
        for r in rows
        if r.impl in REFERENCE_CHECKS and not r.passed and not is_drift(r)
    ]


def versions_moved(made_with: dict, installed: dict) -> str:
    """`transformers 5.23.0 -> 5.24.0` (torch too when it moved as well)."""
    moved = [f"{p} {made_with.get(p) or '(unrecorded)'} -> {installed.get(p) or '(absent)'}" for p in installed
             if p == "transformers" or made_with.get(p) != installed.get(p)]  # fmt: skip
    return moved[0] + (f" ({', '.join(moved[1:])})" if moved[1:] else "")


def drift_line(drift: list[dict]) -> str | None:
    """One line for every drifted golden (drift.py found()), or None."""
    if not drift:
        return None
    groups: dict[str, list[str]] = {}
    for d in drift:
        where = f"{d['max_abs_err']:.1e} on {d['fixture']}/{d['scenario']}"
        groups.setdefault(versions_moved(d["made_with"], d["installed"]), []).append(where)
    said = "; ".join(f"{moved} changed LlamaAttention's output by {', '.join(w)}" for moved, w in groups.items())
    tol = max(d["tolerance"] for d in drift)
    return (f"the reference moved: {said} (tolerance {tol:.0e}); implementations are judged against the installed "
            "transformers; once checked, `verify --accept-reference` rewrites those goldens")  # fmt: skip


def summary_line(rows, seconds: float, n_fixtures: int, n_impls: int, strict: bool = False) -> str:
    n_pass, n_fail, n_drift, n_skip = counts(rows)
    n_imprecise = sum(r.c.imprecise for r in rows)
    return (f"{n_pass} passed, {n_fail} failed in {seconds:.1f} s ({n_fixtures} fixtures x {n_impls} implementations)"
            + (f"; {n_skip} skipped (not passes{', failures under --strict' if strict else ''})" if n_skip else "")
            + (f"; {n_imprecise} imprecise (PASS*{', failures under --strict' if strict else ''})" if n_imprecise
               else "")
            + (f"; {n_drift} reference drift (not failures)" if n_drift else ""))  # fmt: skip


def bit_exact(rows, v) -> bool:
    """Every float32 forward row of this verdict's implementation and target: max abs error exactly 0.0."""
    mine = [r for r in rows if (r.fixture, r.impl, r.check, r.dtype) == (v.fixture, v.impl, "forward", "float32")
            and r.skipped is None]  # fmt: skip
    return bool(mine) and all(r.error is None and r.c.max_abs_err == 0.0 for r in mine)


def mark_bit_exact(rows, verdicts) -> None:
    for v in verdicts:
        v.bit_exact = bit_exact(rows, v)


def bit_exact_lines(verdicts) -> list[str]:
    """One note per bit-exact implementation (with the targets where it was), never a failure."""
    where: dict[str, list[str]] = {}
    for v in verdicts:
        if v.bit_exact:
            where.setdefault(v.impl, []).append(v.fixture)
    return [f"note: {impl} matches transformers' eager output bit for bit on every float32 row ({', '.join(fx)}): "
            "it may compute the reference itself (imports transformers) or read the fixture's golden output; the "
            "harness cannot tell these apart from an exact port." for impl, fx in where.items()]  # fmt: skip


def print_report(rows, verdicts, seconds: float, n_fixtures: int, n_impls: int, out=print, strict=False,
                 drift: list[dict] | None = None) -> None:  # fmt: skip
    for line in (versions.note(), drift_line(drift or [])):  # the reference is not the tested one; it moved
        if line:
            out(line)
    out(table(rows))
    mark_bit_exact(rows, verdicts)
    for line in bit_exact_lines(verdicts) + verdict_lines(verdicts, strict) + reference_lines(rows):
        out(line)
    out(summary_line(rows, seconds, n_fixtures, n_impls, strict))


def precision_markdown(rows) -> str:
    """The largest precision ratio per implementation (transformers' sdpa path included) and scenario: the table
    behind the limit (docs/precision.md)."""
    impls = list(dict.fromkeys(r.impl for r in rows if r.impl != "golden" and r.check == "forward"))
    scen = list(dict.fromkeys(r.scenario for r in rows if r.check == "forward"))
    worst = {}
    for r in rows:
        if r.impl in impls and r.check == "forward" and r.c.precision_ratio == r.c.precision_ratio:
            k = (r.impl, r.scenario)
            worst[k] = max(worst.get(k, 0.0), r.c.precision_ratio)
    lines = ["| implementation | " + " | ".join(f"`{s}`" for s in scen) + " | max |",
             "|---|" + "---|" * (len(scen) + 1)]  # fmt: skip
    for i in impls:
        vals = [worst.get((i, s)) for s in scen]
        cells = ["" if v is None else f"{v:.2f}" for v in vals]
        top = max([v for v in vals if v is not None] or [0.0])
        lines.append(f"| `{i}` | " + " | ".join(cells) + f" | **{top:.2f}** |")
    overall = max(worst.values() or [0.0])
    lines += ["", f"Largest ratio of any of them: **{overall:.2f}**; the limit is **{PRECISION_LIMIT:g}**."]
    return "\n".join(lines)


def grad_markdown(rows) -> str:
    """Per implementation and gradient, over every scenario: the largest |impl - HF| as a fraction of the tolerance it
    was held to, and where (docs/grad.md)."""
    grads = [r for r in rows if r.check.startswith("grad_") and r.impl not in REFERENCE_CHECKS]
    checks = list(dict.fromkeys(r.check for r in grads))
    impls = list(dict.fromkeys((r.fixture, r.impl) for r in grads))
    lines = ["| fixture | implementation | " + " | ".join(f"`{c}`" for c in checks) + " |",
             "|---|---|" + "---|" * len(checks)]  # fmt: skip
    for fx, impl in impls:
        cells = []
        for c in checks:
            mine = [r for r in grads if (r.fixture, r.impl, r.check) == (fx, impl, c)]
            if not mine:
                cells.append("")
                continue
            w = max(mine, key=lambda r: r.c.max_abs_err / r.c.tolerance if r.c.tolerance else float("inf"))
            cells.append(f"{w.c.max_abs_err:.1e} ({w.c.max_abs_err / w.c.tolerance:.1%} of tol., {w.scenario})")
        lines.append(f"| {fx} | `{impl}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def document(rows, verdicts, seconds: float, strict: bool = False, drift: list[dict] | None = None) -> dict:
    """The JSON of a run. A drifted golden row stays in "results" ("passed": false, "drift": true) and is listed in
    "reference_drift"; it is counted neither passed nor failed."""
    n_pass, n_fail, n_drift, n_skip = counts(rows)
    mark_bit_exact(rows, verdicts)
    return {
        "summary": {"passed": n_pass, "failed": n_fail, "drift": n_drift, "skipped": n_skip,
                    "imprecise": sum(r.c.imprecise for r in rows), "strict": strict, "seconds": round(seconds, 3)},
        "reference_drift": list(drift or []),
        "results": [r.json() | ({"drift": is_drift(r)} if r.impl == GOLDEN else {}) for r in rows],
        "verdicts": [v.json() for v in verdicts],
        "versions": versions.both(),
        "isolation": isolation.mechanism(),  # how workers were walled off on this machine
    }
